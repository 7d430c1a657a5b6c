//! The [`PodRuntime`] contract as executable checks. Every implementation runs
//! [`run_all`] in its tests; a failed check panics with the rule it broke.
use std::time::{Duration, Instant};

use api::pod::{Container, PodSpec};

use super::{FakeBehavior, FakeRuntime};
use crate::pod_runtime::{PodConfig, PodId, PodRuntime, PodStatus, RuntimeError, SandboxState};

/// Containers with known behaviour, in the implementation's own image format.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// Keeps running until stopped.
    pub long_running: Container,
    /// Exits by itself with code 3.
    pub exits_3: Container,
    /// Writes a stdout line containing `hello` and exits 0.
    pub hello: Container,
}

impl Fixtures {
    /// Scripts `fake` with the three behaviours and returns matching fixtures.
    pub fn for_fake(fake: &FakeRuntime) -> Self {
        fake.script("fake/sleeper", FakeBehavior::RunForever);
        fake.script(
            "fake/exit3",
            FakeBehavior::Exit {
                code: 3,
                after: Duration::from_millis(5),
                stdout: String::new(),
            },
        );
        fake.script(
            "fake/hello",
            FakeBehavior::Exit {
                code: 0,
                after: Duration::from_millis(1),
                stdout: "hello from fake\n".into(),
            },
        );
        let c = |name: &str, image: &str| Container {
            name: name.into(),
            image: image.into(),
            ..Container::default()
        };
        Fixtures {
            long_running: c("sleeper", "fake/sleeper"),
            exits_3: c("exit3", "fake/exit3"),
            hello: c("hello", "fake/hello"),
        }
    }
}

fn pod(name: &str, containers: Vec<Container>) -> PodConfig {
    PodConfig::new(
        name,
        PodSpec {
            containers,
            ..PodSpec::default()
        },
    )
}

/// Polls `pod_status` until `pred` holds; panics after `timeout` with the last status.
pub async fn wait_for_status<R, F>(rt: &R, id: &PodId, timeout: Duration, pred: F) -> PodStatus
where
    R: PodRuntime,
    F: Fn(&PodStatus) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let status = rt.pod_status(id).await.expect("status of a live pod");
        if pred(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Runs every check against `rt`.
pub async fn run_all<R: PodRuntime>(rt: &R, fixtures: &Fixtures) {
    unknown_ids(rt).await;
    run_list_stop_remove(rt, fixtures).await;
    exit_codes_and_logs(rt, fixtures).await;
    multi_container(rt, fixtures).await;
    refuses_empty_pod(rt).await;
}

/// Unknown ids: status/logs/stats are NotFound, stop/remove succeed (idempotent).
pub async fn unknown_ids<R: PodRuntime>(rt: &R) {
    let ghost = PodId("no-such-pod".into());
    assert!(
        matches!(rt.pod_status(&ghost).await, Err(RuntimeError::NotFound(_))),
        "status"
    );
    assert!(
        matches!(rt.stats(&ghost).await, Err(RuntimeError::NotFound(_))),
        "stats"
    );
    assert!(
        matches!(rt.logs(&ghost, "c").await, Err(RuntimeError::NotFound(_))),
        "logs"
    );
    rt.stop_pod(&ghost, Duration::ZERO)
        .await
        .expect("stop of an unknown id is a no-op");
    rt.remove_pod(&ghost)
        .await
        .expect("remove of an unknown id is a no-op");
}

/// A running pod is listed, stops within its grace, stays listed until removed.
pub async fn run_list_stop_remove<R: PodRuntime>(rt: &R, f: &Fixtures) {
    let id = rt
        .run_pod(&pod("conf-long", vec![f.long_running.clone()]))
        .await
        .expect("run");
    let status = wait_for_status(rt, &id, WAIT, |s| s.containers[0].state.is_running()).await;
    assert_eq!(status.state, SandboxState::Ready);
    assert_eq!(status.name, "conf-long");
    let listed = rt.list_pods().await.expect("list");
    assert!(
        listed.iter().any(|p| p.id == id),
        "running pod missing from list"
    );

    let t0 = Instant::now();
    rt.stop_pod(&id, Duration::from_secs(2))
        .await
        .expect("stop");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop overran its grace period"
    );
    let status = rt.pod_status(&id).await.expect("status after stop");
    assert!(
        status.all_terminated(),
        "stop returned before containers ended: {status:?}"
    );
    assert_eq!(status.state, SandboxState::NotReady);
    rt.stop_pod(&id, Duration::ZERO)
        .await
        .expect("second stop is a no-op");
    let listed = rt.list_pods().await.expect("list");
    let entry = listed
        .iter()
        .find(|p| p.id == id)
        .expect("stopped pod stays listed");
    assert_eq!(entry.state, SandboxState::NotReady);

    rt.remove_pod(&id).await.expect("remove");
    rt.remove_pod(&id).await.expect("second remove is a no-op");
    assert!(matches!(
        rt.pod_status(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
    let listed = rt.list_pods().await.expect("list");
    assert!(
        !listed.iter().any(|p| p.id == id),
        "removed pod still listed"
    );

    // Remove without stop stops first.
    let id = rt
        .run_pod(&pod("conf-rm", vec![f.long_running.clone()]))
        .await
        .expect("run");
    rt.remove_pod(&id).await.expect("remove of a running pod");
    assert!(matches!(
        rt.pod_status(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
}

/// Exit codes are reported; stdout reaches the CRI log.
pub async fn exit_codes_and_logs<R: PodRuntime>(rt: &R, f: &Fixtures) {
    let id = rt
        .run_pod(&pod("conf-exit", vec![f.exits_3.clone()]))
        .await
        .expect("run");
    let status = wait_for_status(rt, &id, WAIT, PodStatus::all_terminated).await;
    let t = status.containers[0].state.terminated().expect("terminated");
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(status.state, SandboxState::NotReady);
    rt.remove_pod(&id).await.expect("remove");

    let id = rt
        .run_pod(&pod("conf-hello", vec![f.hello.clone()]))
        .await
        .expect("run");
    let status = wait_for_status(rt, &id, WAIT, PodStatus::all_terminated).await;
    let t = status.containers[0].state.terminated().expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    let logs = rt.logs(&id, &f.hello.name).await.expect("logs");
    let line = logs
        .lines()
        .find(|l| l.contains("hello"))
        .expect("hello line in logs");
    let mut parts = line.splitn(4, ' ');
    let ts = parts.next().expect("timestamp");
    assert!(
        ts.ends_with('Z') && ts.contains('T'),
        "timestamp {ts:?} is not RFC 3339"
    );
    assert_eq!(parts.next(), Some("stdout"));
    assert_eq!(parts.next(), Some("F"));
    assert!(matches!(
        rt.logs(&id, "no-such-container").await,
        Err(RuntimeError::ContainerNotFound { .. })
    ));
    let stats = rt.stats(&id).await.expect("stats");
    assert_eq!(stats.containers.len(), 1);
    rt.remove_pod(&id).await.expect("remove");
}

/// All containers of a pod run; the sandbox is Ready while any runs.
pub async fn multi_container<R: PodRuntime>(rt: &R, f: &Fixtures) {
    let mut a = f.long_running.clone();
    a.name = "a".into();
    let mut b = f.exits_3.clone();
    b.name = "b".into();
    let id = rt
        .run_pod(&pod("conf-multi", vec![a, b]))
        .await
        .expect("run");
    let status = wait_for_status(rt, &id, WAIT, |s| s.containers[1].state.is_terminated()).await;
    assert_eq!(status.containers.len(), 2);
    assert_eq!(status.containers[0].name, "a");
    assert!(status.containers[0].state.is_running(), "{status:?}");
    assert_eq!(status.state, SandboxState::Ready);
    rt.stop_pod(&id, Duration::from_secs(1))
        .await
        .expect("stop");
    assert!(rt.pod_status(&id).await.expect("status").all_terminated());
    rt.remove_pod(&id).await.expect("remove");
}

/// A pod without containers is an invalid spec.
pub async fn refuses_empty_pod<R: PodRuntime>(rt: &R) {
    let err = rt
        .run_pod(&pod("conf-empty", vec![]))
        .await
        .expect_err("empty pod refused");
    assert!(matches!(err, RuntimeError::InvalidSpec(_)), "{err:?}");
}
