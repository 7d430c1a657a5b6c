use std::time::Duration;

use api::pod::{EmptyDirVolumeSource, HostPathVolumeSource, PodSpec, Volume, VolumeMount};
use runtime::{PodConfig, PodRuntime};

use crate::{container, node, node_with, pod, run, wait_done, with_env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_sees_args_env_and_logs_in_cri_format() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let mut c = with_env(
        container("hello", "hello", &["one", "two"]),
        &[("GREETING", "hi there")],
    );
    c.command = vec!["hello-cmd".into()];
    let id = run(&n.rt, &pod("hello", vec![c])).await;
    let st = wait_done(&n.rt, &id).await;
    let t = st.containers[0].state.terminated().expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert!(t.started_at.is_some() && t.finished_at.is_some());
    let logs = n.rt.logs(&id, "hello").await.expect("logs");
    assert!(
        logs.contains(r#"stdout F hello from flotilla: args=["hello-cmd", "one", "two"]"#),
        "{logs}"
    );
    assert!(logs.contains("stdout F GREETING=hi there"), "{logs}");
    let stats = n.rt.stats(&id).await.expect("stats");
    let s = &stats.containers[0];
    assert!(s.cpu_ns > 0, "cpu accounted");
    assert!(
        s.instructions.unwrap_or(0) > 1000,
        "fuel metered: {:?}",
        s.instructions
    );
    assert!(s.memory_bytes > 0);
    assert!(s.start_latency.is_some());
    n.rt.remove_pod(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_propagate() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    for code in [0, 1, 42] {
        let arg = code.to_string();
        let id = run(
            &n.rt,
            &pod("exit", vec![container("c", "exit_code", &[&arg])]),
        )
        .await;
        let st = wait_done(&n.rt, &id).await;
        let t = st.containers[0].state.terminated().expect("terminated");
        assert_eq!(t.exit_code, code);
        assert_eq!(
            t.reason.as_deref(),
            Some(if code == 0 { "Completed" } else { "Error" })
        );
    }
}

fn volume_pod(name: &str, args: &[&str], volume: Volume, read_only: Option<bool>) -> PodConfig {
    let mut c = container("writer", "file_writer", args);
    c.volume_mounts = vec![VolumeMount {
        name: volume.name.clone(),
        mount_path: "/data".into(),
        read_only,
    }];
    PodConfig::new(
        name,
        PodSpec {
            containers: vec![c],
            volumes: vec![volume],
            ..PodSpec::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_preopens_and_nothing_else_is_reachable() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret").expect("secret");
    let secret_arg = secret.display().to_string();

    // emptyDir: writable; host files outside it are unreachable, by absolute path or by `..`.
    let scratch = Volume {
        name: "scratch".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let id = run(
        &n.rt,
        &volume_pod("ed", &["/data", &secret_arg], scratch, None),
    )
    .await;
    let st = wait_done(&n.rt, &id).await;
    let logs = n.rt.logs(&id, "writer").await.expect("logs");
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0),
        "{logs}"
    );
    assert!(logs.contains("read back: hello from file_writer"), "{logs}");
    assert!(
        !logs.contains("escape succeeded"),
        "guest escaped its preopens: {logs}"
    );
    assert_eq!(logs.matches("escape blocked").count(), 2, "{logs}");

    // hostPath: read-only unless the mount says otherwise.
    let host_dir = tempfile::tempdir().expect("tempdir");
    let hp = Volume {
        name: "host".into(),
        host_path: Some(HostPathVolumeSource {
            path: host_dir.path().display().to_string(),
            type_: None,
        }),
        ..Volume::default()
    };
    let id = run(
        &n.rt,
        &volume_pod("hp-ro", &["/data", &secret_arg], hp.clone(), None),
    )
    .await;
    let st = wait_done(&n.rt, &id).await;
    let logs = n.rt.logs(&id, "writer").await.expect("logs");
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(1),
        "write must fail: {logs}"
    );
    assert!(!host_dir.path().join("out.txt").exists());
    let id = run(
        &n.rt,
        &volume_pod("hp-rw", &["/data", &secret_arg], hp, Some(false)),
    )
    .await;
    let st = wait_done(&n.rt, &id).await;
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0)
    );
    let written =
        std::fs::read_to_string(host_dir.path().join("out.txt")).expect("host file written");
    assert_eq!(written, "hello from file_writer\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_by_size() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node_with(|c| {
        c.log_max_bytes = 64 * 1024;
        c.log_max_files = 3;
    });
    let id = run(
        &n.rt,
        &pod("spam", vec![container("spam", "log_spammer", &["20000"])]),
    )
    .await;
    let st = wait_done(&n.rt, &id).await;
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0)
    );
    let logs = n.rt.logs(&id, "spam").await.expect("logs");
    assert!(
        logs.len() <= 3 * 64 * 1024 + 1024,
        "rotation bounds the log: {} bytes",
        logs.len()
    );
    let last = logs.lines().last().expect("lines");
    assert!(last.contains("stdout F spam line 19999"), "{last}");
    assert!(logs.contains(" stderr F spam line 19990 on stderr"));
    assert!(!logs.contains("spam line 0 "), "oldest lines rotated away");
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_images_are_pulled_once_and_pinned() {
    let _shared = crate::CPU_LOCK.read().await;
    use sha2::Digest as _;
    use std::io::{Read, Write};
    let body = std::fs::read(crate::guest("hello")).expect("hello.wasm");
    let digest = hex::encode(sha2::Sha256::digest(&body));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let n = buf.len();
            let req = String::from_utf8_lossy(&buf[..n]);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if req.starts_with("GET /hello.wasm ") {
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            } else {
                let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n");
            }
        }
    });
    // A private cache: with the shared one the pinned digest would already be present.
    let cache = tempfile::tempdir().expect("cache");
    let n = node_with(|c| c.cache_dir = Some(cache.path().to_owned()));
    let url = format!("http://{addr}/hello.wasm@sha256:{digest}");
    for _ in 0..2 {
        let mut c = container("hello", "hello", &[]);
        c.image = url.clone();
        let id = run(&n.rt, &pod("http", vec![c])).await;
        let st = wait_done(&n.rt, &id).await;
        assert_eq!(
            st.containers[0].state.terminated().map(|t| t.exit_code),
            Some(0)
        );
    }
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "pulled once"
    );
    let mut c = container("hello", "hello", &[]);
    c.image = format!("http://{addr}/hello.wasm@sha256:{}", "0".repeat(64));
    let err =
        n.rt.run_pod(&pod("bad-pin", vec![c]))
            .await
            .expect_err("pin mismatch");
    assert!(
        err.to_string().contains("does not match the pinned digest"),
        "{err}"
    );
    let mut c = container("hello", "hello", &[]);
    c.image = format!("http://{addr}/missing.wasm");
    let err =
        n.rt.run_pod(&pod("missing", vec![c]))
            .await
            .expect_err("404");
    assert!(
        matches!(err, runtime::RuntimeError::ImageNotFound { .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_modules_are_cached_on_disk_per_engine() {
    let _shared = crate::CPU_LOCK.read().await;
    let cache = tempfile::tempdir().expect("cache");
    let cfg = |c: &mut runtime::WasmRuntimeConfig| c.cache_dir = Some(cache.path().to_owned());
    let first = node_with(cfg);
    let t0 = std::time::Instant::now();
    first
        .rt
        .pull(&crate::guest("exit_code"))
        .await
        .expect("pull");
    let cold = t0.elapsed();
    let artifacts: Vec<_> = std::fs::read_dir(cache.path().join("modules"))
        .expect("modules dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "one artifact written");
    let name = artifacts[0].file_name().to_string_lossy().to_string();
    let wasm = std::fs::read(crate::guest("exit_code")).expect("wasm");
    use sha2::Digest as _;
    assert!(
        name.starts_with(&hex::encode(sha2::Sha256::digest(&wasm))),
        "keyed by content: {name}"
    );
    // A second node with the same engine settings loads the artifact instead of compiling.
    let second = node_with(cfg);
    let t0 = std::time::Instant::now();
    second
        .rt
        .pull(&crate::guest("exit_code"))
        .await
        .expect("pull");
    let warm = t0.elapsed();
    eprintln!("compile {cold:?}, load from disk cache {warm:?}");
    assert!(
        warm * 3 < cold,
        "cached load ({warm:?}) should be far faster than compiling ({cold:?})"
    );
    let id = run(
        &second.rt,
        &pod("exit", vec![container("c", "exit_code", &["7"])]),
    )
    .await;
    let st = wait_done(&second.rt, &id).await;
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_guest_does_not_block_its_executor() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node_with(|c| c.executor_threads = 1);
    let sleeper = run(
        &n.rt,
        &pod("sleepy", vec![container("s", "sleeper", &["60000"])]),
    )
    .await;
    crate::wait_running(&n.rt, &sleeper).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    let id = run(&n.rt, &pod("hello", vec![container("hello", "hello", &[])])).await;
    let st =
        n.rt.wait_pod(&id, Duration::from_secs(10))
            .await
            .expect("hello ends while the sleeper sleeps");
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0)
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    n.rt.stop_pod(&sleeper, Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "a sleeping guest stops at once"
    );
}
