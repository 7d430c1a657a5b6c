//! `CriRuntime` against a real containerd started by `scripts/containerd`.
//!
//! The socket comes from `FLOTILLA_CRI_SOCKET` (`export FLOTILLA_CRI_SOCKET=$(scripts/containerd)`).
//! Without it these tests print that they were skipped and pass, unless
//! `FLOTILLA_REQUIRE_CRI=1`, which makes them fail: CI sets both, so the real tier cannot be
//! skipped silently there. Images: `localhost/busybox:v1` (imported by the script).
use std::path::Path;
use std::time::{Duration, Instant};

use api::pod::{Container, PodSpec};
use runtime::cri::{CriRuntimeConfig, convert::ANNOTATION_PULL_POLICY};
use runtime::testing::conformance::{Fixtures, run_all, wait_for_status};
use runtime::{CriRuntime, PodConfig, PodRuntime, PodStatus, RuntimeError, SandboxState};

const BUSYBOX: &str = "localhost/busybox:v1";
const WAIT: Duration = Duration::from_secs(60);
const CGROUP_ROOT: &str = "/flotilla-it";

/// Tests share one containerd; they run one at a time so timings mean something.
static CRI_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cri_socket(test: &str) -> Option<String> {
    match std::env::var("FLOTILLA_CRI_SOCKET") {
        Ok(s) if !s.is_empty() => Some(s),
        _ => {
            assert!(
                std::env::var("FLOTILLA_REQUIRE_CRI").as_deref() != Ok("1"),
                "FLOTILLA_REQUIRE_CRI=1 but FLOTILLA_CRI_SOCKET is not set; start containerd \
                 with `export FLOTILLA_CRI_SOCKET=$(scripts/containerd)`"
            );
            eprintln!(
                "skipped {test}: FLOTILLA_CRI_SOCKET is not set (run \
                 `export FLOTILLA_CRI_SOCKET=$(scripts/containerd)` to include it)"
            );
            None
        }
    }
}

struct Node {
    rt: CriRuntime,
    _root: tempfile::TempDir,
}

/// A runtime with its own instance label and root, after removing what an earlier (crashed)
/// run of the same test left behind.
async fn node(socket: &str, test: &str) -> Node {
    let root = tempfile::tempdir().expect("root tempdir");
    let mut cfg = CriRuntimeConfig::new(socket, root.path());
    cfg.instance = format!("it-{test}");
    cfg.cgroup_root = Some(CGROUP_ROOT.into());
    let rt = CriRuntime::connect(cfg)
        .await
        .expect("connect to containerd");
    let leftovers = rt.remove_orphans(&[]).await.expect("clean leftovers");
    if !leftovers.is_empty() {
        eprintln!("removed {} leftover sandboxes", leftovers.len());
    }
    Node { rt, _root: root }
}

fn sh(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        image: BUSYBOX.into(),
        command: vec!["/bin/sh".into(), "-c".into()],
        args: vec![script.into()],
        ..Container::default()
    }
}

fn with_limits(mut c: Container, limits: &[(&str, &str)]) -> Container {
    c.resources.limits = limits
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    c
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

async fn wait_done(rt: &CriRuntime, id: &runtime::PodId) -> PodStatus {
    wait_for_status(rt, id, WAIT, PodStatus::all_terminated).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_passes_conformance() {
    let Some(socket) = cri_socket("containerd_passes_conformance") else {
        return;
    };
    let _cpu = crate::CPU_LOCK.read().await;
    let _one = CRI_LOCK.lock().await;
    let n = node(&socket, "conformance").await;
    assert_eq!(n.rt.version().runtime_api_version, "v1");
    let fixtures = Fixtures {
        // PID 1 ignores SIGTERM: stop takes the grace period, then SIGKILL.
        long_running: Container {
            name: "sleeper".into(),
            image: BUSYBOX.into(),
            command: vec!["sleep".into(), "3600".into()],
            ..Container::default()
        },
        exits_3: sh("exit3", "exit 3"),
        hello: sh("hello", "echo hello from busybox"),
    };
    run_all(&n.rt, &fixtures).await;
    assert!(n.rt.list_pods().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_busybox_end_to_end() {
    let Some(socket) = cri_socket("containerd_runs_busybox_end_to_end") else {
        return;
    };
    let _cpu = crate::CPU_LOCK.read().await;
    let _one = CRI_LOCK.lock().await;
    let n = node(&socket, "scenario").await;
    let rt = &n.rt;

    // --- prints to stdout and stderr, exits with a code
    let id = rt
        .run_pod(&pod(
            "printer",
            vec![sh("main", "echo out line; echo err line >&2; exit 7")],
        ))
        .await
        .expect("run printer");
    let st = wait_done(rt, &id).await;
    let t = st.containers[0].state.terminated().expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (7, Some("Error")));
    assert!(t.started_at.is_some() && t.finished_at.is_some(), "{t:?}");
    assert_eq!(st.state, SandboxState::NotReady);
    let logs = rt.logs(&id, "main").await.expect("logs");
    assert!(logs.contains(" stdout F out line\n"), "{logs}");
    assert!(logs.contains(" stderr F err line\n"), "{logs}");
    rt.remove_pod(&id).await.expect("remove");

    // --- a start that fails half-way (second container's command does not exist) leaves
    // no sandbox, container or pod cgroup behind
    let err = rt
        .run_pod(&pod(
            "halfway",
            vec![
                sh("fine", "sleep 3600"),
                Container {
                    name: "broken".into(),
                    image: BUSYBOX.into(),
                    command: vec!["/nope".into()],
                    ..Container::default()
                },
            ],
        ))
        .await
        .expect_err("start of /nope fails");
    assert!(err.to_string().contains("/nope"), "{err}");
    assert!(rt.list_pods().await.expect("list").is_empty());
    let halfway_cgroup = Path::new("/sys/fs/cgroup/memory").join(
        runtime::cri::convert::cgroup_parent(
            CGROUP_ROOT,
            api::pod::QosClass::BestEffort,
            "uid-halfway",
        )
        .trim_start_matches('/'),
    );
    assert!(
        !halfway_cgroup.exists(),
        "{} left behind",
        halfway_cgroup.display()
    );

    // --- over its memory limit: OOMKilled
    let id = rt
        .run_pod(&pod(
            "hog",
            vec![with_limits(
                sh("hog", "exec dd if=/dev/zero of=/dev/null bs=100M count=1"),
                &[("memory", "32Mi")],
            )],
        ))
        .await
        .expect("run hog");
    let st = wait_done(rt, &id).await;
    let t = st.containers[0].state.terminated().expect("terminated");
    assert_eq!(
        (t.exit_code, t.reason.as_deref()),
        (137, Some("OOMKilled")),
        "{t:?}"
    );
    rt.remove_pod(&id).await.expect("remove");

    // The same within its limit completes.
    let id = rt
        .run_pod(&pod(
            "fits",
            vec![with_limits(
                sh("fits", "exec dd if=/dev/zero of=/dev/null bs=8M count=1"),
                &[("memory", "32Mi")],
            )],
        ))
        .await
        .expect("run fits");
    let t = wait_done(rt, &id).await.containers[0]
        .state
        .terminated()
        .cloned()
        .expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    rt.remove_pod(&id).await.expect("remove");

    // --- stop with grace: a TERM handler gets to run; an ignoring PID 1 is killed after it
    let id = rt
        .run_pod(&pod(
            "graceful",
            vec![
                sh(
                    "polite",
                    "trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.1; done",
                ),
                Container {
                    name: "stubborn".into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Container::default()
                },
            ],
        ))
        .await
        .expect("run graceful");
    let st = wait_for_status(rt, &id, WAIT, |s| {
        s.containers.iter().all(|c| c.state.is_running())
    })
    .await;
    assert_eq!(st.state, SandboxState::Ready);

    // exec while it runs
    let out = rt
        .exec_sync(
            &id,
            "polite",
            vec!["sh".into(), "-c".into(), "echo hi; exit 4".into()],
            Duration::from_secs(30),
        )
        .await
        .expect("exec");
    assert_eq!((out.exit_code, out.stdout.as_slice()), (4, &b"hi\n"[..]));
    let stats = rt.stats(&id).await.expect("stats");
    assert_eq!(stats.containers.len(), 2);
    assert!(
        stats
            .containers
            .iter()
            .all(|c| c.memory_bytes > 0 && c.start_latency.is_some()),
        "{stats:?}"
    );
    eprintln!("stats: {stats:?}");

    // A new agent process sees the running pod (re-adoption by labels).
    let again = CriRuntime::connect(rt.config().clone())
        .await
        .expect("reconnect");
    let listed = again.list_pods().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].name, "graceful");

    let t0 = Instant::now();
    rt.stop_pod(&id, Duration::from_secs(2))
        .await
        .expect("stop");
    let took = t0.elapsed();
    let st = rt.pod_status(&id).await.expect("status");
    let polite = st.containers[0].state.terminated().expect("polite ended");
    let stubborn = st.containers[1].state.terminated().expect("stubborn ended");
    assert_eq!(polite.exit_code, 0, "{polite:?}");
    assert_eq!(stubborn.exit_code, 137, "{stubborn:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "stop took {took:?}, expected the 2 s grace then SIGKILL"
    );
    assert!(
        rt.logs(&id, "polite")
            .await
            .expect("logs")
            .contains("stdout F got TERM"),
        "TERM handler ran"
    );
    eprintln!("stop with 2 s grace took {took:?}");
    let memory_cgroup = Path::new("/sys/fs/cgroup/memory").join(
        runtime::cri::convert::cgroup_parent(
            CGROUP_ROOT,
            api::pod::QosClass::BestEffort,
            "uid-graceful",
        )
        .trim_start_matches('/'),
    );
    rt.remove_pod(&id).await.expect("remove");
    assert!(
        !memory_cgroup.exists(),
        "pod cgroup {} left behind",
        memory_cgroup.display()
    );
    assert!(rt.list_pods().await.expect("list").is_empty());

    // --- images: Never is fine for an imported image; an absent one is named in the error
    let id = rt
        .run_pod(
            &pod("present", vec![sh("c", "true")]).with_annotation(ANNOTATION_PULL_POLICY, "Never"),
        )
        .await
        .expect("busybox is imported, so Never runs it");
    rt.remove_pod(&id).await.expect("remove");
    let mut missing = sh("c", "true");
    missing.image = "localhost/nothere:v1".into();
    let err = rt
        .run_pod(
            &pod("missing", vec![missing.clone()]).with_annotation(ANNOTATION_PULL_POLICY, "Never"),
        )
        .await
        .expect_err("absent image");
    assert!(
        matches!(&err, RuntimeError::ImageNotFound { image, reason }
            if image == "localhost/nothere:v1" && reason.contains("ErrImageNeverPull")),
        "{err:?}"
    );
    let err = rt
        .run_pod(&pod("missing", vec![missing]))
        .await
        .expect_err("absent, unpullable image");
    assert!(
        matches!(&err, RuntimeError::ImageNotFound { image, reason }
            if image == "localhost/nothere:v1" && reason.starts_with("ErrImagePull")),
        "{err:?}"
    );
    eprintln!("pull error: {err}");
    assert!(rt.list_pods().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_throttles_to_the_cpu_limit() {
    let Some(socket) = cri_socket("containerd_throttles_to_the_cpu_limit") else {
        return;
    };
    // Measures CPU: nothing else may run.
    let _cpu = crate::CPU_LOCK.write().await;
    let _one = CRI_LOCK.lock().await;
    let n = node(&socket, "cpu").await;
    let rt = &n.rt;
    let id = rt
        .run_pod(&pod(
            "spinner",
            vec![with_limits(
                sh("spin", "while :; do :; done"),
                &[("cpu", "100m")],
            )],
        ))
        .await
        .expect("run spinner");
    wait_for_status(rt, &id, WAIT, |s| s.containers[0].state.is_running()).await;
    let before = rt.stats(&id).await.expect("stats").containers[0].cpu_ns;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = rt.stats(&id).await.expect("stats").containers[0].cpu_ns - before;
    let wall = t0.elapsed();
    let share = used as f64 / wall.as_nanos() as f64;
    eprintln!("100m limit: {used} ns CPU in {wall:?} = {share:.3} CPU");
    // Unthrottled, a busy loop takes a whole core (1.0); the quota allows 0.1.
    assert!(share < 0.2, "CPU limit not enforced: {share:.3} CPU");
    assert!(share > 0.02, "spinner barely ran: {share:.3} CPU");
    rt.remove_pod(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runs_a_pod_on_the_cni_bridge() {
    let Some(socket) = cri_socket("containerd_runs_a_pod_on_the_cni_bridge") else {
        return;
    };
    let _cpu = crate::CPU_LOCK.read().await;
    let _one = CRI_LOCK.lock().await;
    let root = tempfile::tempdir().expect("root tempdir");
    let mut cfg = CriRuntimeConfig::new(socket.as_str(), root.path());
    cfg.instance = "it-cni".into();
    cfg.host_network = false;
    let rt = CriRuntime::connect(cfg).await.expect("connect");
    rt.remove_orphans(&[]).await.expect("clean leftovers");
    let ready = rt.conditions().await.expect("Status");
    assert!(
        ready.iter().any(|(t, ok, _)| t == "NetworkReady" && *ok),
        "scripts/containerd installs a CNI bridge config: {ready:?}"
    );
    let id = rt
        .run_pod(&pod(
            "netpod",
            vec![Container {
                name: "c".into(),
                image: BUSYBOX.into(),
                command: vec!["sleep".into(), "3600".into()],
                ..Container::default()
            }],
        ))
        .await
        .expect("run");
    wait_for_status(&rt, &id, WAIT, |s| s.containers[0].state.is_running()).await;
    let ip = rt
        .pod_ip(&id)
        .await
        .expect("ip")
        .expect("a CNI pod has an IP");
    assert!(ip.starts_with("10.88."), "{ip}");
    let exec = |cmd: &str| {
        rt.exec_sync(
            &id,
            "c",
            vec!["sh".into(), "-c".into(), cmd.into()],
            Duration::from_secs(30),
        )
    };
    let out = exec("hostname; ip -4 addr show eth0").await.expect("exec");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{text}");
    assert!(text.starts_with("netpod\n"), "pod hostname: {text}");
    assert!(text.contains(&format!("inet {ip}/")), "{text}");
    rt.remove_pod(&id).await.expect("remove");
    assert!(rt.list_pods().await.expect("list").is_empty());
}

/// Proportional set size of a process, in bytes (shared pages split among their users).
fn pss(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Memory the OCI pods cost the node: the PSS of every containerd shim plus what the pods'
/// cgroups (pause and container processes, their page cache) are charged.
fn oci_memory() -> u64 {
    let shims: u64 = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        })
        .map(|e| pss(&e.file_name().to_string_lossy()))
        .sum();
    let cgroups = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{CGROUP_ROOT}/memory.usage_in_bytes"
    ))
    .ok()
    .and_then(|v| v.trim().parse::<u64>().ok())
    .unwrap_or(0);
    shims + cgroups
}

/// Memory the wasm pods cost the node: this process's PSS (the wasm runtime runs in it).
fn wasm_memory() -> u64 {
    pss("self")
}

/// Starts `n` long-running pods one after another, each timed from `run_pod` to Running;
/// returns the sorted latencies, the memory (as `memory` measures it) per running pod, and
/// their ids.
async fn start_many<R: PodRuntime>(
    rt: &R,
    n: usize,
    make: impl Fn(usize) -> PodConfig,
    memory: fn() -> u64,
) -> (Vec<Duration>, u64, Vec<runtime::PodId>) {
    let before = memory();
    let mut latencies = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let id = rt.run_pod(&make(i)).await.expect("run");
        wait_for_status(rt, &id, WAIT, |s| {
            s.containers.iter().all(|c| c.state.is_running())
        })
        .await;
        latencies.push(t0.elapsed());
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_pod = memory().saturating_sub(before) / n as u64;
    latencies.sort();
    (latencies, per_pod, ids)
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Issue 6's benchmark: start latency (create → Running) p50/p99 over 50 pods and node memory
/// per running pod, OCI busybox through containerd vs wasm in-process, and their ratio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_vs_wasm_start_latency_and_memory() {
    let Some(socket) = cri_socket("containerd_vs_wasm_start_latency_and_memory") else {
        return;
    };
    let _cpu = crate::CPU_LOCK.write().await;
    let _one = CRI_LOCK.lock().await;
    const N: usize = 50;
    let n = node(&socket, "bench").await;
    let (oci, oci_mem, ids) = start_many(
        &n.rt,
        N,
        |i| {
            pod(
                &format!("bench-{i}"),
                vec![Container {
                    name: "sleep".into(),
                    image: BUSYBOX.into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Container::default()
                }],
            )
        },
        oci_memory,
    )
    .await;
    let listed = n.rt.list_pods().await.expect("list");
    assert_eq!(listed.len(), N);
    assert!(
        listed
            .iter()
            .all(|p| p.state == SandboxState::Ready && p.containers[0].state.is_running()),
        "all {N} pods run at once"
    );
    for id in &ids {
        n.rt.remove_pod(id).await.expect("remove");
    }

    let w = crate::node();
    let sleeper = crate::container("sleep", "sleeper", &["50"]);
    // One warm-up pod so the module compile is not counted as start latency.
    let warm =
        w.rt.run_pod(&pod("warm", vec![sleeper.clone()]))
            .await
            .expect("warm-up");
    w.rt.remove_pod(&warm).await.expect("remove");
    let (wasm, wasm_mem, ids) = start_many(
        &w.rt,
        N,
        |i| pod(&format!("bench-{i}"), vec![sleeper.clone()]),
        wasm_memory,
    )
    .await;
    for id in &ids {
        w.rt.remove_pod(id).await.expect("remove");
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "start latency over {N} pods: OCI busybox p50 {:.1} ms p99 {:.1} ms; \
         wasm p50 {:.2} ms p99 {:.2} ms; p50 ratio OCI/wasm {:.0}x",
        ms(pct(&oci, 50)),
        ms(pct(&oci, 99)),
        ms(pct(&wasm, 50)),
        ms(pct(&wasm, 99)),
        ms(pct(&oci, 50)) / ms(pct(&wasm, 50)).max(0.001)
    );
    eprintln!(
        "memory per running pod: OCI {:.1} MiB (shim PSS + pod cgroups), wasm {:.2} MiB \
         (agent PSS), ratio {:.0}x",
        oci_mem as f64 / f64::from(1 << 20),
        wasm_mem as f64 / f64::from(1 << 20),
        oci_mem as f64 / (wasm_mem.max(1)) as f64
    );
    // The comparison is printed, not asserted: wasm start times depend on the wasm runtime's
    // executor load, which this test does not control. 50 shims cannot be free, though.
    assert!(oci_mem > 0, "50 running OCI pods cost no memory?");
}
