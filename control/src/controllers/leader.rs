//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does: when several servers run, only the holder of the Lease runs the scheduler (or the
//! controllers); the others wait and take over once the holder stops renewing.
//!
//! Expiry is judged by when this instance last *saw* the Lease change (not by the timestamp in
//! it), so clocks need not agree.
use std::future::Future;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{ApiClient, ClientError};

/// Leader election settings (client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry).
#[derive(Debug, Clone)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease (`kube-scheduler`, `kube-controller-manager`).
    pub name: String,
    /// This instance's identity.
    pub identity: String,
    /// How long a Lease not renewed stays valid.
    pub lease_duration: Duration,
    /// The leader gives up if it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// Defaults for Lease `kube-system/name` held as `identity`.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderElectionConfig {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

struct Elector {
    client: ApiClient,
    cfg: LeaderElectionConfig,
    /// (holder, renewTime) last seen, and when it was first seen.
    observed: Option<((String, String), Instant)>,
}

fn micro_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Elector {
    fn path(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
            self.cfg.namespace, self.cfg.name
        )
    }

    /// One attempt: `Ok(true)` if we hold the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, ClientError> {
        let now = micro_now();
        let secs = self.cfg.lease_duration.as_secs().max(1);
        let Some(mut lease) = self.client.get(&self.path()).await? else {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.cfg.name, "namespace": self.cfg.namespace},
                "spec": {"holderIdentity": self.cfg.identity, "leaseDurationSeconds": secs,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            });
            let path = format!(
                "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
                self.cfg.namespace
            );
            return match self.client.create(&path, &lease).await {
                Ok(_) => Ok(true),
                Err(e) if e.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = |f: &str| {
            lease
                .pointer(&format!("/spec/{f}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let record = (spec("holderIdentity"), spec("renewTime"));
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record.clone(), at));
                at
            }
        };
        let mine = record.0 == self.cfg.identity;
        let free = record.0.is_empty() || seen_at.elapsed() > self.cfg.lease_duration;
        if !mine && !free {
            return Ok(false);
        }
        if !mine {
            let transitions = lease
                .pointer("/spec/leaseTransitions")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            lease["spec"]["leaseTransitions"] = json!(transitions + 1);
            lease["spec"]["acquireTime"] = json!(now);
        }
        lease["spec"]["holderIdentity"] = json!(self.cfg.identity);
        lease["spec"]["leaseDurationSeconds"] = json!(secs);
        lease["spec"]["renewTime"] = json!(now);
        match self.client.update(&self.path(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up so another instance need not wait for it to expire.
    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.client.get(&self.path()).await
            && lease
                .pointer("/spec/holderIdentity")
                .and_then(Value::as_str)
                == Some(self.cfg.identity.as_str())
        {
            lease["spec"]["holderIdentity"] = json!("");
            let _ = self.client.update(&self.path(), &lease).await;
        }
    }
}

/// Runs `work` only while this instance holds the Lease, until `shutdown`. `work` gets a token
/// cancelled when leadership is lost (it is started again on re-election).
pub async fn run_as_leader<F, Fut>(
    client: ApiClient,
    cfg: LeaderElectionConfig,
    shutdown: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let retry = cfg.retry_period;
    let mut e = Elector {
        client,
        cfg,
        observed: None,
    };
    loop {
        // Candidate: try until we hold the Lease.
        loop {
            match e.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => {
                    tracing::debug!(lease = %e.cfg.name, error = %err, "leader election attempt failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(lease = %e.cfg.name, identity = %e.cfg.identity, "became leader");
        let lead = shutdown.child_token();
        let mut task = tokio::spawn(work(lead.clone()));
        let mut last_renew = Instant::now();
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = &mut task => {
                    // The work ended on its own (its shutdown): nothing left to lead.
                    e.release().await;
                    return;
                }
                _ = tokio::time::sleep(retry) => {}
            }
            match e.try_acquire_or_renew().await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => break true,
                Err(_) if last_renew.elapsed() > e.cfg.renew_deadline => break true,
                Err(_) => {}
            }
        };
        lead.cancel();
        let _ = task.await;
        if !lost {
            e.release().await;
            return;
        }
        tracing::warn!(lease = %e.cfg.name, "lost leadership");
    }
}
