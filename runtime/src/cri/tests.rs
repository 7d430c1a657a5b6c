//! `CriRuntime` against `FakeCriServer` over a Unix socket in a tempdir.
use std::time::Duration;

use api::pod::{Container, PodSpec};
use tonic::Code;

use super::fake::{FakeCriBehavior, FakeCriServer};
use super::*;
use crate::testing::conformance::{self, Fixtures, wait_for_status};

struct Harness {
    fake: FakeCriServer,
    rt: CriRuntime,
    dir: tempfile::TempDir,
}

const BUSYBOX: &str = "localhost/busybox:v1";

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

async fn harness_with(f: impl FnOnce(&mut CriRuntimeConfig)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeCriServer::start(&dir.path().join("cri.sock"))
        .await
        .expect("fake CRI server");
    fake.add_image(BUSYBOX, FakeCriBehavior::RunForever);
    let mut cfg = CriRuntimeConfig::new(fake.endpoint(), dir.path().join("root"));
    cfg.instance = "node-a".into();
    f(&mut cfg);
    let rt = CriRuntime::connect(cfg).await.expect("connect");
    Harness { fake, rt, dir }
}

fn exit(code: i32, stdout: &str, reason: &str) -> FakeCriBehavior {
    FakeCriBehavior::Exit {
        code,
        after: Duration::from_millis(5),
        stdout: stdout.into(),
        reason: reason.into(),
    }
}

fn container(name: &str, image: &str) -> Container {
    Container {
        name: name.into(),
        image: image.into(),
        ..Container::default()
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

#[tokio::test]
async fn passes_conformance_against_the_fake() {
    let h = harness().await;
    h.fake.add_image("localhost/exit3:v1", exit(3, "", ""));
    h.fake
        .add_image("localhost/hello:v1", exit(0, "hello from cri\n", ""));
    let fixtures = Fixtures {
        long_running: container("sleeper", BUSYBOX),
        exits_3: container("exit3", "localhost/exit3:v1"),
        hello: container("hello", "localhost/hello:v1"),
    };
    conformance::run_all(&h.rt, &fixtures).await;
    assert_eq!(h.fake.counts(), (0, 0), "everything removed");
    assert!(h.rt.list_pods().await.unwrap().is_empty());
}

#[tokio::test]
async fn connect_reports_version_and_rejects_bad_endpoints() {
    let h = harness().await;
    assert_eq!(h.rt.version().runtime_name, "fake-cri");
    assert_eq!(h.rt.version().runtime_api_version, "v1");
    assert_eq!(h.rt.name(), "cri");
    let conditions = h.rt.conditions().await.expect("Status");
    assert!(
        conditions.contains(&("RuntimeReady".into(), true, String::new())),
        "{conditions:?}"
    );

    let missing = CriRuntimeConfig::new(
        format!("unix://{}", h.dir.path().join("nothing.sock").display()),
        h.dir.path(),
    );
    let err = CriRuntime::connect(missing).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Transient(_)), "{err:?}");
    assert!(err.to_string().contains("nothing.sock"), "{err}");

    let relative = CriRuntimeConfig::new("unix://containerd.sock", h.dir.path());
    assert!(matches!(
        CriRuntime::connect(relative).await,
        Err(RuntimeError::Config(_))
    ));
    assert_eq!(
        socket_path("/run/c.sock").unwrap(),
        PathBuf::from("/run/c.sock")
    );
}

#[tokio::test]
async fn run_pod_sends_the_mapped_configs() {
    let h = harness_with(|c| c.cgroup_root = Some("/flotilla".into())).await;
    let mut c = container("main", BUSYBOX);
    c.command = vec!["/bin/sh".into(), "-c".into()];
    c.args = vec!["sleep 1000".into()];
    c.resources.limits = [
        ("memory".to_owned(), "32Mi".to_owned()),
        ("cpu".to_owned(), "100m".to_owned()),
    ]
    .into();
    let p = pod("mapped", vec![c]).with_annotation("team", "a");
    let id = h.rt.run_pod(&p).await.expect("run");

    let sb = h.fake.sandbox_configs().pop().expect("sandbox");
    assert_eq!(sb.hostname, "");
    assert_eq!(sb.annotations["team"], "a");
    assert_eq!(sb.labels[convert::LABEL_INSTANCE], "node-a");
    assert_eq!(
        sb.linux.unwrap().cgroup_parent,
        "/flotilla/burstable/poduid_mapped"
    );
    assert!(std::path::Path::new(&sb.log_directory).is_dir());
    let cc = h.fake.container_configs().pop().expect("container");
    assert_eq!(cc.args, ["sleep 1000"]);
    let res = cc.linux.unwrap().resources.unwrap();
    assert_eq!(
        (
            res.memory_limit_in_bytes,
            res.cpu_quota,
            res.cpu_period,
            res.cpu_shares
        ),
        (32 << 20, 10_000, 100_000, 102)
    );

    let calls = h.fake.calls();
    let order: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| {
            ["RunPodSandbox", "CreateContainer", "StartContainer"].contains(c)
                || c.starts_with("ImageStatus")
        })
        .collect();
    assert_eq!(
        order,
        [
            &format!("ImageStatus({BUSYBOX})") as &str,
            "RunPodSandbox",
            "CreateContainer",
            "StartContainer"
        ]
    );

    h.rt.stop_pod(&id, Duration::from_millis(1500))
        .await
        .expect("stop");
    assert!(
        h.fake
            .calls()
            .contains(&"StopContainer(timeout=2)".to_owned()),
        "grace rounded up to whole seconds: {:?}",
        h.fake.calls()
    );
    h.rt.remove_pod(&id).await.expect("remove");
    assert!(
        !std::path::Path::new(&sb.log_directory).exists(),
        "logs removed with the pod"
    );
}

#[tokio::test]
async fn failed_create_or_start_leaves_nothing_behind() {
    let h = harness().await;
    h.fake.fail_next(
        "StartContainer",
        Code::Unknown,
        "exec: \"/nope\": not found",
    );
    let err =
        h.rt.run_pod(&pod("bad-start", vec![container("c", BUSYBOX)]))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("/nope"), "{err}");
    assert_eq!(h.fake.counts(), (0, 0), "sandbox and container removed");

    // The second container's create fails: the first, already running, goes too.
    h.fake
        .fail_after("CreateContainer", 1, Code::Unknown, "disk full");
    let p = pod(
        "bad-create",
        vec![container("a", BUSYBOX), container("b", BUSYBOX)],
    );
    let err = h.rt.run_pod(&p).await.unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(h.fake.counts(), (0, 0));
    assert!(h.rt.list_pods().await.unwrap().is_empty());
}

#[tokio::test]
async fn images_follow_the_pull_policy() {
    let h = harness().await;
    // Absent and not pullable: ErrImagePull naming the image, nothing created.
    let err =
        h.rt.run_pod(&pod("nope", vec![container("c", "localhost/nothere:v1")]))
            .await
            .unwrap_err();
    match &err {
        RuntimeError::ImageNotFound { image, reason } => {
            assert_eq!(image, "localhost/nothere:v1");
            assert!(reason.starts_with("ErrImagePull"), "{reason}");
        }
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    assert!(err.to_string().contains("localhost/nothere:v1"));
    assert_eq!(h.fake.counts(), (0, 0));

    // Never: absent image is ErrImageNeverPull, no PullImage call.
    h.fake
        .add_pullable("localhost/lazy:v1", FakeCriBehavior::RunForever);
    let never = pod("never", vec![container("c", "localhost/lazy:v1")])
        .with_annotation(convert::ANNOTATION_PULL_POLICY, "Never");
    let err = h.rt.run_pod(&never).await.unwrap_err();
    assert!(err.to_string().contains("ErrImageNeverPull"), "{err}");
    assert!(
        !h.fake
            .calls()
            .iter()
            .any(|c| c == "PullImage(localhost/lazy:v1)")
    );

    // IfNotPresent: pulled once, then found.
    let p = pod("lazy", vec![container("c", "localhost/lazy:v1")]);
    let id = h.rt.run_pod(&p).await.expect("run after pull");
    assert!(h.fake.has_image("localhost/lazy:v1"));
    h.rt.remove_pod(&id).await.unwrap();
    let id = h.rt.run_pod(&p).await.expect("run again");
    h.rt.remove_pod(&id).await.unwrap();
    let pulls = h
        .fake
        .calls()
        .iter()
        .filter(|c| c.as_str() == "PullImage(localhost/lazy:v1)")
        .count();
    assert_eq!(pulls, 1);

    // Always (":latest"): pulled every time, even when present.
    h.fake
        .add_pullable("localhost/edge:latest", FakeCriBehavior::RunForever);
    for _ in 0..2 {
        let id =
            h.rt.run_pod(&pod("edge", vec![container("c", "localhost/edge:latest")]))
                .await
                .expect("run");
        h.rt.remove_pod(&id).await.unwrap();
    }
    let pulls = h
        .fake
        .calls()
        .iter()
        .filter(|c| c.as_str() == "PullImage(localhost/edge:latest)")
        .count();
    assert_eq!(pulls, 2);
}

#[tokio::test]
async fn oom_reason_and_exec_and_stats() {
    let h = harness().await;
    h.fake
        .add_image("localhost/hog:v1", exit(137, "", "OOMKilled"));
    let id =
        h.rt.run_pod(&pod(
            "pair",
            vec![
                container("hog", "localhost/hog:v1"),
                container("web", BUSYBOX),
            ],
        ))
        .await
        .expect("run");
    let s = wait_for_status(&h.rt, &id, Duration::from_secs(10), |s| {
        s.containers[0].state.is_terminated()
    })
    .await;
    let t = s.containers[0].state.terminated().unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
    assert!(t.finished_at.is_some());
    assert_eq!(s.containers[1].name, "web");
    assert_eq!(s.containers[1].image, BUSYBOX);

    let out =
        h.rt.exec_sync(
            &id,
            "web",
            vec!["echo".into(), "hi".into()],
            Duration::from_secs(5),
        )
        .await
        .expect("exec");
    assert_eq!(
        (out.exit_code, out.stdout.as_slice()),
        (0, &b"echo hi\n"[..])
    );
    assert!(matches!(
        h.rt.exec_sync(&id, "nope", vec![], Duration::ZERO).await,
        Err(RuntimeError::ContainerNotFound { .. })
    ));
    assert!(matches!(
        h.rt.exec_sync(&PodId("ghost".into()), "web", vec![], Duration::ZERO)
            .await,
        Err(RuntimeError::NotFound(_))
    ));

    let stats = h.rt.stats(&id).await.expect("stats");
    assert_eq!(stats.containers.len(), 2);
    assert_eq!(stats.containers[1].memory_bytes, 1 << 20);
    assert_eq!(stats.containers[0].cpu_ns, 0, "exited container");
    assert!(stats.containers[1].start_latency.is_some(), "{stats:?}");
    h.rt.remove_pod(&id).await.unwrap();
}

#[tokio::test]
async fn a_new_agent_adopts_running_pods_and_ignores_other_instances() {
    let h = harness().await;
    let id =
        h.rt.run_pod(&pod("survivor", vec![container("c", BUSYBOX)]))
            .await
            .expect("run");
    // An agent restart: a new client, same instance name.
    let mut cfg = h.rt.config().clone();
    let again = CriRuntime::connect(cfg.clone()).await.expect("reconnect");
    let listed = again.list_pods().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].name, "survivor");
    assert_eq!(listed[0].state, SandboxState::Ready);
    assert!(listed[0].containers[0].state.is_running());

    // Another node sharing the runtime sees nothing and cannot touch it.
    cfg.instance = "node-b".into();
    let other = CriRuntime::connect(cfg).await.expect("connect");
    assert!(other.list_pods().await.unwrap().is_empty());
    assert!(matches!(
        other.pod_status(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
    other.remove_pod(&id).await.expect("no-op");
    assert!(again.pod_status(&id).await.is_ok(), "still there");

    // Orphan cleanup keeps what is named and removes the rest.
    let keep = again
        .run_pod(&pod("keeper", vec![container("c", BUSYBOX)]))
        .await
        .unwrap();
    let removed = again
        .remove_orphans(std::slice::from_ref(&keep))
        .await
        .unwrap();
    assert_eq!(removed, vec![id]);
    assert_eq!(again.list_pods().await.unwrap().len(), 1);
    again.remove_pod(&keep).await.unwrap();
}

#[tokio::test]
async fn reruns_of_a_pod_get_a_new_attempt() {
    let h = harness().await;
    let p = pod("again", vec![container("c", BUSYBOX)]);
    let first = h.rt.run_pod(&p).await.unwrap();
    h.rt.stop_pod(&first, Duration::ZERO).await.unwrap();
    // Stopped but not removed: the same metadata would collide on the sandbox name.
    let second = h.rt.run_pod(&p).await.expect("rerun with attempt 1");
    let attempts: Vec<u32> = h
        .fake
        .sandbox_configs()
        .iter()
        .map(|s| s.metadata.as_ref().unwrap().attempt)
        .collect();
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts.contains(&0) && attempts.contains(&1),
        "{attempts:?}"
    );
    h.rt.remove_pod(&first).await.unwrap();
    h.rt.remove_pod(&second).await.unwrap();
}

#[tokio::test]
async fn runtime_errors_map_to_kinds() {
    let h = harness().await;
    h.fake
        .fail_next("ListPodSandbox", Code::Unavailable, "containerd restarting");
    assert!(matches!(
        h.rt.list_pods().await,
        Err(RuntimeError::Transient(_))
    ));
    h.fake.fail_next("PodSandboxStatus", Code::Internal, "boom");
    let err = h.rt.pod_status(&PodId("x".into())).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Internal(_)), "{err:?}");
    assert!(err.to_string().contains("PodSandboxStatus"), "{err}");
    let err =
        h.rt.run_pod(&pod("init", PodSpec::default().containers))
            .await
            .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidSpec(_)));
    let err =
        h.rt.run_pod(&pod(
            "twins",
            vec![container("c", BUSYBOX), container("c", BUSYBOX)],
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("repeated"), "{err}");
    assert_eq!(h.fake.counts(), (0, 0));
    let mut with_init = pod("init", vec![container("c", BUSYBOX)]);
    with_init.spec.init_containers = vec![container("i", BUSYBOX)];
    assert!(matches!(
        h.rt.run_pod(&with_init).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
}

#[tokio::test]
async fn any_runtime_dispatches_to_cri() {
    let h = harness().await;
    let any = crate::AnyRuntime::Cri(h.rt.clone());
    assert_eq!(any.name(), "cri");
    conformance::unknown_ids(&any).await;
    let id = any
        .run_pod(&pod("via-any", vec![container("c", BUSYBOX)]))
        .await
        .expect("run");
    assert_eq!(h.rt.pod_status(&id).await.unwrap().name, "via-any");
    assert_eq!(h.rt.pod_ip(&id).await.unwrap(), None, "host network");
    any.remove_pod(&id).await.unwrap();
    assert_eq!(h.fake.counts(), (0, 0));
}

#[tokio::test]
async fn stop_tolerates_a_container_exiting_during_the_kill() {
    let h = harness().await;
    h.fake.add_image(
        "localhost/brief:v1",
        FakeCriBehavior::Exit {
            code: 0,
            after: Duration::from_millis(300),
            stdout: String::new(),
            reason: String::new(),
        },
    );
    let id =
        h.rt.run_pod(&pod("brief", vec![container("c", "localhost/brief:v1")]))
            .await
            .unwrap();
    // containerd fails the kill of a task that has just exited.
    h.fake.fail_next(
        "StopContainer",
        Code::Unknown,
        "failed to kill container: ttrpc: closed",
    );
    h.rt.stop_pod(&id, Duration::from_secs(1))
        .await
        .expect("stop succeeds once the container is seen exited");
    let st = h.rt.pod_status(&id).await.unwrap();
    let t = st.containers[0].state.terminated().unwrap();
    assert_eq!(t.exit_code, 0, "ended by itself, not killed: {t:?}");

    // A container that keeps running after a failed kill is stopped by the retry.
    let id2 =
        h.rt.run_pod(&pod("stays", vec![container("c", BUSYBOX)]))
            .await
            .unwrap();
    h.fake
        .fail_next("StopContainer", Code::Unknown, "transient");
    h.rt.stop_pod(&id2, Duration::ZERO).await.expect("retried");
    assert!(h.rt.pod_status(&id2).await.unwrap().all_terminated());
    h.rt.remove_pod(&id).await.unwrap();
    h.rt.remove_pod(&id2).await.unwrap();
}

#[tokio::test]
async fn security_context_policy_field_and_handler_reach_the_runtime() {
    use api::pod::{PodSecurityContext, PullPolicy, SecurityContext};
    let h = harness().await;

    // runAsNonRoot with an image that runs as root (the fake's images have no user): refused
    // before anything is created, as the kubelet's CreateContainerConfigError.
    let mut c = container("c", BUSYBOX);
    c.security_context = Some(SecurityContext {
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    });
    let err =
        h.rt.run_pod(&pod("rootish", vec![c.clone()]))
            .await
            .unwrap_err();
    assert!(
        matches!(&err, RuntimeError::InvalidSpec(m) if m.contains("image will run as root")),
        "{err:?}"
    );
    assert_eq!(h.fake.counts(), (0, 0));
    // The same with a pod-level non-root UID runs, with that UID.
    let mut p = pod("nonroot", vec![c]);
    p.spec.security_context = Some(PodSecurityContext {
        run_as_user: Some(1000),
        ..PodSecurityContext::default()
    });
    let id = h.rt.run_pod(&p).await.expect("non-root UID");
    let cc = h.fake.container_configs().pop().expect("container");
    let sc = cc.linux.unwrap().security_context.unwrap();
    assert_eq!(sc.run_as_user, Some(pb::Int64Value { value: 1000 }));
    // Running the same pod again while its sandbox runs adopts it instead of doubling it.
    assert_eq!(h.rt.run_pod(&p).await.expect("adopt"), id);
    assert_eq!(h.fake.counts(), (1, 1));
    h.rt.remove_pod(&id).await.unwrap();

    // privileged: the sandbox too; the handler from the pod's RuntimeClass.
    let mut c = container("c", BUSYBOX);
    c.security_context = Some(SecurityContext {
        privileged: Some(true),
        ..SecurityContext::default()
    });
    let p = pod("priv", vec![c]).with_annotation(convert::ANNOTATION_RUNTIME_HANDLER, "runc");
    let id = h.rt.run_pod(&p).await.expect("privileged");
    let sb = h.fake.sandbox_configs().pop().expect("sandbox");
    assert!(sb.linux.unwrap().security_context.unwrap().privileged);
    let cc = h.fake.container_configs().pop().expect("container");
    assert!(cc.linux.unwrap().security_context.unwrap().privileged);
    assert_eq!(h.fake.sandbox_handlers(), ["runc"]);
    h.rt.remove_pod(&id).await.unwrap();

    // imagePullPolicy as a field: Never does not pull a pullable, absent image.
    h.fake
        .add_pullable("localhost/later:v1", FakeCriBehavior::RunForever);
    let mut c = container("c", "localhost/later:v1");
    c.image_pull_policy = Some(PullPolicy::Never);
    let err = h.rt.run_pod(&pod("never", vec![c])).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::ImageNotFound { reason, .. }
            if reason == "ErrImageNeverPull: Container image \"localhost/later:v1\" is not present with pull policy of Never"),
        "{err:?}"
    );
    assert!(!h.fake.has_image("localhost/later:v1"));
}
