use runtime::testing::FakeRuntime;
use runtime::testing::conformance::{Fixtures, run_all};
use runtime::{AnyRuntime, PodRuntime};

use crate::{container, node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_runtime_passes_conformance() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let fixtures = Fixtures {
        long_running: container("sleeper", "sleeper", &["20"]),
        exits_3: container("exit3", "exit_code", &["3"]),
        hello: container("hello", "hello", &["world"]),
    };
    run_all(&n.rt, &fixtures).await;
    assert_eq!(n.rt.live_containers(), 0, "every pool slot released");
    assert!(n.rt.list_pods().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_runtime_dispatches_fake_and_wasm() {
    let _shared = crate::CPU_LOCK.read().await;
    let fake = FakeRuntime::new();
    let fixtures = Fixtures::for_fake(&fake);
    let any = AnyRuntime::Fake(fake);
    assert_eq!(any.name(), "fake");
    run_all(&any, &fixtures).await;
    let n = node();
    let any = AnyRuntime::Wasm(n.rt.clone());
    assert_eq!(any.name(), "wasm");
    runtime::testing::conformance::unknown_ids(&any).await;
}
