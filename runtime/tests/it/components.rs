//! WASI 0.2 components: run through `wasi:cli/run` under the same limits as core modules.
use std::time::{Duration, Instant};

use runtime::wasm::FUEL_LIMIT_ANNOTATION;
use runtime::{PodRuntime, RuntimeError};

use crate::{container, module_file, node, pod, run, wait_done, wait_running, with_limits};

/// A command component whose `run` is the core function `body` (returning the `result`
/// discriminant: 0 ok, 1 error) of a module with one page of memory.
fn command(body: &str) -> String {
    format!(
        r#"(component
  (core module $m
    (memory 1)
    (func (export "run") (result i32) {body}))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance)))"#
    )
}

fn end_of(st: &runtime::PodStatus) -> (i32, String) {
    let t = st.containers[0].state.terminated().expect("terminated");
    (t.exit_code, t.reason.clone().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_run_and_report_their_result() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("dir");
    for (name, body, want) in [
        ("ok.wat", "i32.const 0", (0, "Completed")),
        ("err.wat", "i32.const 1", (1, "Error")),
        ("trap.wat", "unreachable", (134, "Error")),
    ] {
        let mut c = container("c", "hello", &[]);
        c.image = module_file(dir.path(), name, command(body).as_bytes());
        let id = run(&n.rt, &pod("component", vec![c])).await;
        let st = wait_done(&n.rt, &id).await;
        assert_eq!(end_of(&st), (want.0, want.1.to_owned()), "{name}");
        let stats = n.rt.stats(&id).await.expect("stats");
        assert!(
            stats.containers[0].instructions.unwrap_or(0) > 0,
            "fuel metered"
        );
        n.rt.remove_pod(&id).await.expect("remove");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_obey_memory_fuel_and_stop() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("dir");

    // Grows by 16 MiB past a 8 MiB limit: the grow fails, the guest traps, OOMKilled.
    let hog = command(
        "(if (i32.lt_s (memory.grow (i32.const 256)) (i32.const 0)) (then unreachable)) i32.const 0",
    );
    let mut c = container("c", "hello", &[]);
    c.image = module_file(dir.path(), "hog.wat", hog.as_bytes());
    let c = with_limits(c, &[("memory", "8Mi")], &[]);
    let id = run(&n.rt, &pod("hog", vec![c])).await;
    assert_eq!(
        end_of(&wait_done(&n.rt, &id).await),
        (137, "OOMKilled".into())
    );

    let spin = command("(loop $l (br $l)) i32.const 0");
    let image = module_file(dir.path(), "spin.wat", spin.as_bytes());
    let mut c = container("c", "hello", &[]);
    c.image = image.clone();
    let p = pod("fuel", vec![c]).with_annotation(FUEL_LIMIT_ANNOTATION, "5000000");
    let id = run(&n.rt, &p).await;
    assert_eq!(
        end_of(&wait_done(&n.rt, &id).await),
        (137, "FuelExhausted".into())
    );

    // An endless loop with no imports still stops at an epoch tick.
    let mut c = container("c", "hello", &[]);
    c.image = image;
    let id = run(&n.rt, &pod("spin", vec![c])).await;
    wait_running(&n.rt, &id).await;
    let t0 = Instant::now();
    n.rt.stop_pod(&id, Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(end_of(&n.rt.pod_status(&id).await.expect("status")).0, 143);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_with_unknown_imports_or_no_run_are_refused() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let dir = tempfile::tempdir().expect("dir");
    let unknown = r#"(component
  (import "acme:rockets/launch@1.0.0" (instance (export "go" (func))))
)"#;
    let no_run = r#"(component (core module $m))"#;
    for (name, text, expect) in [
        ("unknown.wat", unknown, "acme:rockets/launch"),
        ("norun.wat", no_run, "wasi:cli/run"),
    ] {
        let mut c = container("c", "hello", &[]);
        c.image = module_file(dir.path(), name, text.as_bytes());
        let err =
            n.rt.run_pod(&pod("bad", vec![c]))
                .await
                .expect_err("refused");
        assert!(matches!(err, RuntimeError::ImageRefused { .. }), "{err}");
        assert!(err.to_string().contains(expect), "{name}: {err}");
    }
    assert_eq!(n.rt.live_containers(), 0);
}
