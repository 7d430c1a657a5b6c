//! The lease workload (I7): each lease client grants a lease, attaches a key to it, keeps it
//! alive for a while and reads the key between renewals, then lets the lease lapse and waits
//! for the key to disappear. The log records call and return times of every step.
use std::time::Duration;

use serde::{Deserialize, Serialize};
use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::lease_client::LeaseClient;
use store::pb::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest};
use tokio_util::sync::CancellationToken;

use super::history::Recorder;
use super::workload::channel;

/// Prefix of leased keys (outside the KV workload's prefix).
pub const LEASE_PREFIX: &str = "lk/";
/// TTL of every lease, in seconds.
pub const LEASE_TTL_SECS: i64 = 2;
/// Renewals per lease before it is left to expire.
const RENEWALS: usize = 6;

/// One step of a lease's life, with recorder times (ns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum LeaseStep {
    /// The lease was granted (`LeaseGrant` answered) and its key attached.
    Granted {
        /// Call time of the grant.
        call: u64,
    },
    /// A keep-alive answered with the full TTL.
    Renewed {
        /// Call time.
        call: u64,
        /// Return time.
        ret: u64,
    },
    /// A keep-alive answered TTL 0 (the lease is gone).
    Gone {
        /// Call time.
        call: u64,
        /// Return time.
        ret: u64,
    },
    /// A linearizable read of the leased key.
    Read {
        /// Call time.
        call: u64,
        /// Return time.
        ret: u64,
        /// Whether the key existed.
        present: bool,
    },
    /// Renewals stopped at `call`; the key was seen gone at `ret` (`None`: never, within the
    /// wait).
    Expired {
        /// Time of the last renewal call (the TTL runs from at most here).
        last_renewal: u64,
        /// First read that found the key gone.
        gone_at: Option<u64>,
    },
}

/// A jump of one member's lease clock (F15), as the nemesis made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockJump {
    /// Recorder time (ns) of the jump.
    pub at: u64,
    /// Member index.
    pub member: usize,
    /// Milliseconds the clock moved (negative: backward).
    pub delta_ms: i64,
}

/// How much earlier than its TTL (in ns of real time) a lease may be revoked when its
/// countdown ran within `[from, to]` (recorder ns): the largest total forward jump one
/// member's lease clock made in that window. Only the serving leader's clock counts
/// (etcd-semantics §5, the lessor's documented bound); which member served is not recorded,
/// so the worst member is taken. Backward jumps only delay an expiry.
pub fn early_expiry_allowance(jumps: &[ClockJump], from: u64, to: u64) -> u64 {
    let mut per_member: std::collections::BTreeMap<usize, u64> = Default::default();
    for j in jumps.iter().filter(|j| j.at >= from && j.at <= to) {
        if j.delta_ms > 0 {
            *per_member.entry(j.member).or_default() += j.delta_ms.unsigned_abs() * 1_000_000;
        }
    }
    per_member.into_values().max().unwrap_or(0)
}

/// The life of one lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLife {
    /// Lease id.
    pub id: i64,
    /// TTL in seconds.
    pub ttl: i64,
    /// Steps in order.
    pub steps: Vec<LeaseStep>,
}

/// Runs one lease client until `stop`, appending every completed lease life to `log`.
pub async fn lease_client(
    client: usize,
    endpoints: Vec<String>,
    rec: Recorder,
    log: std::sync::Arc<std::sync::Mutex<Vec<LeaseLife>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut member = client % endpoints.len();
    let timeout = Duration::from_millis(1500);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let ch = channel(&endpoints[member])?;
        let mut leases = LeaseClient::new(ch.clone());
        let mut kv = KvClient::new(ch);
        let key = format!("{LEASE_PREFIX}{client}-{n}").into_bytes();
        let call = rec.now();
        let granted = tokio::time::timeout(timeout, async {
            let id = leases
                .lease_grant(LeaseGrantRequest {
                    ttl: LEASE_TTL_SECS,
                    id: 0,
                })
                .await?
                .into_inner()
                .id;
            kv.put(PutRequest {
                key: key.clone(),
                value: b"leased".to_vec(),
                lease: id,
                ..Default::default()
            })
            .await?;
            Ok::<i64, tonic::Status>(id)
        })
        .await;
        let Ok(Ok(id)) = granted else {
            // Unknown outcome: this lease is not followed (it expires on its own).
            member = (member + 1) % endpoints.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut life = LeaseLife {
            id,
            ttl: LEASE_TTL_SECS,
            steps: vec![LeaseStep::Granted { call }],
        };
        let mut last_renewal = call;
        let mut gone = false;
        for _ in 0..RENEWALS {
            if stop.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            let call = rec.now();
            let ka = tokio::time::timeout(timeout, keep_alive(&mut leases, id)).await;
            let ret = rec.now();
            match ka {
                Ok(Ok(ttl)) if ttl > 0 => {
                    life.steps.push(LeaseStep::Renewed { call, ret });
                    last_renewal = call;
                }
                Ok(Ok(_)) => {
                    life.steps.push(LeaseStep::Gone { call, ret });
                    gone = true;
                    break;
                }
                _ => {}
            }
            let call = rec.now();
            let read = tokio::time::timeout(
                timeout,
                kv.range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }),
            )
            .await;
            let ret = rec.now();
            if let Ok(Ok(r)) = read {
                life.steps.push(LeaseStep::Read {
                    call,
                    ret,
                    present: !r.into_inner().kvs.is_empty(),
                });
            }
        }
        if !gone && !stop.is_cancelled() {
            // Let it lapse; the leader must revoke it (a leader change restarts the TTL).
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(3 * LEASE_TTL_SECS as u64 + 6);
            let mut gone_at = None;
            while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let read = tokio::time::timeout(
                    timeout,
                    kv.range(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }),
                )
                .await;
                if let Ok(Ok(r)) = read
                    && r.into_inner().kvs.is_empty()
                {
                    gone_at = Some(rec.now());
                    break;
                }
            }
            if gone_at.is_some() || !stop.is_cancelled() {
                life.steps.push(LeaseStep::Expired {
                    last_renewal,
                    gone_at,
                });
            }
        }
        if stop.is_cancelled() && !gone {
            // Leave no lease behind to expire while members are compared.
            let _ = tokio::time::timeout(
                timeout,
                leases.lease_revoke(store::pb::etcdserverpb::LeaseRevokeRequest { id }),
            )
            .await;
        }
        log.lock().unwrap_or_else(|p| p.into_inner()).push(life);
    }
    Ok(())
}

/// Waits (up to `within`) until the cluster at `endpoint` holds no lease, so that no
/// revocation changes members while they are compared.
pub async fn wait_no_leases(endpoint: &str, within: Duration) -> anyhow::Result<()> {
    let mut leases = LeaseClient::new(channel(endpoint)?);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            leases.lease_leases(store::pb::etcdserverpb::LeaseLeasesRequest {}),
        )
        .await;
        if let Ok(Ok(r)) = r
            && r.into_inner().leases.is_empty()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("leases still live {within:?} after the workload stopped");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn keep_alive(
    leases: &mut LeaseClient<tonic::transport::Channel>,
    id: i64,
) -> anyhow::Result<i64> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id }).await?;
    let mut stream = leases
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = stream
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("keep-alive stream ended"))?;
    Ok(resp.ttl)
}
