//! Wasm stdin, exec, https images and the inline first poll.
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api::pod::{HostPathVolumeSource, PodSpec, Volume, VolumeMount};
use runtime::wasm::STDIN_ANNOTATION;
use runtime::{PodConfig, PodRuntime, RuntimeError};

use crate::{container, node, node_with, pod, run, wait_done, wait_running, with_env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upper_reads_stdin_from_annotations() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let mut pod_wide = container("a", "upper", &[]);
    pod_wide.stdin = true;
    let mut own = container("b", "upper", &[]);
    own.stdin = true;
    let closed = container("c", "upper", &[]);
    let p = pod("upper", vec![pod_wide, own, closed])
        .with_annotation(STDIN_ANNOTATION, "hello wasm\nsecond line\n")
        .with_annotation(format!("{STDIN_ANNOTATION}.b"), "only for b");
    let id = run(&n.rt, &p).await;
    let st = wait_done(&n.rt, &id).await;
    for c in &st.containers {
        let t = c.state.terminated().expect("terminated");
        assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    }
    let a = n.rt.logs(&id, "a").await.expect("logs a");
    assert!(a.contains("stdout F HELLO WASM\n"), "{a}");
    assert!(a.contains("stdout F SECOND LINE\n"), "{a}");
    let b = n.rt.logs(&id, "b").await.expect("logs b");
    assert!(b.contains("stdout F ONLY FOR B"), "{b}");
    assert!(!b.contains("HELLO"), "per-container annotation wins: {b}");
    let c = n.rt.logs(&id, "c").await.expect("logs c");
    assert!(c.is_empty(), "stdin: false reads nothing: {c:?}");

    // Data for a container that did not ask for stdin is a spec error, not silently dropped.
    let bad = pod("upper-bad", vec![container("c", "upper", &[])])
        .with_annotation(format!("{STDIN_ANNOTATION}.c"), "x");
    let err = n.rt.run_pod(&bad).await.expect_err("refused");
    assert!(matches!(err, RuntimeError::InvalidSpec(_)), "{err}");
}

fn toolbox_pod(host_dir: &std::path::Path) -> PodConfig {
    let mut c = with_env(
        container("tb", "toolbox", &["serve", "50"]),
        &[("FOO", "bar")],
    );
    c.volume_mounts = vec![VolumeMount {
        name: "host".into(),
        mount_path: "/host".into(),
        read_only: None,
    }];
    PodConfig::new(
        "toolbox",
        PodSpec {
            containers: vec![c],
            volumes: vec![Volume {
                name: "host".into(),
                host_path: Some(HostPathVolumeSource {
                    path: host_dir.display().to_string(),
                    type_: None,
                }),
                ..Volume::default()
            }],
            ..PodSpec::default()
        },
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_fresh_instance_in_the_sandbox() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("greeting"), "hi from the host\n").expect("write");
    let id = run(&n.rt, &toolbox_pod(host.path())).await;
    wait_running(&n.rt, &id).await;
    let t = Duration::from_secs(20);
    let exec = |cmd: &[&str]| {
        let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
        n.rt.exec(&id, "tb", cmd, t)
    };

    let out = exec(&["echo", "hi", "there"]).await.expect("echo");
    assert_eq!((out.exit_code, text(&out.stdout)), (0, "hi there\n".into()));
    let out = exec(&["env", "FOO"]).await.expect("env");
    assert_eq!(text(&out.stdout), "bar\n", "the container's env");
    let out = exec(&["cat", "/host/greeting"]).await.expect("cat");
    assert_eq!(
        text(&out.stdout),
        "hi from the host\n",
        "the container's volumes"
    );
    let out = exec(&["cat", "/etc/passwd"]).await.expect("cat outside");
    assert_eq!(out.exit_code, 1, "no host file outside the preopens");
    assert!(
        text(&out.stderr).contains("cat: /etc/passwd"),
        "{}",
        text(&out.stderr)
    );
    let out = exec(&["exit", "7"]).await.expect("exit");
    assert_eq!(out.exit_code, 7);

    // Exported functions are called by name.
    let out = exec(&["healthz"]).await.expect("healthz");
    assert_eq!((out.exit_code, text(&out.stdout)), (0, "healthy\n".into()));
    let out = exec(&["unhealthy"]).await.expect("unhealthy");
    assert_eq!(out.exit_code, 3);
    assert!(text(&out.stderr).contains("not healthy"));
    let out = exec(&["crash"]).await.expect("crash");
    assert_eq!(out.exit_code, 134, "a trap ends the exec like SIGABRT");
    assert!(
        text(&out.stderr).contains("wasm trap"),
        "{}",
        text(&out.stderr)
    );

    // The container kept running through all of it, and every exec released its slot.
    let st = n.rt.pod_status(&id).await.expect("status");
    assert!(st.containers[0].state.is_running(), "{st:?}");
    assert_eq!(n.rt.live_containers(), 1);
    n.rt.remove_pod(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_ends_spinning_commands_and_functions() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let host = tempfile::tempdir().expect("host dir");
    let id = run(&n.rt, &toolbox_pod(host.path())).await;
    wait_running(&n.rt, &id).await;
    for cmd in [vec!["spin".to_owned()], vec!["busy".to_owned()]] {
        let t0 = Instant::now();
        let err =
            n.rt.exec(&id, "tb", cmd.clone(), Duration::from_millis(300))
                .await
                .expect_err("times out");
        let took = t0.elapsed();
        assert!(matches!(err, RuntimeError::Transient(_)), "{cmd:?}: {err}");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{cmd:?} took {took:?}"
        );
    }
    assert_eq!(
        n.rt.live_containers(),
        1,
        "timed-out execs released their slots"
    );
    let out =
        n.rt.exec(
            &id,
            "tb",
            vec!["echo".into(), "still".into()],
            Duration::ZERO,
        )
        .await
        .expect("exec after timeouts");
    assert_eq!(text(&out.stdout), "still\n");
    let cpu = n.rt.stats(&id).await.expect("stats").containers[0].cpu_ns;
    // The container itself mostly sleeps; 600 ms of spinning execs (on shared, loaded cores)
    // leave far more than 100 ms of CPU.
    assert!(
        cpu >= 100_000_000,
        "exec CPU charged to the container: {cpu}"
    );

    // Stopping the pod ends an exec that has no timeout.
    let rt = n.rt.clone();
    let exec_id = id.clone();
    let pending = tokio::spawn(async move {
        rt.exec(&exec_id, "tb", vec!["spin".into()], Duration::ZERO)
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    n.rt.stop_pod(&id, Duration::from_secs(5))
        .await
        .expect("stop");
    let out = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("exec ends with its pod")
        .expect("join")
        .expect("exec result");
    assert_eq!(out.exit_code, 143, "stopped by the node");
    assert_eq!(n.rt.live_containers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_errors() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node();
    let t = Duration::from_secs(10);
    let id = run(&n.rt, &pod("done", vec![container("h", "hello", &[])])).await;
    wait_done(&n.rt, &id).await;
    let err =
        n.rt.exec(&id, "h", vec!["x".into()], t)
            .await
            .expect_err("ended");
    assert!(err.to_string().contains("not running"), "{err}");
    let err =
        n.rt.exec(&id, "nope", vec!["x".into()], t)
            .await
            .expect_err("no such");
    assert!(
        matches!(err, RuntimeError::ContainerNotFound { .. }),
        "{err}"
    );
    let ghost = runtime::PodId("wasm-ghost".into());
    let err =
        n.rt.exec(&ghost, "h", vec!["x".into()], t)
            .await
            .expect_err("no pod");
    assert!(matches!(err, RuntimeError::NotFound(_)), "{err}");
    let host = tempfile::tempdir().expect("host dir");
    let id = run(&n.rt, &toolbox_pod(host.path())).await;
    wait_running(&n.rt, &id).await;
    let err = n.rt.exec(&id, "tb", vec![], t).await.expect_err("empty");
    assert!(matches!(err, RuntimeError::InvalidSpec(_)), "{err}");
    n.rt.remove_pod(&id).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_poll_runs_on_the_caller_only_when_the_executor_is_idle() {
    let _shared = crate::CPU_LOCK.read().await;
    let n = node_with(|c| c.executor_threads = 1);
    let hello = pod("hello", vec![container("h", "hello", &[])]);
    let id = run(&n.rt, &hello).await;
    wait_done(&n.rt, &id).await;
    let b = n.rt.start_breakdown(&id).expect("breakdown")[0].expect("started");
    assert!(b.on_caller, "idle executor: first poll inline");
    // A spinner keeps the only executor busy: new pods are handed to it, not run inline.
    let spin = run(&n.rt, &pod("spin", vec![container("s", "spinner", &[])])).await;
    wait_running(&n.rt, &spin).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id2 = run(&n.rt, &hello).await;
    let st = wait_done(&n.rt, &id2).await;
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0)
    );
    let b = n.rt.start_breakdown(&id2).expect("breakdown")[0].expect("started");
    assert!(!b.on_caller, "busy executor: handed over");
    n.rt.remove_pod(&spin).await.expect("remove spinner");
}

/// A one-file HTTPS server on loopback with a certificate from its own CA.
struct TlsServer {
    port: u16,
    ca_pem: String,
    requests: Arc<AtomicUsize>,
}

fn tls_server(body: Vec<u8>) -> TlsServer {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test registry CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()])
        .expect("params");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            // A client that refuses our certificate ends the handshake with an error here.
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            if !req.starts_with(b"GET /hello.wasm ") {
                continue;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/wasm\r\n\r\n",
                body.len()
            );
            let _ = s
                .write_all(head.as_bytes())
                .and_then(|()| s.write_all(&body));
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    TlsServer {
        port,
        ca_pem: ca_cert.pem(),
        requests,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_images_verify_the_server_and_the_pin() {
    use sha2::Digest as _;
    let _shared = crate::CPU_LOCK.read().await;
    let wasm = std::fs::read(runtime::wasm::guests::path("hello")).expect("hello.wasm");
    let digest = hex::encode(sha2::Sha256::digest(&wasm));
    let srv = tls_server(wasm);
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &srv.ca_pem).expect("write ca");
    let url = format!("https://127.0.0.1:{}/hello.wasm", srv.port);

    // Without the registry's CA the server is not trusted: nothing is fetched.
    let untrusting = node_with(|c| c.cache_dir = Some(dir.path().join("cache-a")));
    let err = untrusting.rt.pull(&url).await.expect_err("untrusted");
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);

    let n = node_with(|c| {
        c.cache_dir = Some(dir.path().join("cache-b"));
        c.extra_ca_bundle = Some(ca.clone());
    });
    let bad = format!("{url}@sha256:{}", "0".repeat(64));
    let err = n.rt.pull(&bad).await.expect_err("digest mismatch");
    assert!(matches!(err, RuntimeError::ImageRefused { .. }), "{err}");
    let pinned = format!("{url}@sha256:{digest}");
    let mut c = container("h", "hello", &["over", "tls"]);
    c.image = pinned.clone();
    let id = run(&n.rt, &pod("https", vec![c])).await;
    let st = wait_done(&n.rt, &id).await;
    assert_eq!(
        st.containers[0].state.terminated().map(|t| t.exit_code),
        Some(0)
    );
    let logs = n.rt.logs(&id, "h").await.expect("logs");
    assert!(logs.contains(r#"args=["h", "over", "tls"]"#), "{logs}");
    let fetched = srv.requests.load(Ordering::SeqCst);
    assert_eq!(fetched, 2, "the bad pin and the good one each fetched once");
    // Pinned and already in the content-addressed cache: no second download.
    n.rt.pull(&pinned).await.expect("cached pull");
    assert_eq!(srv.requests.load(Ordering::SeqCst), fetched);

    // A bad extra bundle is a configuration error at node start.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write junk");
    let mut cfg = runtime::WasmRuntimeConfig::new(dir.path().join("root-c"));
    cfg.max_pods = 4;
    cfg.extra_ca_bundle = Some(junk);
    assert!(matches!(
        runtime::WasmRuntime::new(cfg),
        Err(RuntimeError::Config(_))
    ));
}
