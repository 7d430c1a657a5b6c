//! The official Python `kubernetes` client (from the venv of scripts/kubectl).

use crate::harness::Server;

const SCRIPT: &str = r#"
import sys, threading, time
from kubernetes import client, config, watch, dynamic

config.load_kube_config()
v1 = client.CoreV1Api()
apps = client.AppsV1Api()

pods = v1.list_namespaced_pod("default")
assert pods.items == [], pods
pod = client.V1Pod(metadata=client.V1ObjectMeta(name="py1", labels={"app": "py"}),
                   spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))
created = v1.create_namespaced_pod("default", pod)
assert created.metadata.uid and created.metadata.resource_version, created.metadata
assert created.spec.restart_policy == "Always"

# Watch with no resourceVersion: synthetic ADDED for py1, then ADDED for py2 created meanwhile.
def later():
    time.sleep(1.0)
    p2 = client.V1Pod(metadata=client.V1ObjectMeta(name="py2"),
                      spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))
    v1.create_namespaced_pod("default", p2)
threading.Thread(target=later).start()
seen = []
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_pod, "default", timeout_seconds=5):
    seen.append((ev["type"], ev["object"].metadata.name))
    if len(seen) == 2:
        w.stop()
assert seen == [("ADDED", "py1"), ("ADDED", "py2")], seen

patched = v1.patch_namespaced_pod("py1", "default", {"metadata": {"labels": {"x": "y"}}})
assert patched.metadata.labels == {"app": "py", "x": "y"}, patched.metadata.labels
assert [p.metadata.name for p in v1.list_namespaced_pod("default", label_selector="x=y").items] == ["py1"]

dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="d"),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "d"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "d"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="nginx")]))))
apps.create_namespaced_deployment("default", dep)
apps.patch_namespaced_deployment_scale("d", "default", {"spec": {"replicas": 5}})
assert apps.read_namespaced_deployment("d", "default").spec.replicas == 5

try:
    v1.create_namespaced_pod("default", pod)
    raise SystemExit("expected 409")
except client.exceptions.ApiException as e:
    assert e.status == 409, e

v1.delete_namespaced_pod("py1", "default")
v1.delete_namespaced_pod("py2", "default")
assert v1.list_namespaced_pod("default").items == []

# DynamicClient: /version and legacy discovery.
dyn = dynamic.DynamicClient(client.ApiClient())
nodes_api = dyn.resources.get(api_version="v1", kind="Node")
dyn_pods = dyn.resources.get(api_version="v1", kind="Pod")
assert len(dyn_pods.get(namespace="default").items) == 0
print("python client OK")
"#;

async fn list_create_watch_patch_delete(s: &Server) -> anyhow::Result<()> {
    let out = s.python(SCRIPT).await?.ok()?;
    assert!(out.contains("python client OK"), "{out}");
    Ok(())
}

crate::on_both_stores!(list_create_watch_patch_delete);
