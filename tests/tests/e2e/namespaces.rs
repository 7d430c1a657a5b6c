//! Namespace deletion through the namespace controller, driven by the real kubectl: `kubectl
//! delete namespace` waits until the namespace is gone, its Deployment, pods and ConfigMaps go
//! with it, and nothing new may be created while it is Terminating. Skips with a message when
//! kubectl is not installed.
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runtime::PodRuntime as _;
use serde_json::Value;
use tests::{Cluster, ClusterOptions, eventually};

use super::{WAIT, init_tracing};

/// Runs kubectl against the cluster; the raw output (callers judge success).
fn run(c: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    use std::io::Write as _;
    let bin = tests::kubectl().ok_or_else(|| anyhow::anyhow!("kubectl missing"))?;
    let mut child = Command::new(bin)
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Dropping stdin closes it, so kubectl never waits for input.
    if let Some(mut si) = child.stdin.take()
        && let Some(text) = stdin
    {
        si.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Runs kubectl and requires success; its stdout.
fn kubectl(c: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let out = tokio::task::block_in_place(|| run(c, args, stdin))?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Deployment of 2 sleepers and a ConfigMap in namespace `ns`.
fn manifest(ns: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {ns}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: main\n        image: {}\n        args: [\"250\"]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {ns}\ndata:\n  mode: fast\n",
        tests::guest("sleeper")
    )
}

async fn running_in(c: &Cluster, ns: &str, n: usize) -> anyhow::Result<()> {
    eventually(&format!("{n} pods Running in {ns}"), WAIT, || async {
        let pods = c.pods(ns).await?;
        let running = pods
            .iter()
            .filter(|p| tests::phase(p) == "Running" && !tests::deleting(p))
            .count();
        Ok(if running == n {
            Ok(())
        } else {
            Err(format!("{running} running of {}", pods.len()))
        })
    })
    .await
}

async fn empty(c: &Cluster, ns: &str) -> anyhow::Result<()> {
    for path in [
        format!("/api/v1/namespaces/{ns}/pods"),
        format!("/api/v1/namespaces/{ns}/configmaps"),
        format!("/apis/apps/v1/namespaces/{ns}/deployments"),
        format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
    ] {
        let (items, _) = c.admin.list(&path).await?;
        anyhow::ensure!(items.is_empty(), "{path} still holds {items:?}");
    }
    Ok(())
}

/// Sets the `finalizers` of the ConfigMap `settings` in namespace `held` (a JSON list or null).
fn hold_settings(c: &Cluster, finalizers: &str) -> anyhow::Result<String> {
    let patch = format!(r#"{{"metadata":{{"finalizers":{finalizers}}}}}"#);
    kubectl(
        c,
        &[
            "-n",
            "held",
            "patch",
            "configmap",
            "settings",
            "--type=merge",
            "-p",
            &patch,
        ],
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_namespace_waits_until_its_contents_are_gone() -> anyhow::Result<()> {
    init_tracing();
    if tests::kubectl().is_none() {
        eprintln!("SKIPPED: kubectl not installed (run scripts/kubectl)");
        return Ok(());
    }
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;

    tracing::info!("--- a namespace with a Deployment and a ConfigMap, deleted with kubectl");
    kubectl(&c, &["create", "namespace", "team"], None)?;
    kubectl(&c, &["apply", "-f", "-"], Some(&manifest("team")))?;
    running_in(&c, "team", 2).await?;
    let started = Instant::now();
    let out = kubectl(&c, &["delete", "namespace", "team", "--timeout=60s"], None)?;
    let took = started.elapsed();
    assert!(out.contains("namespace \"team\" deleted"), "{out}");
    eprintln!("kubectl delete namespace with 2 running pods took {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "kubectl delete namespace took {took:?}"
    );
    assert!(c.admin.get("/api/v1/namespaces/team").await?.is_none());
    empty(&c, "team").await?;
    eventually("no pod left in the node's runtime", WAIT, || async {
        let n = c.agents[0].runtime.list_pods().await?.len();
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        })
    })
    .await?;

    tracing::info!("--- a Terminating namespace refuses new content");
    kubectl(&c, &["create", "namespace", "held"], None)?;
    kubectl(&c, &["apply", "-f", "-"], Some(&manifest("held")))?;
    hold_settings(&c, r#"["example.com/hold"]"#)?;
    running_in(&c, "held", 2).await?;
    kubectl(&c, &["delete", "namespace", "held", "--wait=false"], None)?;
    let refused = tokio::task::block_in_place(|| {
        run(
            &c,
            &[
                "-n",
                "held",
                "create",
                "configmap",
                "late",
                "--from-literal=a=1",
            ],
            None,
        )
    })?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "created in a Terminating namespace"
    );
    assert!(
        stderr.contains(
            "configmaps \"late\" is forbidden: unable to create new content in namespace held because it is being terminated"
        ),
        "{stderr}"
    );
    // Everything but the held ConfigMap goes; the namespace says why it waits.
    eventually("only the held ConfigMap left", WAIT, || async {
        let ns = c
            .admin
            .get("/api/v1/namespaces/held")
            .await?
            .unwrap_or(Value::Null);
        let fins = ns
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == "NamespaceFinalizersRemaining")
                    .cloned()
            })
            .unwrap_or(Value::Null);
        let pods = c.pods("held").await?.len();
        Ok(
            if ns["status"]["phase"] == "Terminating" && fins["status"] == "True" && pods == 0 {
                Ok(fins["message"].as_str().unwrap_or_default().to_string())
            } else {
                Err(format!(
                    "phase {}, {pods} pods, condition {fins}",
                    ns["status"]["phase"]
                ))
            },
        )
    })
    .await
    .map(|msg| {
        assert_eq!(
            msg,
            "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
        )
    })?;
    let phase = kubectl(
        &c,
        &["get", "namespace", "held", "-o", "jsonpath={.status.phase}"],
        None,
    )?;
    assert_eq!(phase, "Terminating");
    // Its owner lets go: `kubectl delete namespace` (waiting) then finishes promptly.
    hold_settings(&c, "null")?;
    let started = Instant::now();
    kubectl(&c, &["delete", "namespace", "held", "--timeout=60s"], None)?;
    let took = started.elapsed();
    eprintln!("kubectl delete of a Terminating namespace took {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(c.admin.get("/api/v1/namespaces/held").await?.is_none());
    empty(&c, "held").await?;
    c.stop().await;
    Ok(())
}
