use std::time::{Duration, Instant};

use runtime::{PodRuntime, RuntimeError};

use crate::{
    CPU_LOCK, container, module_file, node, node_with, pod, run, wait_done, wait_running,
    with_limits,
};

const LOOP_WAT: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_without_imports_stops_within_grace() {
    let _shared = CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = container("loop", "hello", &[]);
    c.image = module_file(dir.path(), "loop.wat", LOOP_WAT.as_bytes());
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let id = run(&n.rt, &pod("loop", vec![c.clone()])).await;
        wait_running(&n.rt, &id).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        n.rt.stop_pod(&id, Duration::from_secs(2))
            .await
            .expect("stop");
        latencies.push(t0.elapsed());
        let st = n.rt.pod_status(&id).await.expect("status");
        let t = st.containers[0].state.terminated().expect("terminated");
        assert_eq!(t.exit_code, 143, "{t:?}");
        n.rt.remove_pod(&id).await.expect("remove");
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!("stop latencies of a spinning pod: {latencies:?}");
    assert!(
        worst < Duration::from_millis(500),
        "a spinning guest took {worst:?} to stop"
    );
    assert_eq!(n.rt.live_containers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_ends_container_with_error_and_trap_message() {
    let _shared = CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = container("trap", "hello", &[]);
    c.image = module_file(
        dir.path(),
        "trap.wat",
        br#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    );
    let id = run(&n.rt, &pod("trap", vec![c])).await;
    let st = wait_done(&n.rt, &id).await;
    let t = st.containers[0].state.terminated().expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(t.exit_code, 134);
    let msg = t.message.clone().unwrap_or_default();
    assert!(msg.contains("unreachable"), "trap message: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_modules_are_refused_before_running() {
    let _shared = CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "garbage.wasm",
            b"\0asm\x01\0\0\0\xff\xff\xff",
            "invalid module",
        ),
        (
            "import.wat",
            br#"(module (import "env" "evil" (func)) (func (export "_start")))"#,
            "env::evil",
        ),
        (
            "reactor.wat",
            br#"(module (func (export "run")))"#,
            "_start",
        ),
        ("component.wasm", b"\0asm\x0d\0\x01\0", "component"),
    ];
    for (file, bytes, expect) in cases {
        let mut c = container("bad", "hello", &[]);
        c.image = module_file(dir.path(), file, bytes);
        let err = n.rt.run_pod(&pod("bad", vec![c])).await.expect_err(file);
        assert!(
            matches!(err, RuntimeError::ImageRefused { .. }),
            "{file}: {err}"
        );
        assert!(err.to_string().contains(expect), "{file}: {err}");
    }
    let mut c = container("missing", "hello", &[]);
    c.image = "/no/such/module.wasm".into();
    let err =
        n.rt.run_pod(&pod("missing", vec![c]))
            .await
            .expect_err("missing");
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err}");
    assert!(
        n.rt.list_pods().await.expect("list").is_empty(),
        "nothing ran"
    );
    assert_eq!(n.rt.live_containers(), 0);

    let small = node_with(|c| c.max_module_bytes = 10_000);
    let err = small
        .rt
        .run_pod(&pod("big", vec![container("big", "hello", &[])]))
        .await
        .expect_err("too big");
    assert!(
        err.to_string()
            .contains("over the node's limit of 10000 bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_pods_are_killed_while_others_keep_running() {
    let _shared = CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = run(
        &n.rt,
        &pod("good", vec![container("ticker", "sleeper", &["20"])]),
    )
    .await;
    wait_running(&n.rt, &good).await;

    let mut looper = container("loop", "hello", &[]);
    looper.image = module_file(dir.path(), "loop.wat", LOOP_WAT.as_bytes());
    let spin = run(&n.rt, &pod("spin", vec![container("spin", "spinner", &[])])).await;
    let lp = run(&n.rt, &pod("loop", vec![looper])).await;
    let hog = with_limits(
        container("hog", "memory_hog", &[]),
        &[("memory", "16Mi")],
        &[],
    );
    let hog = run(&n.rt, &pod("hog", vec![hog])).await;

    let st = wait_done(&n.rt, &hog).await;
    assert_eq!(
        st.containers[0]
            .state
            .terminated()
            .and_then(|t| t.reason.clone())
            .as_deref(),
        Some("OOMKilled")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ticks_before =
        n.rt.logs(&good, "ticker")
            .await
            .expect("logs")
            .lines()
            .count();
    for id in [&spin, &lp] {
        n.rt.stop_pod(id, Duration::from_secs(1))
            .await
            .expect("stop hostile");
        assert!(n.rt.pod_status(id).await.expect("status").all_terminated());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = n.rt.pod_status(&good).await.expect("status");
    assert!(
        st.containers[0].state.is_running(),
        "the good pod survived: {st:?}"
    );
    let ticks_after =
        n.rt.logs(&good, "ticker")
            .await
            .expect("logs")
            .lines()
            .count();
    assert!(
        ticks_before >= 5,
        "the good pod ticked while hostile pods ran: {ticks_before}"
    );
    assert!(
        ticks_after > ticks_before,
        "the good pod keeps ticking: {ticks_before} -> {ticks_after}"
    );
    for id in [good, spin, lp, hog] {
        n.rt.remove_pod(&id).await.expect("remove");
    }
}
