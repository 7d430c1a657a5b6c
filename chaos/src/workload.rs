//! The concurrent client workload: puts, create-if-absent / compare-and-set Txns, linearizable
//! and serializable reads over a few keys, plus watchers that resume after errors.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::request_op::Request as OpRequest;
use store::pb::etcdserverpb::watch_client::WatchClient;
use store::pb::etcdserverpb::watch_request::RequestUnion;
use store::pb::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::history::{Input, Operation, Output, Recorder};

/// Prefix of every key the workload touches.
pub const PREFIX: &str = "fk/";

/// Workload shape.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Concurrent clients.
    pub clients: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Pause between a client's operations.
    pub think: Duration,
    /// Per-request deadline; a write that misses it has an unknown outcome.
    pub timeout: Duration,
    /// Retry a write whose outcome is unknown once, unchanged, on the next member (F18: what a
    /// client library's retry does; both attempts are recorded).
    pub retry_unknown_writes: bool,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            clients: 4,
            keys: 6,
            think: Duration::from_millis(15),
            timeout: Duration::from_millis(1500),
            retry_unknown_writes: false,
        }
    }
}

/// Opens a lazily connecting channel.
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy())
}

fn key(i: usize) -> String {
    format!("{PREFIX}{i}")
}

/// Runs one client until `stop`; `endpoints` are tried in turn starting at `first`, moving on
/// after each failure.
pub async fn client(
    id: u64,
    endpoints: Vec<String>,
    first: usize,
    cfg: WorkloadConfig,
    rec: Recorder,
    seed: u64,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ (id.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut member = first % endpoints.len();
    let mut kv = KvClient::new(channel(&endpoints[member])?);
    let mut seen: HashMap<String, Option<String>> = HashMap::new();
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        seq += 1;
        let k = key(rng.random_range(0..cfg.keys));
        let value = format!("c{id}-{seq}");
        let roll = rng.random_range(0..100);
        let input = if roll < 35 {
            Input::Put { key: k, value }
        } else if roll < 55 {
            let expect = seen.get(&k).cloned().flatten();
            Input::Cas {
                key: k,
                expect,
                value,
            }
        } else {
            Input::Get {
                key: k,
                serializable: roll >= 85,
            }
        };
        let mut attempts = if cfg.retry_unknown_writes && input.written().is_some() {
            2
        } else {
            1
        };
        while attempts > 0 {
            attempts -= 1;
            let call = rec.now();
            let res = tokio::time::timeout(cfg.timeout, execute(&mut kv, &input)).await;
            let output = match res {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => Output::Unknown {
                    error: e.to_string(),
                },
                Err(_) => Output::Unknown {
                    error: format!("timed out after {:?}", cfg.timeout),
                },
            };
            let ret = rec.now();
            if let Output::Get { value, .. } = &output {
                seen.insert(input.key().to_owned(), value.clone());
            }
            let failed = matches!(output, Output::Unknown { .. });
            rec.record(Operation {
                client: id,
                member,
                call,
                ret,
                input: input.clone(),
                output,
            });
            if !failed {
                break;
            }
            member = (member + 1) % endpoints.len();
            kv = KvClient::new(channel(&endpoints[member])?);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(cfg.think).await;
    }
    Ok(())
}

/// Reads every workload key linearizably through `kv` (connected to member `member`) and
/// records the reads, so the final state joins the history.
pub async fn final_reads(
    kv: &mut KvClient<Channel>,
    member: usize,
    keys: usize,
    rec: &Recorder,
) -> Result<(), tonic::Status> {
    for k in 0..keys {
        let input = Input::Get {
            key: key(k),
            serializable: false,
        };
        let call = rec.now();
        let output = execute(kv, &input).await?;
        rec.record(Operation {
            client: u64::MAX,
            member,
            call,
            ret: rec.now(),
            input,
            output,
        });
    }
    Ok(())
}

/// Sends one operation.
pub async fn execute(kv: &mut KvClient<Channel>, input: &Input) -> Result<Output, tonic::Status> {
    match input {
        Input::Put { key, value } => {
            let r = kv
                .put(PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(Output::Put {
                revision: r.header.map_or(0, |h| h.revision),
            })
        }
        Input::Get { key, serializable } => {
            let r = kv
                .range(RangeRequest {
                    key: key.clone().into_bytes(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let kv0 = r.kvs.first();
            Ok(Output::Get {
                value: kv0.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                mod_revision: kv0.map_or(0, |kv| kv.mod_revision),
                revision: r.header.map_or(0, |h| h.revision),
            })
        }
        Input::Cas { key, expect, value } => {
            let compare = match expect {
                None => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                },
                Some(v) => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::Value(v.clone().into_bytes())),
                    ..Default::default()
                },
            };
            let r = kv
                .txn(TxnRequest {
                    compare: vec![compare],
                    success: vec![RequestOp {
                        request: Some(OpRequest::RequestPut(PutRequest {
                            key: key.clone().into_bytes(),
                            value: value.clone().into_bytes(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                })
                .await?
                .into_inner();
            Ok(Output::Cas {
                succeeded: r.succeeded,
                revision: r.header.map_or(0, |h| h.revision),
            })
        }
    }
}

/// One event a watcher received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Mod revision.
    pub revision: i64,
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// What a watcher saw.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    /// Events in delivery order.
    pub events: Vec<WatchEvent>,
    /// `(last delivered, resumed at)` where a compaction forced the watcher to skip revisions.
    pub skips: Vec<(i64, i64)>,
    /// Stream errors that made it resume.
    pub resumes: u64,
}

/// Watches every key from revision 1, resuming (on the next member) after errors and from the
/// compaction point when its start was compacted, until it has seen `until` (set after the
/// workload) or `stop` fires. With `restart_every`, it also drops its stream on purpose that
/// often and resumes (racing compactions).
pub async fn watcher(
    endpoints: Vec<String>,
    first: usize,
    log: Arc<Mutex<WatchLog>>,
    until: Arc<std::sync::atomic::AtomicI64>,
    restart_every: Option<Duration>,
    stop: CancellationToken,
) {
    let mut member = first % endpoints.len();
    let mut next = 1i64;
    let done = |next: i64| {
        let u = until.load(std::sync::atomic::Ordering::Relaxed);
        u > 0 && next > u
    };
    while !stop.is_cancelled() && !done(next) {
        let attempt = async {
            let mut wc = WatchClient::new(channel(&endpoints[member])?);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(WatchRequest {
                // Every key: leases (and, on a live cluster, other clients) write outside
                // PREFIX, and contiguity of revisions can only be checked over all of them.
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    start_revision: next,
                    ..Default::default()
                })),
            })
            .await?;
            let mut stream = wc
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let restart_at = restart_every.map(|d| tokio::time::Instant::now() + d);
            loop {
                if restart_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    anyhow::bail!("planned restart");
                }
                let resp = tokio::select! {
                    r = stream.message() => r?,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        if stop.is_cancelled() || done(next) { return Ok(()); }
                        continue;
                    }
                };
                let Some(resp) = resp else {
                    anyhow::bail!("watch stream ended");
                };
                if resp.compact_revision > 0 {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.skips.push((next - 1, resp.compact_revision));
                    next = resp.compact_revision;
                    anyhow::bail!("compacted; resuming at {next}");
                }
                if resp.canceled {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason);
                }
                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                for ev in resp.events {
                    let Some(kv) = ev.kv else { continue };
                    next = next.max(kv.mod_revision + 1);
                    l.events.push(WatchEvent {
                        revision: kv.mod_revision,
                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                        value: String::from_utf8_lossy(&kv.value).into_owned(),
                    });
                }
                drop(l);
                if done(next) {
                    return Ok(());
                }
            }
            #[allow(unreachable_code, reason = "type of the async block")]
            Ok::<(), anyhow::Error>(())
        };
        if attempt.await.is_err() && !stop.is_cancelled() {
            log.lock().unwrap_or_else(|p| p.into_inner()).resumes += 1;
            member = (member + 1) % endpoints.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The `range_end` covering every key with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}
