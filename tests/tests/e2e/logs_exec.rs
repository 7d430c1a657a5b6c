//! `kubectl logs` and `kubectl exec` through the API server to the node agents, and probes.
//!
//! Logs come from a wasm pod (the `sleeper` guest prints a tick every 100 ms). Exec runs on an
//! agent whose runtime is the `FakeRuntime` (its built-in `echo`, `exit N` and `stderr`
//! commands), so the exit-code path is exercised without depending on a particular guest.
//! The probe test drives readiness through an httpGet probe against a local listener and
//! liveness through a scripted exec probe.
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use runtime::testing::{FakeBehavior, FakeRuntime};
use runtime::{AnyRuntime, ExecOutput};
use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{WAIT, init_tracing};

/// What a kubectl run produced.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kubectl_with(kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<Out> {
    let bin = tests::kubectl().context("kubectl missing")?;
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn kubectl(c: &Cluster, args: &[&str]) -> anyhow::Result<Out> {
    tokio::task::block_in_place(|| kubectl_with(&c.kubeconfig(), args))
}

fn ok(c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let o = kubectl(c, args)?;
    anyhow::ensure!(
        o.code == 0,
        "kubectl {args:?} exited {}: {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(o.stdout)
}

/// An agent over the `FakeRuntime`, joined like the harness joins wasm agents.
async fn fake_agent(
    c: &Cluster,
    name: &str,
    stop: &CancellationToken,
) -> anyhow::Result<(Arc<AnyRuntime>, tokio::task::JoinHandle<()>)> {
    let mut cfg = c.agent_config(name)?;
    cfg.backoff_initial = Duration::from_millis(500);
    cfg.backoff_max = Duration::from_secs(4);
    cfg.labels = BTreeMap::new();
    // The fake runs "images" that are not wasm modules, as a CRI node would.
    cfg.runtime_classes = vec!["wasm".into(), runtime::api::pod::OCI_RUNTIME_CLASS.into()];
    let fake = FakeRuntime::new();
    fake.script("forever", FakeBehavior::RunForever);
    tests::spawn_agent(cfg, AnyRuntime::Fake(fake), stop)
}

fn fake(rt: &AnyRuntime) -> &FakeRuntime {
    match rt {
        AnyRuntime::Fake(f) => f,
        _ => unreachable!("the fake agent runs the FakeRuntime"),
    }
}

fn on_node(mut pod: Value, node: &str) -> Value {
    pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    pod
}

async fn wait_running(c: &Cluster, name: &str) -> anyhow::Result<()> {
    eventually(&format!("{name} Running"), WAIT, || async {
        let p = c
            .admin
            .get(&format!("/api/v1/namespaces/default/pods/{name}"))
            .await?;
        let running = p.as_ref().is_some_and(|p| {
            tests::phase(p) == "Running"
                && p.pointer("/status/containerStatuses/0/state/running")
                    .is_some()
        });
        Ok(if running {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_and_exec_reach_the_node() -> anyhow::Result<()> {
    init_tracing();
    if tests::kubectl().is_none() {
        eprintln!("SKIPPED: kubectl not installed (run scripts/kubectl)");
        return Ok(());
    }
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-wasm", |_| {}).await?;
    let stop = CancellationToken::new();
    let (_rt, fake_task) = fake_agent(&c, "node-fake", &stop).await?;

    // --- logs, from a wasm pod ---
    let ticker = on_node(
        super::pod("ticker", "sleeper", &["100"], "Always"),
        "node-wasm",
    );
    c.create("/api/v1/namespaces/default/pods", &ticker).await?;
    wait_running(&c, "ticker").await?;
    let first = eventually("three ticks in the log", WAIT, || async {
        let out = ok(&c, &["logs", "ticker"])?;
        Ok(if out.lines().count() >= 3 {
            Ok(out)
        } else {
            Err(out)
        })
    })
    .await?;
    assert!(first.starts_with("tick 1\n"), "{first}");
    assert!(
        first.lines().all(|l| l.starts_with("tick ")),
        "plain lines, no CRI framing: {first}"
    );
    let tail = ok(&c, &["logs", "ticker", "--tail=2"])?;
    assert_eq!(tail.lines().count(), 2, "{tail}");
    let stamped = ok(&c, &["logs", "ticker", "--tail=1", "--timestamps"])?;
    let (ts, text) = stamped
        .trim_end()
        .split_once(' ')
        .context("timestamped line")?;
    assert!(
        ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'),
        "{stamped}"
    );
    assert!(text.starts_with("tick "), "{stamped}");
    let recent = ok(&c, &["logs", "ticker", "--since=1h", "-c", "main"])?;
    assert!(recent.lines().count() >= 3, "{recent}");

    // --follow streams new lines until kubectl is stopped.
    let followed = tokio::task::block_in_place(|| -> anyhow::Result<String> {
        let bin = tests::kubectl().context("kubectl missing")?;
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args(["logs", "-f", "ticker", "--tail=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(3));
        child.kill()?;
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    let ticks: Vec<u64> = followed
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        ticks.len() >= 5,
        "follow kept streaming (100 ms ticks for 3 s): {followed:?}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "no line lost or repeated: {ticks:?}"
    );

    // Errors as Kubernetes words them.
    let o = kubectl(&c, &["logs", "nope"])?;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("pods \"nope\" not found"), "{}", o.stderr);
    let o = kubectl(&c, &["logs", "ticker", "-c", "wrong"])?;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("container wrong is not valid for pod ticker"),
        "{}",
        o.stderr
    );

    // A crash-looping pod: its previous instance's log stays readable (--previous), and
    // so does the last one while it waits to restart.
    let crasher = on_node(
        super::pod("crasher", "exit_code", &["7"], "Always"),
        "node-wasm",
    );
    c.create("/api/v1/namespaces/default/pods", &crasher)
        .await?;
    eventually("crasher restarted", WAIT, || async {
        let p = c
            .admin
            .get("/api/v1/namespaces/default/pods/crasher")
            .await?
            .context("pod")?;
        let n = p
            .pointer("/status/containerStatuses/0/restartCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        Ok(if n >= 1 { Ok(()) } else { Err(p.to_string()) })
    })
    .await?;
    let prev = ok(&c, &["logs", "crasher", "--previous"])?;
    assert_eq!(prev, "exiting with 7\n");
    let cur = ok(&c, &["logs", "crasher"])?;
    assert_eq!(cur, "exiting with 7\n");
    let o = kubectl(&c, &["logs", "ticker", "--previous"])?;
    assert_ne!(o.code, 0, "ticker never restarted: {}", o.stdout);
    assert!(
        o.stderr
            .contains("previous terminated container \"main\" in pod \"ticker\" not found"),
        "{}",
        o.stderr
    );

    // --- exec into a wasm pod: a fresh instance of its module in the same sandbox ---
    let tb = on_node(
        super::pod("toolbox", "toolbox", &["serve", "1000"], "Always"),
        "node-wasm",
    );
    c.create("/api/v1/namespaces/default/pods", &tb).await?;
    wait_running(&c, "toolbox").await?;
    let o = kubectl(&c, &["exec", "toolbox", "--", "echo", "from", "wasm"])?;
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "from wasm\n"),
        "{}",
        o.stderr
    );
    let o = kubectl(&c, &["exec", "toolbox", "--", "exit", "4"])?;
    assert_eq!(o.code, 4, "{}{}", o.stdout, o.stderr);
    // The exec upgrade went through the audit layer: a long-running request's two stages.
    let audited = std::fs::read_to_string(c.dir.path().join("audit.log"))?;
    let exec_stages: Vec<String> = audited
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["objectRef"]["subresource"] == "exec" && e["objectRef"]["name"] == "toolbox")
        .map(|e| e["stage"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        exec_stages.iter().any(|s| s == "ResponseStarted")
            && exec_stages.iter().any(|s| s == "ResponseComplete"),
        "exec audit stages: {exec_stages:?}"
    );
    // An exported function, by name.
    let o = kubectl(&c, &["exec", "toolbox", "--", "unhealthy"])?;
    assert_eq!(o.code, 3, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("not healthy"), "{}", o.stderr);

    // --- exec, on the fake agent ---
    let shell = on_node(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shell", "namespace": "default"},
               "spec": {"containers": [{"name": "main", "image": "forever"}]}}),
        "node-fake",
    );
    c.create("/api/v1/namespaces/default/pods", &shell).await?;
    wait_running(&c, "shell").await?;
    let o = kubectl(&c, &["exec", "shell", "--", "echo", "hello", "world"])?;
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "hello world\n"),
        "{}",
        o.stderr
    );
    let o = kubectl(&c, &["exec", "shell", "--", "exit", "3"])?;
    assert_eq!(o.code, 3, "exit code propagates: {}{}", o.stdout, o.stderr);
    let o = kubectl(&c, &["exec", "shell", "-c", "main", "--", "stderr", "oops"])?;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("oops"),
        "stderr on its channel: {}",
        o.stderr
    );
    assert!(!o.stdout.contains("oops"), "{}", o.stdout);
    // Longer than client-go's ping deadline: the connection must stay alive meanwhile.
    let o = kubectl(&c, &["exec", "shell", "--", "sleep", "8"])?;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = kubectl(&c, &["exec", "shell", "--", "no-such-command"])?;
    assert_eq!(o.code, 127, "{}{}", o.stdout, o.stderr);
    let o = kubectl(&c, &["exec", "nope", "--", "true"])?;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("pods \"nope\" not found"), "{}", o.stderr);

    // The read-only role reads logs but may not exec.
    let ro = c.dir.path().join("readonly-kubeconfig.yaml");
    let o = tokio::task::block_in_place(|| kubectl_with(&ro, &["logs", "ticker", "--tail=1"]))?;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = tokio::task::block_in_place(|| kubectl_with(&ro, &["exec", "shell", "--", "true"]))?;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("forbidden"), "{}", o.stderr);

    // The official Python client (same venv as kubectl): logs, and exec over v4/v5.
    python_client(&c)?;

    // The agent refuses callers without the API server's credential.
    let node = c
        .admin
        .get("/api/v1/nodes/node-fake")
        .await?
        .context("node")?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .context("kubelet port advertised")?;
    assert_ne!(port, 0);
    let o = agent_answer_to_wrong_token(u16::try_from(port)?).await?;
    assert_ne!(o.code, 0, "agent answered a wrong token: {}", o.stdout);
    assert!(o.stderr.contains("Unauthorized"), "{}", o.stderr);

    stop.cancel();
    let _ = fake_task.await;
    // Its node is gone: 503 with the dialing error, as Kubernetes words it.
    let o = kubectl(&c, &["logs", "shell"])?;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("error dialing backend") && o.stderr.contains("node-fake"),
        "{}",
        o.stderr
    );
    c.stop().await;
    Ok(())
}

/// `read_namespaced_pod_log` and `stream(connect_get_namespaced_pod_exec)` of the Python
/// client 37 against the `ticker` and `shell` pods; skipped when the venv lacks it.
fn python_client(c: &Cluster) -> anyhow::Result<()> {
    let Some(py) = tests::kubectl().map(|k| k.with_file_name("python")) else {
        return Ok(());
    };
    const SCRIPT: &str = r#"
import sys
try:
    from kubernetes import client, config
    from kubernetes.stream import stream
except ImportError:
    print("NO-CLIENT")
    sys.exit(0)
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
log = v1.read_namespaced_pod_log("ticker", "default", tail_lines=2, timestamps=True)
print("LOGLINES", len(log.splitlines()), log.splitlines()[-1].split(" ", 1)[1])
for cmd in (["echo", "from", "python"], ["exit", "5"]):
    ws = stream(v1.connect_get_namespaced_pod_exec, "shell", "default", command=cmd,
                stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False)
    ws.run_forever(timeout=30)
    print("EXEC", repr(ws.read_stdout()), ws.returncode)
"#;
    let out = tokio::task::block_in_place(|| {
        Command::new(&py)
            .arg("-c")
            .arg(SCRIPT)
            .arg(c.kubeconfig())
            .output()
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "python client failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("NO-CLIENT") {
        eprintln!("SKIPPED: the Python kubernetes client is not installed");
        return Ok(());
    }
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("LOGLINES 2 tick "),
        "tail and timestamps from Python: {text}"
    );
    assert_eq!(lines[1], "EXEC 'from python\\n' 0", "{text}");
    assert_eq!(lines[2], "EXEC '' 5", "{text}");
    Ok(())
}

/// kubectl's answer to a request to the agent with a wrong token (TLS not verified).
async fn agent_answer_to_wrong_token(port: u16) -> anyhow::Result<Out> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user: {{token: wrong}}\ncontexts:\n- name: a\n  context: {{cluster: a, user: u}}\ncurrent-context: a\n"
        ),
    )?;
    tokio::task::block_in_place(|| {
        kubectl_with(&cfg, &["get", "--raw", "/containerLogs/default/shell/main"])
    })
}

/// A local HTTP server answering 200 or 503 depending on a switch.
async fn health_server(healthy: Arc<AtomicBool>) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let ok = healthy.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = if ok {
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

fn condition(p: &Value, ty: &str) -> String {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_drive_readiness_and_restarts() -> anyhow::Result<()> {
    init_tracing();
    let c = Cluster::start(ClusterOptions::default()).await?;
    let stop = CancellationToken::new();
    let (rt, fake_task) = fake_agent(&c, "node-fake", &stop).await?;
    let fake = fake(&rt);
    let healthy = Arc::new(AtomicBool::new(false));
    let port = health_server(healthy.clone()).await?;
    fake.script_exec(
        "live-check",
        ExecOutput {
            exit_code: 0,
            stdout: b"alive".to_vec(),
            stderr: Vec::new(),
        },
    );
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probed", "namespace": "default"},
        "spec": {"containers": [{
            "name": "main", "image": "forever",
            "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
            "livenessProbe": {"exec": {"command": ["live-check"]}, "periodSeconds": 1, "failureThreshold": 2},
        }]},
    });
    c.create("/api/v1/namespaces/default/pods", &pod).await?;
    let path = "/api/v1/namespaces/default/pods/probed";
    let get = || async { c.admin.get(path).await?.context("pod exists") };

    // Running but not ready while the endpoint answers 503.
    eventually("Running, not Ready", WAIT, || async {
        let p = get().await?;
        Ok(
            if tests::phase(&p) == "Running" && condition(&p, "Ready") == "False" {
                Ok(())
            } else {
                Err(p.to_string())
            },
        )
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = get().await?;
    assert_eq!(condition(&p, "Ready"), "False", "{p}");
    assert_eq!(
        p.pointer("/status/containerStatuses/0/ready"),
        Some(&json!(false))
    );

    // The endpoint turns healthy: Ready and ContainersReady flip to True.
    healthy.store(true, Ordering::SeqCst);
    eventually("Ready", WAIT, || async {
        let p = get().await?;
        Ok(
            if condition(&p, "Ready") == "True"
                && condition(&p, "ContainersReady") == "True"
                && p.pointer("/status/containerStatuses/0/ready") == Some(&json!(true))
            {
                Ok(())
            } else {
                Err(p.to_string())
            },
        )
    })
    .await?;
    // And back.
    healthy.store(false, Ordering::SeqCst);
    eventually("not Ready again", WAIT, || async {
        let p = get().await?;
        Ok(if condition(&p, "Ready") == "False" {
            Ok(())
        } else {
            Err(p.to_string())
        })
    })
    .await?;
    let restarts = |p: &Value| {
        p.pointer("/status/containerStatuses/0/restartCount")
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    assert_eq!(restarts(&get().await?), 0, "readiness never restarts");

    // The liveness probe starts failing: the container is restarted.
    fake.script_exec(
        "live-check",
        ExecOutput {
            exit_code: 1,
            stdout: b"dead".to_vec(),
            stderr: Vec::new(),
        },
    );
    eventually("restarted by liveness", WAIT, || async {
        let p = get().await?;
        Ok(if restarts(&p) >= 1 {
            Ok(())
        } else {
            Err(p.to_string())
        })
    })
    .await?;
    let events = c.admin.list("/api/v1/namespaces/default/events").await?.0;
    let has = |reason: &str, text: &str| {
        events.iter().any(|e| {
            e["reason"] == reason
                && e["involvedObject"]["name"] == "probed"
                && e["message"].as_str().is_some_and(|m| m.contains(text))
        })
    };
    assert!(
        has("Unhealthy", "Liveness probe failed: dead"),
        "{events:?}"
    );
    assert!(has("Unhealthy", "Readiness probe failed"), "{events:?}");
    assert!(
        has(
            "Killing",
            "Container main failed liveness probe, will be restarted"
        ),
        "{events:?}"
    );

    stop.cancel();
    let _ = fake_task.await;
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_exec_probes_call_exported_functions() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-wasm", |_| {}).await?;
    let probed = |name: &str, probe: &str, check: &str| {
        let mut p = super::pod(name, "toolbox", &["serve", "1000"], "Always");
        p["spec"]["containers"][0][probe] =
            json!({"exec": {"command": [check]}, "periodSeconds": 1, "failureThreshold": 2});
        p
    };
    c.create(
        "/api/v1/namespaces/default/pods",
        &probed("ready-wasm", "readinessProbe", "healthz"),
    )
    .await?;
    c.create(
        "/api/v1/namespaces/default/pods",
        &probed("sick-wasm", "livenessProbe", "unhealthy"),
    )
    .await?;
    let get = |name: &'static str| {
        let c = &c;
        async move {
            c.admin
                .get(&format!("/api/v1/namespaces/default/pods/{name}"))
                .await?
                .context("pod exists")
        }
    };
    eventually(
        "ready-wasm Ready through its healthz export",
        WAIT,
        || async {
            let p = get("ready-wasm").await?;
            Ok(if condition(&p, "Ready") == "True" {
                Ok(())
            } else {
                Err(p.to_string())
            })
        },
    )
    .await?;
    eventually(
        "sick-wasm restarted by its liveness probe",
        WAIT,
        || async {
            let p = get("sick-wasm").await?;
            let n = p
                .pointer("/status/containerStatuses/0/restartCount")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            Ok(if n >= 1 { Ok(()) } else { Err(p.to_string()) })
        },
    )
    .await?;
    let p = get("ready-wasm").await?;
    assert_eq!(
        p.pointer("/status/containerStatuses/0/restartCount"),
        Some(&json!(0)),
        "a passing probe never restarts: {p}"
    );
    c.stop().await;
    Ok(())
}

/// kubectl with `input` piped to its stdin.
fn kubectl_in(c: &Cluster, args: &[&str], input: &str) -> anyhow::Result<Out> {
    use std::io::Write as _;
    let bin = tests::kubectl().context("kubectl missing")?;
    tokio::task::block_in_place(|| {
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut si) = child.stdin.take() {
            si.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    })
}

/// Runs kubectl with `args`, returns the first stdout line and how long it took, and the
/// time until kubectl exited (killed after `kill_after` if it still runs).
fn first_line_then_end(
    c: &Cluster,
    args: &[&str],
    kill_after: Option<Duration>,
) -> anyhow::Result<(String, Duration, Duration, i32)> {
    use std::io::BufRead as _;
    let bin = tests::kubectl().context("kubectl missing")?;
    tokio::task::block_in_place(|| {
        let start = std::time::Instant::now();
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let first = start.elapsed();
        if let Some(k) = kill_after {
            std::thread::sleep(k);
            let _ = child.kill();
        }
        let status = child.wait()?;
        Ok((line, first, start.elapsed(), status.code().unwrap_or(-1)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_streams_stdin_tty_and_attach() -> anyhow::Result<()> {
    init_tracing();
    if tests::kubectl().is_none() {
        eprintln!("SKIPPED: kubectl not installed (run scripts/kubectl)");
        return Ok(());
    }
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-wasm", |_| {}).await?;
    let stop = CancellationToken::new();
    let (_rt, fake_task) = fake_agent(&c, "node-fake", &stop).await?;

    // --- the fake runtime's streaming commands ---
    let shell = on_node(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shell", "namespace": "default"},
               "spec": {"containers": [{"name": "main", "image": "forever"}]}}),
        "node-fake",
    );
    c.create("/api/v1/namespaces/default/pods", &shell).await?;
    wait_running(&c, "shell").await?;
    // stdin reaches the process, and its end (v5 close signal) ends `cat`.
    let o = kubectl_in(&c, &["exec", "-i", "shell", "--", "cat"], "hello\nworld\n")?;
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "hello\nworld\n"),
        "{}",
        o.stderr
    );
    // Output streams as produced: the first line of `count 4` (lines 300 ms apart) comes
    // well before the command ends.
    let (line, first, end, code) =
        first_line_then_end(&c, &["exec", "shell", "--", "count", "4"], None)?;
    assert_eq!((line.as_str(), code), ("1\n", 0));
    assert!(
        end.saturating_sub(first) >= Duration::from_millis(700),
        "first line at {first:?}, end at {end:?}"
    );
    // Exit codes still propagate through the stream.
    let o = kubectl_in(&c, &["exec", "-i", "shell", "--", "exit", "6"], "")?;
    assert_eq!(o.code, 6, "{}{}", o.stdout, o.stderr);
    // A TTY under a pseudo-terminal: kubectl sends the terminal size on the resize channel.
    let kubectl_bin = tests::kubectl().context("kubectl")?;
    let line = format!(
        "stty cols 101 rows 33; {} --kubeconfig {} exec -it shell -- size",
        kubectl_bin.display(),
        c.kubeconfig().display()
    );
    let out = tokio::task::block_in_place(|| {
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
    });
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && text.contains("101x33"),
                "exec -it under script: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => eprintln!("SKIPPED the TTY check: no `script` ({e})"),
    }

    // --- wasm: a fresh instance with WASI stdio wired to the session ---
    let upper = on_node(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "upper", "namespace": "default"},
               "spec": {"restartPolicy": "Never",
                        "containers": [{"name": "main", "image": tests::guest("upper"), "stdin": true}]}}),
        "node-wasm",
    );
    c.create("/api/v1/namespaces/default/pods", &upper).await?;
    // Its own stdin stays open (nothing attached yet), so it runs.
    wait_running(&c, "upper").await?;
    let o = kubectl_in(&c, &["exec", "-i", "upper", "--", "upper"], "abc\n")?;
    assert_eq!((o.code, o.stdout.as_str()), (0, "ABC\n"), "{}", o.stderr);
    let tb = on_node(
        super::pod("toolbox", "toolbox", &["serve", "1000"], "Always"),
        "node-wasm",
    );
    c.create("/api/v1/namespaces/default/pods", &tb).await?;
    wait_running(&c, "toolbox").await?;
    // With -t the wasm session ends lines as a terminal would (no terminal driver there).
    let line = format!(
        "{} --kubeconfig {} exec -it toolbox -- echo from tty",
        kubectl_bin.display(),
        c.kubeconfig().display()
    );
    if let Ok(out) = tokio::task::block_in_place(|| {
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
    }) {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("from tty\r\n"), "exec -it on wasm: {text:?}");
        // kubectl closes first, so its last resize write does not hit a closed socket.
        assert!(!text.contains("failed"), "exec -it on wasm: {text:?}");
    }
    // A guest that never ends: its first tick arrives while it runs (then kubectl is stopped).
    let (line, first, _, _) = first_line_then_end(
        &c,
        &["exec", "toolbox", "--", "serve", "200"],
        Some(Duration::from_millis(100)),
    )?;
    assert_eq!(line, "tick 1\n");
    assert!(first < Duration::from_secs(20), "{first:?}");

    // --- attach: the running container's stdin and output ---
    let o = kubectl_in(&c, &["attach", "-i", "upper"], "attached\n")?;
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "ATTACHED\n"),
        "{}",
        o.stderr
    );
    eventually("upper Succeeded", WAIT, || async {
        let p = c
            .admin
            .get("/api/v1/namespaces/default/pods/upper")
            .await?
            .context("pod")?;
        Ok(if tests::phase(&p) == "Succeeded" {
            Ok(())
        } else {
            Err(p.to_string())
        })
    })
    .await?;

    // --- port-forward: SPDY in the WebSocket, dialled by the agent to the pod's address
    // (the fake node's pods share its 127.0.0.1, where an echo server listens) ---
    port_forward_echoes(&c).await?;

    stop.cancel();
    let _ = fake_task.await;
    c.stop().await;
    Ok(())
}

/// `kubectl port-forward pod/shell :PORT` to an echo server: two connections, each echoed.
async fn port_forward_echoes(c: &Cluster) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = echo.local_addr()?.port();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let bin = tests::kubectl().context("kubectl")?;
    let kubeconfig = c.kubeconfig();
    let result = tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["port-forward", "pod/shell", &format!(":{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        // "Forwarding from 127.0.0.1:LOCAL -> PORT"
        let local: u16 = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("kubectl said {line:?}"))?;
        let checked = (|| -> anyhow::Result<()> {
            for msg in ["ping one\n", "ping two, a second connection\n"] {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", local))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s.write_all(msg.as_bytes())?;
                let mut got = vec![0u8; msg.len()];
                s.read_exact(&mut got)?;
                anyhow::ensure!(
                    got == msg.as_bytes(),
                    "echoed {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            // Far past SPDY's 64 KiB initial windows, both ways at once: kubectl's SPDY
            // (moby/spdystream) never sends WINDOW_UPDATE, so the agent must not stall on it.
            let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
            let s = std::net::TcpStream::connect(("127.0.0.1", local))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut w = s.try_clone()?;
            let to_send = big.clone();
            let writer = std::thread::spawn(move || w.write_all(&to_send));
            let mut got = vec![0u8; big.len()];
            let started = std::time::Instant::now();
            (&s).read_exact(&mut got)?;
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??;
            anyhow::ensure!(got == big, "4 MiB echo differs");
            eprintln!("port-forward echoed 4 MiB in {:?}", started.elapsed());
            Ok(())
        })();
        let _ = child.kill();
        let output = child.wait_with_output()?;
        checked.with_context(|| {
            format!(
                "port-forward stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    });
    server.abort();
    result
}
