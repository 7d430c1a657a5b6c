//! `NodeRuntimes` over a real `WasmRuntime` and a `FakeCriServer` on a Unix socket.
use std::time::Duration;

use api::pod::{Container, PodSpec};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cri::fake::{FakeCriBehavior, FakeCriServer};
use crate::testing::conformance::wait_for_status;
use crate::wasm::WasmRuntimeConfig;

const BUSYBOX: &str = "localhost/busybox:v1";

fn wasm(dir: &std::path::Path) -> WasmRuntime {
    let mut cfg = WasmRuntimeConfig::new(dir.join("wasm"));
    cfg.max_pods = 8;
    cfg.executor_threads = 1;
    WasmRuntime::new(cfg).expect("wasm runtime")
}

fn cri_settings(endpoint: String, dir: &std::path::Path) -> CriSettings {
    let mut cfg = CriRuntimeConfig::new(endpoint, dir.join("cri"));
    cfg.instance = "node-a".into();
    let mut s = CriSettings::new(cfg);
    s.recheck = Duration::from_millis(100);
    s
}

fn pod(name: &str, image: &str) -> PodConfig {
    PodConfig::new(
        name,
        PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: image.into(),
                ..Container::default()
            }],
            ..PodSpec::default()
        },
    )
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn wasm_images_are_recognised() {
    assert!(is_wasm_image("/srv/hello.wasm"));
    assert!(is_wasm_image("file:///srv/hello.wasm"));
    assert!(is_wasm_image(
        "https://example.com/m/hello.wasm@sha256:abcd"
    ));
    assert!(is_wasm_image("./hello.wasm"));
    assert!(!is_wasm_image("localhost/busybox:v1"));
    assert!(!is_wasm_image("busybox"));
    assert!(
        !is_wasm_image("registry.local/hello.wasm"),
        "an OCI repository name"
    );
}

#[tokio::test]
async fn pods_go_to_the_runtime_of_their_handler_or_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeCriServer::start(&dir.path().join("cri.sock"))
        .await
        .expect("fake CRI");
    fake.add_image(BUSYBOX, FakeCriBehavior::RunForever);
    let stop = CancellationToken::new();
    let rts = NodeRuntimes::start(
        wasm(dir.path()),
        Some(cri_settings(fake.endpoint(), dir.path())),
        stop.clone(),
    )
    .await;
    let offer = rts.current_offer();
    assert_eq!(offer.handlers, ["wasmtime", "runc"]);
    assert_eq!(offer.runtime_version, "fake-cri://0.1.0");
    assert_eq!(offer.cri.as_ref().and_then(|c| c.error.as_ref()), None);

    let hello = crate::wasm::guests::path("hello").display().to_string();
    assert!(matches!(rts.route(&pod("w", &hello)), Ok(Route::Wasm)));
    assert!(matches!(rts.route(&pod("c", BUSYBOX)), Ok(Route::Cri)));
    let by_class = pod("c", BUSYBOX).with_annotation(ANNOTATION_RUNTIME_HANDLER, "wasmtime");
    assert!(matches!(rts.route(&by_class), Ok(Route::Wasm)));
    let unknown = pod("c", BUSYBOX).with_annotation(ANNOTATION_RUNTIME_HANDLER, "kata");
    let err = rts.route(&unknown).err().expect("kata is not offered");
    assert!(err.to_string().contains("\"kata\""), "{err}");
    let mut mixed = pod("m", BUSYBOX);
    mixed.spec.containers.push(Container {
        name: "w".into(),
        image: hello.clone(),
        ..Container::default()
    });
    assert!(matches!(
        rts.route(&mixed),
        Err(RuntimeError::InvalidSpec(_))
    ));

    // A CRI pod: the handler reaches RunPodSandbox, every call finds its way back.
    let p = pod("oci", BUSYBOX).with_annotation(ANNOTATION_RUNTIME_HANDLER, "runc");
    let id = rts.run_pod(&p).await.expect("run on CRI");
    assert!(id.0.starts_with("cri:"), "{id}");
    assert_eq!(fake.sandbox_handlers(), ["runc"]);
    let st = wait_for_status(&rts, &id, Duration::from_secs(10), |s| {
        s.containers[0].state.is_running()
    })
    .await;
    assert_eq!(st.id, id);
    let out = rts
        .exec(
            &id,
            "main",
            vec!["echo".into(), "hi".into()],
            Duration::from_secs(5),
        )
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"echo hi\n");
    assert!(rts.outlives_agent(&id));

    // A wasm pod beside it.
    let wid = rts.run_pod(&pod("wasm", &hello)).await.expect("run wasm");
    assert!(wid.0.starts_with("wasm:"), "{wid}");
    assert!(!rts.outlives_agent(&wid));
    let listed: Vec<PodId> = rts
        .list_pods()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert!(listed.contains(&id) && listed.contains(&wid), "{listed:?}");

    for i in [&id, &wid] {
        rts.remove_pod(i).await.expect("remove");
        assert!(matches!(
            rts.pod_status(i).await,
            Err(RuntimeError::NotFound(n)) if &n == i
        ));
    }
    assert_eq!(fake.counts(), (0, 0));
    rts.remove_pod(&PodId("bogus".into()))
        .await
        .expect("unknown ids remove fine");
    stop.cancel();
}

#[tokio::test]
async fn an_unreachable_endpoint_offers_wasm_only_until_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("late.sock");
    let stop = CancellationToken::new();
    let rts = NodeRuntimes::start(
        wasm(dir.path()),
        Some(cri_settings(
            format!("unix://{}", socket.display()),
            dir.path(),
        )),
        stop.clone(),
    )
    .await;
    let offer = rts.current_offer();
    assert_eq!(offer.handlers, ["wasmtime"]);
    let cri = offer.cri.expect("a CRI endpoint is configured");
    assert!(
        cri.error
            .as_deref()
            .is_some_and(|e| e.contains("late.sock")),
        "{cri:?}"
    );
    let err = rts
        .run_pod(&pod("early", BUSYBOX))
        .await
        .expect_err("no CRI yet");
    assert!(
        matches!(&err, RuntimeError::Transient(m) if m.contains("wasm pods only")),
        "{err:?}"
    );

    let mut changes = rts.offer().expect("an offer");
    changes.borrow_and_update();
    let fake = FakeCriServer::start(&socket).await.expect("fake CRI");
    fake.add_image(BUSYBOX, FakeCriBehavior::RunForever);
    tokio::time::timeout(Duration::from_secs(30), changes.changed())
        .await
        .expect("the recheck notices the endpoint")
        .expect("sender alive");
    let offer = rts.current_offer();
    assert_eq!(offer.handlers, ["wasmtime", "runc"]);
    assert_eq!(offer.cri.and_then(|c| c.error), None);
    let id = rts.run_pod(&pod("late", BUSYBOX)).await.expect("runs now");
    rts.remove_pod(&id).await.expect("remove");

    // The endpoint goes away again: the next check says so.
    drop(fake);
    eventually("the offer to drop runc", || {
        rts.current_offer().handlers == ["wasmtime"]
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn a_restarted_node_adopts_its_running_cri_pods_and_removes_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeCriServer::start(&dir.path().join("cri.sock"))
        .await
        .expect("fake CRI");
    fake.add_image(BUSYBOX, FakeCriBehavior::RunForever);
    let stop = CancellationToken::new();
    let first = NodeRuntimes::start(
        wasm(dir.path()),
        Some(cri_settings(fake.endpoint(), dir.path())),
        stop.clone(),
    )
    .await;
    let keep = first.run_pod(&pod("keep", BUSYBOX)).await.expect("run");
    let gone = first.run_pod(&pod("gone", BUSYBOX)).await.expect("run");
    stop.cancel();
    drop(first);

    // A new agent process: new runtimes over the same containerd.
    let stop = CancellationToken::new();
    let second = NodeRuntimes::start(
        wasm(dir.path()),
        Some(cri_settings(fake.endpoint(), dir.path())),
        stop.clone(),
    )
    .await;
    let listed = second.list_pods().await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    // Running the same pod again adopts its sandbox instead of doubling it.
    let again = second.run_pod(&pod("keep", BUSYBOX)).await.expect("adopt");
    assert_eq!(again, keep);
    assert_eq!(fake.counts(), (2, 2));
    let claimed = std::collections::HashSet::from([("default".to_owned(), "keep".to_owned())]);
    let removed = second.remove_cri_orphans(&claimed).await.expect("clean");
    assert_eq!(removed, [gone]);
    assert_eq!(fake.counts(), (1, 1));
    second.remove_pod(&keep).await.expect("remove");
    stop.cancel();
}
