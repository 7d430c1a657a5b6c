//! Leader election through a Lease: one of two candidates acts; when it stops, the other
//! takes over.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use control::controllers::leader::{LeaderElectionConfig, run_as_leader};
use tests::{Cluster, ClusterOptions, eventually};
use tokio_util::sync::CancellationToken;

use super::{WAIT, init_tracing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover() -> anyhow::Result<()> {
    init_tracing();
    let c = Cluster::start(ClusterOptions::default()).await?;
    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for id in ["a", "b"] {
        let mut cfg = LeaderElectionConfig::new("e2e-lease", id);
        cfg.lease_duration = Duration::from_secs(2);
        cfg.renew_deadline = Duration::from_millis(1500);
        cfg.retry_period = Duration::from_millis(100);
        let stop = CancellationToken::new();
        let (active, max_active) = (active.clone(), max_active.clone());
        tasks.push(tokio::spawn(run_as_leader(
            c.admin.clone(),
            cfg,
            stop.clone(),
            move |lead| {
                let (active, max_active) = (active.clone(), max_active.clone());
                async move {
                    let n = active.fetch_add(1, Ordering::SeqCst) + 1;
                    max_active.fetch_max(n, Ordering::SeqCst);
                    lead.cancelled().await;
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            },
        )));
        stops.push(stop);
    }
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/e2e-lease";
    let holder = |l: &serde_json::Value| {
        l.pointer("/spec/holderIdentity")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let first = eventually("a leader", WAIT, || async {
        let l = c.admin.get(lease_path).await?.unwrap_or_default();
        let h = holder(&l);
        Ok(if active.load(Ordering::SeqCst) == 1 && !h.is_empty() {
            Ok(h)
        } else {
            Err(h)
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(max_active.load(Ordering::SeqCst), 1, "never two leaders");
    // Stop the leader: the other candidate takes over.
    let idx = usize::from(first == "b");
    stops[idx].cancel();
    let second = eventually("the other candidate leads", WAIT, || async {
        let l = c.admin.get(lease_path).await?.unwrap_or_default();
        let h = holder(&l);
        Ok(
            if !h.is_empty() && h != first && active.load(Ordering::SeqCst) == 1 {
                Ok(h)
            } else {
                Err(h)
            },
        )
    })
    .await?;
    assert_ne!(first, second);
    assert_eq!(max_active.load(Ordering::SeqCst), 1, "never two leaders");
    for s in &stops {
        s.cancel();
    }
    for t in tasks {
        t.await?;
    }
    c.stop().await;
    Ok(())
}
