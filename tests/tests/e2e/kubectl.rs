//! The real kubectl 1.37.1 (from `scripts/kubectl`) applies a Deployment and sees its wasm pods
//! Running. Skips with a message when kubectl is not installed.
use std::process::Command;

use tests::{Cluster, ClusterOptions, eventually};

use super::{WAIT, init_tracing};

fn kubectl(c: &Cluster, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let bin = tests::kubectl().ok_or_else(|| anyhow::anyhow!("kubectl missing"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--kubeconfig").arg(c.kubeconfig()).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {args:?} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_deployment_runs_wasm_pods() -> anyhow::Result<()> {
    init_tracing();
    if tests::kubectl().is_none() {
        eprintln!("SKIPPED: kubectl not installed (run scripts/kubectl)");
        return Ok(());
    }
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: hello\nspec:\n  replicas: 3\n  selector:\n    matchLabels: {{app: hello}}\n  template:\n    metadata:\n      labels: {{app: hello}}\n    spec:\n      containers:\n      - name: main\n        image: {}\n        args: [\"250\"]\n",
        tests::guest("sleeper")
    );
    let c2 = &c;
    let m = manifest.clone();
    tokio::task::block_in_place(|| kubectl(c2, &["apply", "-f", "-"], Some(&m)))?;
    eventually("kubectl shows 3 Running", WAIT, || async {
        let out =
            tokio::task::block_in_place(|| kubectl(&c, &["get", "pods", "--no-headers"], None))?;
        let running = out
            .lines()
            .filter(|l| l.contains("Running") && l.contains("1/1"))
            .count();
        Ok(if running == 3 { Ok(()) } else { Err(out) })
    })
    .await?;
    let out = tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &["rollout", "status", "deployment/hello", "--timeout=60s"],
            None,
        )
    })?;
    assert!(out.contains("successfully rolled out"), "{out}");
    // A rolling update, its history and an undo.
    tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &[
                "patch",
                "deployment/hello",
                "--type=json",
                "-p",
                r#"[{"op":"replace","path":"/spec/template/spec/containers/0/args","value":["300"]}]"#,
            ],
            None,
        )
    })?;
    let out = tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &["rollout", "status", "deployment/hello", "--timeout=60s"],
            None,
        )
    })?;
    assert!(out.contains("successfully rolled out"), "{out}");
    let history = tokio::task::block_in_place(|| {
        kubectl(&c, &["rollout", "history", "deployment/hello"], None)
    })?;
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");
    tokio::task::block_in_place(|| kubectl(&c, &["rollout", "undo", "deployment/hello"], None))?;
    tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &["rollout", "status", "deployment/hello", "--timeout=60s"],
            None,
        )
    })?;
    let args = tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &[
                "get",
                "pods",
                "-o",
                "jsonpath={.items[*].spec.containers[0].args[0]}",
            ],
            None,
        )
    })?;
    eventually("pods back on the first template", WAIT, || async {
        let args = tokio::task::block_in_place(|| {
            kubectl(
                &c,
                &["get", "pods", "-o", "jsonpath={range .items[*]}{.metadata.deletionTimestamp}/{.spec.containers[0].args[0]} {end}"],
                None,
            )
        })?;
        let live: Vec<&str> = args.split_whitespace().filter(|a| a.starts_with('/')).collect();
        Ok(if live.len() == 3 && live.iter().all(|a| *a == "/250") { Ok(()) } else { Err(args) })
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}; first look: {args}"))?;
    tokio::task::block_in_place(|| {
        kubectl(&c, &["scale", "deployment/hello", "--replicas=1"], None)
    })?;
    eventually("kubectl shows 1 pod", WAIT, || async {
        let out =
            tokio::task::block_in_place(|| kubectl(&c, &["get", "pods", "--no-headers"], None))?;
        let lines = out.lines().filter(|l| !l.trim().is_empty()).count();
        Ok(if lines == 1 && out.contains("Running") {
            Ok(())
        } else {
            Err(out)
        })
    })
    .await?;
    c.stop().await;
    Ok(())
}

/// `kubectl drain` (cordon + the eviction subresource) moves a Deployment's pods to the other
/// node; `kubectl uncordon` makes the node schedulable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drain_moves_pods_off_a_node() -> anyhow::Result<()> {
    init_tracing();
    if tests::kubectl().is_none() {
        eprintln!("SKIPPED: kubectl not installed (run scripts/kubectl)");
        return Ok(());
    }
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.add_agent("node-b", |_| {}).await?;
    c.create(
        "/apis/apps/v1/namespaces/default/deployments",
        &super::sleeper_deployment("drained", 4),
    )
    .await?;
    eventually("4 running on both nodes", WAIT, || async {
        let p = super::running(&c, "drained-").await?;
        let on_a = p.iter().filter(|p| tests::node_of(p) == "node-a").count();
        Ok(if p.len() == 4 && on_a > 0 && on_a < 4 {
            Ok(())
        } else {
            Err(format!("{} running, {on_a} on node-a", p.len()))
        })
    })
    .await?;
    let out = tokio::task::block_in_place(|| {
        kubectl(
            &c,
            &["drain", "node-a", "--ignore-daemonsets", "--timeout=60s"],
            None,
        )
    })?;
    assert!(out.contains("drained"), "{out}");
    eventually("4 running on node-b only", WAIT, || async {
        let all = c.pods("default").await?;
        let p = super::running(&c, "drained-").await?;
        let on_b = p.iter().filter(|p| tests::node_of(p) == "node-b").count();
        Ok(if on_b == 4 && all.len() == 4 {
            Ok(())
        } else {
            Err(format!("{on_b} running on node-b, {} pods", all.len()))
        })
    })
    .await?;
    tokio::task::block_in_place(|| kubectl(&c, &["uncordon", "node-a"], None))?;
    let node = c
        .admin
        .get("/api/v1/nodes/node-a")
        .await?
        .unwrap_or_default();
    assert_ne!(
        node.pointer("/spec/unschedulable")
            .and_then(serde_json::Value::as_bool),
        Some(true)
    );
    c.stop().await;
    Ok(())
}
