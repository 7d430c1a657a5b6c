//! The real CRI tier at kubectl level: a node agent whose runtimes are wasm and the containerd
//! started by `scripts/containerd` (`FLOTILLA_CRI_SOCKET`), driven by the real kubectl.
//!
//! Without `FLOTILLA_CRI_SOCKET` (or without kubectl) these tests print that they were skipped
//! and pass, unless `FLOTILLA_REQUIRE_CRI=1` (set by `.ci/run`), which makes them fail.
//! What the tier checks, in order: a Deployment of the locally built busybox runs on containerd
//! next to a wasm pod; `kubectl logs`, `kubectl exec` (also 1 MiB each way) and `kubectl attach
//! -i`; ErrImagePull → ImagePullBackOff and
//! ErrImageNeverPull; OOMKilled over a memory limit; CPU throttled to its limit; an agent
//! restart re-adopts the running containers and removes the orphan of a pod deleted meanwhile;
//! deleting everything leaves no sandbox, container or pod cgroup in containerd. Beside it:
//! a node offering CRI once its endpoint answers (and the scheduler placing a `runc` pod only
//! there), the agent path against the fake CRI (runs everywhere), and the benchmark
//! (OCI vs wasm create → Running and memory per pod through the whole stack, printed).
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use runtime::PodRuntime;
use runtime::cri::{CriRuntime, CriRuntimeConfig};
use runtime::node::{CRI_CONDITION, CriSettings, NodeRuntimes, RUNTIME_CLASSES_ANNOTATION};
use runtime::{WasmRuntime, WasmRuntimeConfig};
use serde_json::Value;
use tests::{Cluster, ClusterOptions, eventually};
use tokio_util::sync::CancellationToken;

use super::{WAIT, init_tracing};

const BUSYBOX: &str = "localhost/busybox:v1";
const CGROUP_ROOT: &str = "/flotilla-e2e";

/// The tests share one containerd and measure CPU: one at a time.
static CRI_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CRI socket and kubectl, or `None` (skip) unless the tier is required.
fn prerequisites(test: &str) -> Option<(String, std::path::PathBuf)> {
    let required = std::env::var("FLOTILLA_REQUIRE_CRI").as_deref() == Ok("1");
    let socket = std::env::var("FLOTILLA_CRI_SOCKET")
        .ok()
        .filter(|s| !s.is_empty());
    let kubectl = tests::kubectl();
    match (socket, kubectl) {
        (Some(s), Some(k)) => Some((s, k)),
        (s, _) => {
            let missing = if s.is_none() {
                "FLOTILLA_CRI_SOCKET is not set (export FLOTILLA_CRI_SOCKET=$(scripts/containerd))"
            } else {
                "kubectl is not installed (run scripts/kubectl)"
            };
            assert!(!required, "FLOTILLA_REQUIRE_CRI=1 but {missing}");
            eprintln!("SKIPPED {test}: {missing}");
            None
        }
    }
}

/// Starts kubectl against the cluster with all three standard streams piped.
fn spawn_kubectl(kc: &Path, c: &Cluster, args: &[&str]) -> std::io::Result<std::process::Child> {
    Command::new(kc)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
}

fn kubectl(kc: &Path, c: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = spawn_kubectl(kc, c, args)?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// [`kubectl`] for a streaming session (attach): killed if still running after `limit`, so a
/// session that never ends fails the test instead of hanging it.
fn kubectl_session(
    kc: &Path,
    c: &Cluster,
    args: &[&str],
    stdin: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut child = spawn_kubectl(kc, c, args)?;
    // Written and closed: the session sees the input end.
    if let Some(mut si) = child.stdin.take() {
        si.write_all(stdin.as_bytes())?;
    }
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    match status {
        Some(st) if st.success() => Ok(out),
        Some(st) => anyhow::bail!("kubectl {args:?} failed ({st}): {out}{err}"),
        None => anyhow::bail!("kubectl {args:?} still running after {limit:?}: {out}{err}"),
    }
}

/// `kubectl port-forward POD :PORT`, then an HTTP GET of `path` through it: the response.
fn port_forward_get(
    kc: &Path,
    c: &Cluster,
    pod: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Read as _, Write as _};
    // `kc` is the kubectl binary here, as in `kubectl` above.
    let mut child = Command::new(kc)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(["port-forward", pod, &format!(":{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let got = (|| -> anyhow::Result<String> {
        let local: u16 = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("kubectl said {line:?}"))?;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", local))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })();
    let _ = child.kill();
    let output = child.wait_with_output()?;
    got.with_context(|| format!("port-forward: {}", String::from_utf8_lossy(&output.stderr)))
}

/// Runs kubectl off the async threads.
async fn k(kc: &Path, c: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    tokio::task::block_in_place(|| kubectl(kc, c, args, None))
}

async fn apply(kc: &Path, c: &Cluster, manifest: &str) -> anyhow::Result<String> {
    tokio::task::block_in_place(|| kubectl(kc, c, &["apply", "-f", "-"], Some(manifest)))
}

/// A node agent with wasm and CRI runtimes, stoppable like a process.
struct CriAgent {
    runtime: Arc<NodeRuntimes>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CriAgent {
    /// Stops the agent process (its CRI pods keep running in containerd).
    async fn kill(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn cri_config(endpoint: &str, root: &Path, instance: &str) -> CriRuntimeConfig {
    let mut cfg = CriRuntimeConfig::new(endpoint, root.join("cri"));
    cfg.instance = instance.to_owned();
    cfg.cgroup_root = Some(CGROUP_ROOT.into());
    cfg
}

async fn start_agent(
    c: &Cluster,
    name: &str,
    endpoint: &str,
    root: &Path,
) -> anyhow::Result<CriAgent> {
    start_agent_with(c, name, endpoint, root, None, true).await
}

/// [`start_agent`] with another bearer token than the node's.
async fn start_agent_with(
    c: &Cluster,
    name: &str,
    endpoint: &str,
    root: &Path,
    token: Option<String>,
    host_network: bool,
) -> anyhow::Result<CriAgent> {
    let mut cfg = c.agent_config(name)?;
    if token.is_some() {
        cfg.token = token;
    }
    cfg.status_every_heartbeats = 2;
    cfg.backoff_initial = Duration::from_secs(1);
    cfg.backoff_max = Duration::from_secs(4);
    cfg.volume_dir = root.join("volumes");
    let mut wcfg = WasmRuntimeConfig::new(root.join("wasm"));
    wcfg.max_pods = 64;
    wcfg.executor_threads = 1;
    let stop = CancellationToken::new();
    let mut config = cri_config(endpoint, root, name);
    config.host_network = host_network;
    let mut settings = CriSettings::new(config);
    settings.recheck = Duration::from_millis(200);
    let rts = NodeRuntimes::start(WasmRuntime::new(wcfg)?, Some(settings), stop.clone()).await;
    let (runtime, task) = tests::spawn_agent(cfg, rts, &stop)?;
    Ok(CriAgent {
        runtime,
        stop,
        task,
    })
}

/// A CRI client of the node's instance, after removing what a crashed earlier run left.
async fn clean_cri(socket: &str, root: &Path, instance: &str) -> anyhow::Result<CriRuntime> {
    let cri = CriRuntime::connect(cri_config(socket, root, instance)).await?;
    let left = cri.remove_orphans(&[]).await?;
    if !left.is_empty() {
        eprintln!("removed {} leftover sandboxes", left.len());
    }
    Ok(cri)
}

async fn pod(c: &Cluster, name: &str) -> anyhow::Result<Value> {
    c.admin
        .get(&format!("/api/v1/namespaces/default/pods/{name}"))
        .await?
        .with_context(|| format!("pod {name} not found"))
}

/// Waits until pod `name`'s first container is running; returns the pod.
async fn first_container_running(c: &Cluster, name: &str) -> anyhow::Result<Value> {
    eventually(&format!("{name} Running"), WAIT, || async {
        let p = pod(c, name).await?;
        Ok(
            if p.pointer("/status/containerStatuses/0/state/running")
                .is_some()
            {
                Ok(p)
            } else {
                Err(format!("{:?}", waiting_reason(&p)))
            },
        )
    })
    .await
}

fn waiting_reason(p: &Value) -> (String, String) {
    let s = |f: &str| {
        p.pointer(&format!("/status/containerStatuses/0/state/waiting/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (s("reason"), s("message"))
}

/// Names of the Running, non-terminating busybox pods.
async fn running_busybox(c: &Cluster) -> anyhow::Result<Vec<String>> {
    Ok(super::running(c, "busybox-")
        .await?
        .iter()
        .filter_map(|p| p.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect())
}

const RUNTIME_CLASS: &str =
    "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: runc\nhandler: runc\n";

fn busybox_deployment() -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: busybox\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: busybox}}\n  template:\n    metadata:\n      labels: {{app: busybox}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        image: {BUSYBOX}\n        command: [/bin/sh, -c, 'echo hello from busybox; exec sleep 3600']\n        resources:\n          limits: {{memory: 64Mi, cpu: 200m}}\n"
    )
}

fn one_pod(name: &str, image: &str, policy: &str, script: &str, limits: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    imagePullPolicy: {policy}\n    command: [/bin/sh, -c, '{script}']\n    resources:\n      limits: {limits}\n"
    )
}

/// CPU time of a pod over `window`, as a share of one core.
async fn cpu_share(
    rt: &NodeRuntimes,
    id: &runtime::PodId,
    window: Duration,
) -> anyhow::Result<f64> {
    let before = rt.stats(id).await?.containers[0].cpu_ns;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let used = rt.stats(id).await?.containers[0].cpu_ns - before;
    #[allow(clippy::cast_precision_loss, reason = "a ratio for a bound check")]
    Ok(used as f64 / t0.elapsed().as_nanos() as f64)
}

/// `nr_throttled` summed over the cgroups of a pod's containers (cgroup v1 cpu controller).
fn nr_throttled(uid: &str) -> Option<u64> {
    let parent = runtime::cri::convert::cgroup_parent(
        CGROUP_ROOT,
        runtime::api::pod::QosClass::Burstable,
        uid,
    );
    let dir = Path::new("/sys/fs/cgroup/cpu").join(parent.trim_start_matches('/'));
    let mut total = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let stat = std::fs::read_to_string(entry.path().join("cpu.stat")).unwrap_or_default();
        for line in stat.lines() {
            if let Some(v) = line.strip_prefix("nr_throttled ") {
                *total.get_or_insert(0) += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_runs_busybox_on_containerd_through_cri() -> anyhow::Result<()> {
    init_tracing();
    let Some((socket, kc)) = prerequisites("kubectl_runs_busybox_on_containerd_through_cri") else {
        return Ok(());
    };
    let _one = CRI_LOCK.lock().await;
    let root = tempfile::tempdir()?;
    let node = "cri-e2e-node";
    let cri = clean_cri(&socket, root.path(), node).await?;
    let c = Cluster::start(ClusterOptions::default()).await?;
    let agent = start_agent(&c, node, &socket, root.path()).await?;
    let kc = kc.as_path();

    // The node offers runc and the RuntimeClass named after it.
    apply(kc, &c, RUNTIME_CLASS).await?;
    eventually("the node to advertise runc", WAIT, || async {
        let n = c
            .admin
            .get(&format!("/api/v1/nodes/{node}"))
            .await?
            .unwrap_or_default();
        let classes = n
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(RUNTIME_CLASSES_ANNOTATION))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let cond = n
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == CRI_CONDITION))
            .map(|c| c["status"].as_str().unwrap_or_default().to_owned());
        Ok(
            if classes.split(',').any(|x| x == "runc") && cond.as_deref() == Some("False") {
                Ok(())
            } else {
                Err(format!("classes {classes:?}, {CRI_CONDITION} {cond:?}"))
            },
        )
    })
    .await?;

    // --- a Deployment of busybox (no runtimeClassName: an OCI image goes to CRI) and a wasm pod
    apply(kc, &c, &busybox_deployment()).await?;
    let wasm_pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: wasm-beside\nspec:\n  containers:\n  - name: main\n    image: {}\n    args: [\"300\"]\n",
        tests::guest("sleeper")
    );
    apply(kc, &c, &wasm_pod).await?;
    let started = Instant::now();
    eventually(
        "kubectl shows 2 busybox pods and the wasm pod Running",
        WAIT,
        || async {
            let out = k(kc, &c, &["get", "pods", "--no-headers"]).await?;
            let running = out
                .lines()
                .filter(|l| l.contains("Running") && l.contains("1/1"))
                .count();
            Ok(if running == 3 { Ok(()) } else { Err(out) })
        },
    )
    .await?;
    eprintln!("busybox Deployment Running after {:?}", started.elapsed());
    let names = running_busybox(&c).await?;
    assert_eq!(names.len(), 2, "{names:?}");
    let p = pod(&c, &names[0]).await?;
    let cid = p
        .pointer("/status/containerStatuses/0/containerID")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(cid.starts_with("containerd://"), "{cid}");
    let w = pod(&c, "wasm-beside").await?;
    let wid = w
        .pointer("/status/containerStatuses/0/containerID")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(wid.starts_with("wasm://"), "{wid}");
    // containerd really runs them: two sandboxes, two containers of this node.
    let pods = cri.list_pods().await?;
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert!(
        pods.iter()
            .all(|p| p.containers.len() == 1 && p.containers[0].state.is_running()),
        "{pods:?}"
    );
    let sandboxes_before: std::collections::BTreeSet<String> =
        pods.iter().map(|p| p.id.0.clone()).collect();

    // --- kubectl logs and exec, through the API server and the agent
    let logs = eventually("kubectl logs", WAIT, || async {
        let out = k(kc, &c, &["logs", &names[0]]).await?;
        Ok(if out.contains("hello from busybox") {
            Ok(out)
        } else {
            Err(out)
        })
    })
    .await?;
    assert_eq!(logs.trim(), "hello from busybox");
    let out = k(
        kc,
        &c,
        &[
            "exec",
            &names[0],
            "--",
            "/bin/sh",
            "-c",
            "echo $((6*7)); id -u",
        ],
    )
    .await?;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["42", "0"],
        "{out}"
    );

    // --- far past SPDY's 64 KiB windows, both ways, through containerd's streaming server
    // (which never sends WINDOW_UPDATE)
    let big_in = "a".repeat(1 << 20);
    let counted = tokio::task::block_in_place(|| {
        kubectl(
            kc,
            &c,
            &["exec", "-i", &names[0], "--", "wc", "-c"],
            Some(&big_in),
        )
    })?;
    assert_eq!(counted.trim(), "1048576");
    let zeros = k(
        kc,
        &c,
        &[
            "exec",
            &names[0],
            "--",
            "head",
            "-c",
            "1048576",
            "/dev/zero",
        ],
    )
    .await?;
    assert_eq!(zeros.len(), 1 << 20);

    // --- kubectl attach: the running container's own stdin and output, through the CRI
    // Attach RPC and containerd's streaming server
    let attach_pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: attach-me\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    stdin: true\n    command: [/bin/sh, -c, 'read line; echo \"got $line\"; read rest || echo eof']\n"
    );
    apply(kc, &c, &attach_pod).await?;
    first_container_running(&c, "attach-me").await?;
    let attached = tokio::task::block_in_place(|| {
        kubectl_session(
            kc,
            &c,
            &["attach", "-i", "attach-me"],
            "attached\n",
            Duration::from_secs(60),
        )
    })?;
    assert_eq!(attached, "got attached\neof\n");
    eventually("attach-me Succeeded", WAIT, || async {
        let p = pod(&c, "attach-me").await?;
        Ok(if tests::phase(&p) == "Succeeded" {
            Ok(())
        } else {
            Err(tests::phase(&p).to_owned())
        })
    })
    .await?;
    k(kc, &c, &["delete", "pod", "attach-me", "--wait=false"]).await?;

    // --- securityContext: a non-root UID, a read-only root, no capabilities
    let restricted = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: restricted\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sleep, '3600']\n    securityContext:\n      runAsUser: 1000\n      readOnlyRootFilesystem: true\n      allowPrivilegeEscalation: false\n      capabilities: {{drop: [ALL]}}\n"
    );
    apply(kc, &c, &restricted).await?;
    first_container_running(&c, "restricted").await?;
    let out = k(
        kc,
        &c,
        &[
            "exec",
            "restricted",
            "--",
            "/bin/sh",
            "-c",
            "id -u; touch /x 2>/dev/null && echo rw || echo ro; grep -E 'CapEff|NoNewPrivs' /proc/self/status",
        ],
    )
    .await?;
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words,
        [
            "1000",
            "ro",
            "CapEff:",
            "0000000000000000",
            "NoNewPrivs:",
            "1"
        ],
        "{out}"
    );
    k(kc, &c, &["delete", "pod", "restricted", "--wait=false"]).await?;

    // --- image errors as Kubernetes shows them
    apply(
        kc,
        &c,
        &one_pod(
            "pull-fails",
            "localhost/nothere:v1",
            "IfNotPresent",
            "true",
            "{}",
        ),
    )
    .await?;
    apply(
        kc,
        &c,
        &one_pod("never-pull", "localhost/nothere:v2", "Never", "true", "{}"),
    )
    .await?;
    let seen_err_image_pull = std::sync::atomic::AtomicBool::new(false);
    let backoff = eventually("ImagePullBackOff", WAIT, || {
        let seen = &seen_err_image_pull;
        let c = &c;
        async move {
            let (reason, message) = waiting_reason(&pod(c, "pull-fails").await?);
            if reason == "ErrImagePull" {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(if reason == "ImagePullBackOff" {
                Ok(message)
            } else {
                Err(format!("{reason}: {message}"))
            })
        }
    })
    .await?;
    assert!(
        backoff.starts_with("Back-off pulling image \"localhost/nothere:v1\": ErrImagePull: ")
            && backoff.len() > 70,
        "the runtime's message is kept: {backoff}"
    );
    eprintln!(
        "ImagePullBackOff message: {backoff} (ErrImagePull seen first: {seen_err_image_pull:?})"
    );
    assert!(
        seen_err_image_pull.load(std::sync::atomic::Ordering::Relaxed),
        "ErrImagePull is shown before ImagePullBackOff"
    );
    let (reason, message) = eventually("ErrImageNeverPull", WAIT, || async {
        let (r, m) = waiting_reason(&pod(&c, "never-pull").await?);
        Ok(if r == "ErrImageNeverPull" {
            Ok((r, m))
        } else {
            Err(format!("{r}: {m}"))
        })
    })
    .await?;
    assert_eq!(
        message,
        "Container image \"localhost/nothere:v2\" is not present with pull policy of Never",
        "{reason}"
    );
    let out = k(kc, &c, &["get", "pod", "pull-fails", "--no-headers"]).await?;
    assert!(
        out.contains("ImagePullBackOff") || out.contains("ErrImagePull"),
        "{out}"
    );
    k(
        kc,
        &c,
        &["delete", "pod", "pull-fails", "never-pull", "--wait=false"],
    )
    .await?;

    // --- over its memory limit: OOMKilled
    apply(
        kc,
        &c,
        &one_pod(
            "oom",
            BUSYBOX,
            "IfNotPresent",
            "exec dd if=/dev/zero of=/dev/null bs=100M count=1",
            "{memory: 32Mi}",
        ),
    )
    .await?;
    let reason = eventually("OOMKilled", WAIT, || async {
        let out = k(
            kc,
            &c,
            &["get", "pod", "oom", "-o", "jsonpath={.status.containerStatuses[0].state.terminated.reason}/{.status.containerStatuses[0].state.terminated.exitCode}/{.status.phase}"],
        )
        .await?;
        Ok(if out.starts_with("OOMKilled") { Ok(out) } else { Err(out) })
    })
    .await?;
    assert_eq!(reason, "OOMKilled/137/Failed");

    // --- a busy loop limited to 100m is throttled to about 0.1 CPU
    apply(
        kc,
        &c,
        &one_pod(
            "spinner",
            BUSYBOX,
            "IfNotPresent",
            "while :; do :; done",
            "{cpu: 100m}",
        ),
    )
    .await?;
    let spinner_uid = eventually("spinner Running", WAIT, || async {
        let p = pod(&c, "spinner").await?;
        Ok(
            if p.pointer("/status/containerStatuses/0/state/running")
                .is_some()
            {
                Ok(p.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned())
            } else {
                Err(tests::phase(&p).to_owned())
            },
        )
    })
    .await?;
    let spinner_id = agent
        .runtime
        .list_pods()
        .await?
        .into_iter()
        .find(|p| p.name == "spinner")
        .context("spinner in the runtime")?
        .id;
    let share = cpu_share(&agent.runtime, &spinner_id, Duration::from_secs(3)).await?;
    let throttled = nr_throttled(&spinner_uid);
    eprintln!("100m limit: {share:.3} CPU, nr_throttled {throttled:?}");
    assert!(share < 0.2, "CPU limit not enforced: {share:.3} CPU");
    assert!(share > 0.01, "spinner barely ran: {share:.3} CPU");
    if let Some(n) = throttled {
        assert!(n > 0, "a 100m busy loop is throttled");
    }
    k(kc, &c, &["delete", "pod", "spinner", "oom", "--wait=false"]).await?;

    // --- the agent restarts: running containers are adopted, not doubled; the sandbox of a
    // pod deleted while it was down goes
    agent.kill().await;
    let after_kill = cri.list_pods().await?;
    let busy_after_kill: std::collections::BTreeSet<String> = after_kill
        .iter()
        .filter(|p| p.name.starts_with("busybox-"))
        .map(|p| p.id.0.clone())
        .collect();
    assert_eq!(
        busy_after_kill, sandboxes_before,
        "CRI pods outlive the agent"
    );
    k(
        kc,
        &c,
        &["delete", "pod", &names[1], "--grace-period=0", "--force"],
    )
    .await?;
    let orphan = after_kill
        .iter()
        .find(|p| p.name == names[1])
        .map(|p| p.id.0.clone())
        .context("the deleted pod's sandbox")?;
    let agent = start_agent(&c, node, &socket, root.path()).await?;
    eventually("2 busybox Running again, the orphan gone", WAIT, || async {
        let running = running_busybox(&c).await?;
        let in_cri: Vec<(String, String)> = cri
            .list_pods()
            .await?
            .into_iter()
            .filter(|p| p.name.starts_with("busybox-"))
            .map(|p| (p.name, p.id.0))
            .collect();
        let kept = in_cri
            .iter()
            .any(|(n, id)| n == &names[0] && sandboxes_before.contains(id));
        let orphan_gone = in_cri.iter().all(|(_, id)| id != &orphan);
        Ok(
            if running.len() == 2 && in_cri.len() == 2 && kept && orphan_gone {
                Ok(())
            } else {
                Err(format!("running {running:?}, containerd {in_cri:?}"))
            },
        )
    })
    .await?;

    // --- delete everything: nothing is left in containerd
    k(kc, &c, &["delete", "deployment", "busybox"]).await?;
    k(kc, &c, &["delete", "pod", "--all", "--wait=false"]).await?;
    eventually("no sandbox or container left", WAIT, || async {
        let (sandboxes, containers) = cri.inventory().await?;
        let api_pods = c.pods("default").await?.len();
        Ok(
            if sandboxes.is_empty() && containers.is_empty() && api_pods == 0 {
                Ok(())
            } else {
                Err(format!(
                    "sandboxes {sandboxes:?}, containers {containers:?}, {api_pods} API pods"
                ))
            },
        )
    })
    .await?;
    let memory_root = Path::new("/sys/fs/cgroup/memory").join(CGROUP_ROOT.trim_start_matches('/'));
    let leftover: Vec<String> = ["", "burstable", "besteffort"]
        .iter()
        .filter_map(|q| std::fs::read_dir(memory_root.join(q)).ok())
        .flat_map(|d| d.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pod"))
        .collect();
    assert!(leftover.is_empty(), "pod cgroups left behind: {leftover:?}");
    agent.kill().await;
    c.stop().await;
    Ok(())
}

/// A node whose CRI endpoint does not answer offers wasm only and says so; a pod of
/// RuntimeClass `runc` is not scheduled while no node offers it. When one node's endpoint
/// comes up, that node offers runc, the pod is scheduled there (not to the wasm-only node),
/// and the OCI pod waiting on it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offers_cri_once_its_endpoint_answers() -> anyhow::Result<()> {
    init_tracing();
    let Some((socket, kc)) = prerequisites("a_node_offers_cri_once_its_endpoint_answers") else {
        return Ok(());
    };
    let _one = CRI_LOCK.lock().await;
    let root = tempfile::tempdir()?;
    let node = "cri-late-node";
    let cri = clean_cri(&socket, root.path(), node).await?;
    let late = root.path().join("late.sock");
    let endpoint = format!("unix://{}", late.display());
    let c = Cluster::start(ClusterOptions::default()).await?;
    apply(kc.as_path(), &c, RUNTIME_CLASS).await?;
    let agent = start_agent(&c, node, &endpoint, root.path()).await?;
    let other_root = root.path().join("wasm-only");
    std::fs::create_dir_all(&other_root)?;
    let never = format!("unix://{}", other_root.join("never.sock").display());
    let wasm_only = start_agent(&c, "wasm-only-node", &never, &other_root).await?;
    let condition = |n: &Value| {
        n.pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == CRI_CONDITION))
            .cloned()
            .unwrap_or_default()
    };
    let down = eventually("ContainerRuntimeUnavailable=True", WAIT, || async {
        let n = c
            .admin
            .get(&format!("/api/v1/nodes/{node}"))
            .await?
            .unwrap_or_default();
        let cond = condition(&n);
        Ok(if cond["status"] == "True" {
            Ok(n)
        } else {
            Err(cond.to_string())
        })
    })
    .await?;
    let cond = condition(&down);
    assert_eq!(cond["reason"], "CRIEndpointUnreachable");
    let msg = cond["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&endpoint) && msg.contains("wasm pods only"),
        "{msg}"
    );
    let classes = down
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RUNTIME_CLASSES_ANNOTATION))
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert_eq!(classes, "wasm,wasmtime");

    // An OCI pod bound here waits for the runtime; a pod of class runc is not scheduled.
    let waits = one_pod("waits", BUSYBOX, "IfNotPresent", "exec sleep 3600", "{}")
        .replace("spec:\n", &format!("spec:\n  nodeName: {node}\n"));
    apply(kc.as_path(), &c, &waits).await?;
    let needs_runc = one_pod(
        "needs-runc",
        BUSYBOX,
        "IfNotPresent",
        "exec sleep 3600",
        "{}",
    )
    .replace("spec:\n", "spec:\n  runtimeClassName: runc\n");
    apply(kc.as_path(), &c, &needs_runc).await?;
    // Without a runtimeClassName an OCI image needs a node running OCI images too.
    let plain = one_pod(
        "plain-oci",
        BUSYBOX,
        "IfNotPresent",
        "exec sleep 3600",
        "{}",
    );
    apply(kc.as_path(), &c, &plain).await?;
    for name in ["needs-runc", "plain-oci"] {
        eventually(&format!("{name} unschedulable"), WAIT, || async {
            let p = pod(&c, name).await?;
            let scheduled = p
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
                .cloned()
                .unwrap_or_default();
            Ok(
                if scheduled["status"] == "False" && tests::node_of(&p).is_empty() {
                    Ok(())
                } else {
                    Err(format!("{scheduled} node {:?}", tests::node_of(&p)))
                },
            )
        })
        .await?;
    }
    eventually("the pod to say why it waits", WAIT, || async {
        let (reason, message) = waiting_reason(&pod(&c, "waits").await?);
        Ok(if message.contains("wasm pods only") {
            Ok(())
        } else {
            Err(format!("{reason}: {message}"))
        })
    })
    .await?;

    // The endpoint appears.
    std::os::unix::fs::symlink(&socket, &late)?;
    eventually("runc offered and the pod Running", WAIT, || async {
        let n = c
            .admin
            .get(&format!("/api/v1/nodes/{node}"))
            .await?
            .unwrap_or_default();
        let cond = condition(&n);
        let classes = n
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(RUNTIME_CLASSES_ANNOTATION))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let p = pod(&c, "waits").await?;
        let running = p
            .pointer("/status/containerStatuses/0/state/running")
            .is_some();
        let r = pod(&c, "needs-runc").await?;
        let runc_running = tests::node_of(&r) == node
            && r.pointer("/status/containerStatuses/0/state/running")
                .is_some();
        let o = pod(&c, "plain-oci").await?;
        let plain_running = tests::node_of(&o) == node
            && o.pointer("/status/containerStatuses/0/state/running")
                .is_some();
        Ok(
            if cond["status"] == "False"
                && classes.split(',').any(|x| x == "runc")
                && running
                && runc_running
                && plain_running
            {
                Ok(())
            } else {
                Err(format!(
                    "{cond} classes {classes} phase {}",
                    tests::phase(&p)
                ))
            },
        )
    })
    .await?;
    // The other node still offers wasm only.
    let other = c
        .admin
        .get("/api/v1/nodes/wasm-only-node")
        .await?
        .unwrap_or_default();
    assert_eq!(condition(&other)["status"], "True");
    k(
        kc.as_path(),
        &c,
        &["delete", "pod", "waits", "needs-runc", "plain-oci"],
    )
    .await?;
    eventually("nothing left in containerd", WAIT, || async {
        let (s, ctrs) = cri.inventory().await?;
        Ok(if s.is_empty() && ctrs.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?} {ctrs:?}"))
        })
    })
    .await?;
    agent.kill().await;
    wasm_only.kill().await;
    c.stop().await;
    Ok(())
}

/// The agent path against the fake CRI server (runs without containerd): CRI pods survive an
/// agent restart and are adopted, not doubled; the sandbox of a pod deleted meanwhile is
/// removed; configMap and secret volumes are written by the agent and mounted read-only; the
/// securityContext reaches CreateContainer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_readopts_cri_pods_and_mounts_config_with_the_fake_cri() -> anyhow::Result<()> {
    use runtime::cri::fake::{FakeCriBehavior, FakeCriServer};
    use serde_json::json;
    init_tracing();
    let root = tempfile::tempdir()?;
    let fake = FakeCriServer::start(&root.path().join("cri.sock")).await?;
    fake.add_image(BUSYBOX, FakeCriBehavior::RunForever);
    let node = "fake-cri-node";
    let cri = CriRuntime::connect(cri_config(&fake.endpoint(), root.path(), node)).await?;
    let c = Cluster::start(ClusterOptions::default()).await?;
    let agent = start_agent(&c, node, &fake.endpoint(), root.path()).await?;
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "busybox", "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "busybox"}},
            "template": {
                "metadata": {"labels": {"app": "busybox"}},
                "spec": {"terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": BUSYBOX}]},
            },
        },
    });
    c.create("/apis/apps/v1/namespaces/default/deployments", &deployment)
        .await?;
    let names = eventually("2 busybox Running on the fake", WAIT, || async {
        let n = running_busybox(&c).await?;
        Ok(if n.len() == 2 {
            Ok(n)
        } else {
            Err(format!("{n:?}"))
        })
    })
    .await?;
    let before: std::collections::BTreeMap<String, String> = cri
        .list_pods()
        .await?
        .into_iter()
        .map(|p| (p.name, p.id.0))
        .collect();
    assert_eq!(before.len(), 2, "{before:?}");
    let runs = |fake: &FakeCriServer| {
        fake.calls()
            .iter()
            .filter(|c| c.as_str() == "RunPodSandbox")
            .count()
    };
    assert_eq!(runs(&fake), 2);

    // The agent process goes away; its CRI pods do not.
    agent.kill().await;
    assert_eq!(fake.counts(), (2, 2), "CRI pods outlive the agent");
    c.admin
        .delete(
            &format!("/api/v1/namespaces/default/pods/{}", names[1]),
            Some(&json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})),
        )
        .await?;
    let agent = start_agent(&c, node, &fake.endpoint(), root.path()).await?;
    let after = eventually("adopted, replaced, orphan gone", WAIT, || async {
        let running = running_busybox(&c).await?;
        let in_cri: std::collections::BTreeMap<String, String> = cri
            .list_pods()
            .await?
            .into_iter()
            .map(|p| (p.name, p.id.0))
            .collect();
        Ok(
            if running.len() == 2 && in_cri.len() == 2 && !in_cri.contains_key(&names[1]) {
                Ok(in_cri)
            } else {
                Err(format!("running {running:?}, fake CRI {in_cri:?}"))
            },
        )
    })
    .await?;
    assert_eq!(
        after.get(&names[0]),
        before.get(&names[0]),
        "adopted, same sandbox"
    );
    assert_eq!(
        runs(&fake),
        3,
        "one new sandbox for the replacement pod only"
    );
    agent.kill().await;

    // configMap and secret volumes plus a securityContext, with the node's own token: the API
    // server lets a node read the ConfigMaps and Secrets its pods reference.
    let agent = start_agent_with(&c, node, &fake.endpoint(), root.path(), None, true).await?;
    c.create(
        "/api/v1/namespaces/default/configmaps",
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"},
                "data": {"app.conf": "x=1\n"}}),
    )
    .await?;
    c.create(
        "/api/v1/namespaces/default/secrets",
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                "data": {"password": "aHVudGVyMg=="}}),
    )
    .await?;
    c.create(
        "/api/v1/namespaces/default/pods",
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "configured"},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsUser": 1000},
                "containers": [{
                    "name": "main", "image": BUSYBOX,
                    "securityContext": {"readOnlyRootFilesystem": true,
                                        "allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"},
                                     {"name": "sec", "mountPath": "/etc/creds"}],
                }],
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "app"}},
                    {"name": "sec", "secret": {"secretName": "creds",
                                               "items": [{"key": "password", "path": "pw", "mode": 256}]}},
                ],
            }}),
    )
    .await?;
    first_container_running(&c, "configured").await?;
    let cc = fake
        .container_configs()
        .into_iter()
        .find(|cc| {
            cc.labels.get("io.kubernetes.pod.name").map(String::as_str) == Some("configured")
        })
        .context("the configured container")?;
    let mounts: std::collections::BTreeMap<String, (String, bool)> = cc
        .mounts
        .iter()
        .map(|m| (m.container_path.clone(), (m.host_path.clone(), m.readonly)))
        .collect();
    let (cfg_dir, cfg_ro) = &mounts["/etc/app"];
    let (sec_dir, sec_ro) = &mounts["/etc/creds"];
    assert!(
        *cfg_ro && *sec_ro,
        "configMap and secret volumes are read-only: {mounts:?}"
    );
    assert_eq!(
        std::fs::read_to_string(Path::new(cfg_dir).join("app.conf"))?,
        "x=1\n"
    );
    let pw = Path::new(sec_dir).join("pw");
    assert_eq!(std::fs::read_to_string(&pw)?, "hunter2");
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&pw)?.permissions().mode() & 0o777, 0o400);
    }
    let sc = cc
        .linux
        .and_then(|l| l.security_context)
        .context("security context")?;
    assert_eq!(sc.run_as_user.map(|u| u.value), Some(1000));
    assert!(sc.readonly_rootfs && sc.no_new_privs && !sc.privileged);
    let caps = sc.capabilities.context("capabilities")?;
    assert_eq!(caps.drop_capabilities, ["ALL"]);
    assert_eq!(caps.add_capabilities, ["NET_BIND_SERVICE"]);
    // Deleting the pod removes its volume files too.
    c.admin
        .delete("/api/v1/namespaces/default/pods/configured", None)
        .await?;
    let pod_volumes = Path::new(cfg_dir)
        .parent()
        .context("pod volume dir")?
        .to_owned();
    eventually("volume files removed", WAIT, || async {
        Ok(if pod_volumes.exists() {
            Err(pod_volumes.display().to_string())
        } else {
            Ok(())
        })
    })
    .await?;
    agent.kill().await;
    c.stop().await;
    Ok(())
}

/// p50 and p99 of `v` (nearest rank).
fn percentiles(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    let rank = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank within a small vector"
        )]
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    (rank(0.50), rank(0.99))
}

/// Proportional set size of a process, in bytes (0 if unreadable).
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

/// What OCI pods cost the node: every containerd shim's PSS plus the memory charged to the
/// pods' cgroups.
fn oci_memory() -> u64 {
    let shims: u64 = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("containerd-shim"))
                })
                .map(|e| pss(&e.file_name().to_string_lossy()))
                .sum()
        })
        .unwrap_or(0);
    let cgroups = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{CGROUP_ROOT}/memory.usage_in_bytes"
    ))
    .ok()
    .and_then(|v| v.trim().parse::<u64>().ok())
    .unwrap_or(0);
    shims + cgroups
}

/// What wasm pods cost the node: this process's PSS (agent and wasm runtime run in it; so do
/// the API server and the controllers, whose share is noise here).
fn wasm_memory() -> u64 {
    pss("self")
}

/// The benchmark through the whole stack: create → Running (seen by the API client)
/// for OCI busybox pods and wasm pods on the same node, p50/p99 over 50 pods each, and the
/// machine's available memory per running pod of each kind. Prints the ratios; asserts only
/// that every pod ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_and_wasm_pod_start_through_the_cluster() -> anyhow::Result<()> {
    use serde_json::json;
    init_tracing();
    let Some((socket, _kc)) = prerequisites("oci_and_wasm_pod_start_through_the_cluster") else {
        return Ok(());
    };
    let _one = CRI_LOCK.lock().await;
    const PODS: usize = 50;
    let root = tempfile::tempdir()?;
    let node = "cri-bench-node";
    let cri = clean_cri(&socket, root.path(), node).await?;
    let c = Cluster::start(ClusterOptions::default()).await?;
    let agent = start_agent(&c, node, &socket, root.path()).await?;
    eventually("node registered", WAIT, || async {
        Ok(match c.admin.get(&format!("/api/v1/nodes/{node}")).await? {
            Some(_) => Ok(()),
            None => Err("no node".to_owned()),
        })
    })
    .await?;
    let sleeper = tests::guest("sleeper");
    let mut report = Vec::new();
    /// Kind, image, command or args, how its memory is measured.
    type Kind<'a> = (&'a str, &'a str, Value, fn() -> u64);
    let kinds: [Kind<'_>; 2] = [
        ("oci", BUSYBOX, json!(["sleep", "3600"]), oci_memory),
        ("wasm", sleeper.as_str(), json!(["3600000"]), wasm_memory),
    ];
    for (kind, image, args, memory) in kinds {
        let mem_before = memory();
        let mut latencies = Vec::with_capacity(PODS);
        for i in 0..PODS {
            let name = format!("{kind}-{i}");
            let spec = if kind == "oci" {
                json!({"nodeName": node, "terminationGracePeriodSeconds": 0,
                       "containers": [{"name": "main", "image": image, "command": args}]})
            } else {
                json!({"nodeName": node, "terminationGracePeriodSeconds": 0,
                       "containers": [{"name": "main", "image": image, "args": args}]})
            };
            let t0 = Instant::now();
            c.create(
                "/api/v1/namespaces/default/pods",
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}),
            )
            .await?;
            loop {
                let p = pod(&c, &name).await?;
                if p.pointer("/status/containerStatuses/0/state/running")
                    .is_some()
                {
                    break;
                }
                anyhow::ensure!(t0.elapsed() < WAIT, "{name} not Running: {p}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies.push(t0.elapsed());
        }
        // Let the memory settle a moment before reading it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_pod = memory().saturating_sub(mem_before) / PODS as u64;
        let (p50, p99) = percentiles(&mut latencies);
        eprintln!(
            "{kind}: create → Running p50 {p50:?} p99 {p99:?} over {PODS} pods; memory per pod {:.2} MiB",
            per_pod as f64 / f64::from(1 << 20)
        );
        report.push((p50, p99, per_pod));
        for i in 0..PODS {
            c.admin
                .delete(
                    &format!("/api/v1/namespaces/default/pods/{kind}-{i}"),
                    Some(&json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})),
                )
                .await?;
        }
        eventually("pods gone", WAIT, || async {
            let n = c.pods("default").await?.len();
            let (s, _) = cri.inventory().await?;
            Ok(if n == 0 && s.is_empty() {
                Ok(())
            } else {
                Err(format!("{n} API pods, {} sandboxes", s.len()))
            })
        })
        .await?;
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    eprintln!(
        "OCI / wasm start latency: p50 {:.1}x, p99 {:.1}x",
        ratio(report[0].0, report[1].0),
        ratio(report[0].1, report[1].1)
    );
    #[allow(clippy::cast_precision_loss, reason = "a printed ratio")]
    let r = report[0].2 as f64 / (report[1].2.max(1)) as f64;
    eprintln!("OCI / wasm memory per pod: {r:.1}x");
    assert!(report[0].2 > 0, "{PODS} running OCI pods cost no memory?");
    agent.kill().await;
    c.stop().await;
    Ok(())
}

/// A node whose OCI pods get their own network namespace from the CRI runtime's CNI bridge
/// (`--pod-network cni`): the pod reports its CNI address as podIP and its name as hostname.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cni_pod_reports_its_own_ip() -> anyhow::Result<()> {
    init_tracing();
    let Some((socket, kc)) = prerequisites("a_cni_pod_reports_its_own_ip") else {
        return Ok(());
    };
    let _one = CRI_LOCK.lock().await;
    let root = tempfile::tempdir()?;
    let node = "cri-cni-node";
    let cri = clean_cri(&socket, root.path(), node).await?;
    let c = Cluster::start(ClusterOptions::default()).await?;
    let agent = start_agent_with(&c, node, &socket, root.path(), None, false).await?;
    let kc = kc.as_path();
    apply(
        kc,
        &c,
        &one_pod("netpod", BUSYBOX, "IfNotPresent", "exec sleep 3600", "{}"),
    )
    .await?;
    let ip = eventually("netpod Running with a pod IP", WAIT, || async {
        let p = pod(&c, "netpod").await?;
        let ip = p
            .pointer("/status/podIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let running = p
            .pointer("/status/containerStatuses/0/state/running")
            .is_some();
        Ok(if running && ip.starts_with("10.88.") {
            Ok(ip)
        } else {
            Err(format!("ip {ip:?} phase {}", tests::phase(&p)))
        })
    })
    .await?;
    let wide = k(
        kc,
        &c,
        &["get", "pod", "netpod", "-o", "wide", "--no-headers"],
    )
    .await?;
    assert!(wide.contains(&ip), "{wide}");
    let out = k(
        kc,
        &c,
        &[
            "exec",
            "netpod",
            "--",
            "/bin/sh",
            "-c",
            "hostname; ip -4 addr show eth0",
        ],
    )
    .await?;
    assert!(
        out.starts_with("netpod\n") && out.contains(&format!("inet {ip}/")),
        "{out}"
    );
    // Streaming exec over containerd's streaming server: stdin reaches the container and its
    // end (SPDY FIN) ends `cat`.
    let echoed = tokio::task::block_in_place(|| {
        kubectl(
            kc,
            &c,
            &["exec", "-i", "netpod", "--", "cat"],
            Some("from stdin\n"),
        )
    })?;
    assert_eq!(echoed, "from stdin\n");
    // port-forward to the pod IP: busybox httpd started in the pod, fetched through kubectl.
    k(
        kc,
        &c,
        &[
            "exec",
            "netpod",
            "--",
            "/bin/sh",
            "-c",
            "echo forwarded > /tmp/f.txt; httpd -p 8080 -h /tmp",
        ],
    )
    .await?;
    let body = tokio::task::block_in_place(|| port_forward_get(kc, &c, "netpod", 8080, "/f.txt"))?;
    assert!(body.ends_with("forwarded\n"), "{body}");
    k(kc, &c, &["delete", "pod", "netpod"]).await?;
    eventually("nothing left in containerd", WAIT, || async {
        let (s, ctrs) = cri.inventory().await?;
        Ok(if s.is_empty() && ctrs.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?} {ctrs:?}"))
        })
    })
    .await?;
    agent.kill().await;
    c.stop().await;
    Ok(())
}
