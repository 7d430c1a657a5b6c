//! Publishes the API servers of an HA control plane in the `default/kubernetes` Endpoints, as
//! kube-apiserver's "lease" endpoint reconciler does, so node agents can learn every server and
//! fail over between them.
//!
//! Each server renews a Lease of its own, `kube-system/flotilla-apiserver-<ip>-<port>`, carrying
//! its advertised address, then rewrites the Endpoints to list the addresses of the Leases that
//! have not expired: a killed or stopped server drops out once its Lease expires (30 s). Every
//! server writes the same content, so concurrent writers converge; a lost update race (409) is
//! redone on the next round.
//!
//! The `default/kubernetes` Service (no selector, so the endpoints controller leaves its
//! Endpoints to us) is created first: the endpoints controller deletes the Endpoints of a
//! Service that does not exist.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use apiclient::{ApiClient, ClientError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const LEASE_PREFIX: &str = "flotilla-apiserver-";
const IP_ANNOTATION: &str = "flotilla.dev/apiserver-ip";
const PORT_ANNOTATION: &str = "flotilla.dev/apiserver-port";
const SERVICE: &str = "/api/v1/namespaces/default/services/kubernetes";
const ENDPOINTS: &str = "/api/v1/namespaces/default/endpoints/kubernetes";

/// What this server publishes, and how often.
#[derive(Debug, Clone)]
pub struct EndpointReconcilerConfig {
    /// The IP other servers and agents reach this server's API at (one of its certificate's
    /// names).
    pub ip: String,
    /// The API port.
    pub port: u16,
    /// How often the Lease is renewed and the Endpoints checked (kube-apiserver: 10 s).
    pub interval: Duration,
    /// How long a server that stopped renewing stays listed.
    pub lease_duration: Duration,
}

impl EndpointReconcilerConfig {
    /// Renewal every 10 s, Leases of 30 s.
    pub fn new(ip: impl Into<String>, port: u16) -> EndpointReconcilerConfig {
        EndpointReconcilerConfig {
            ip: ip.into(),
            port,
            interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(30),
        }
    }

    fn lease_name(&self) -> String {
        let ip: String = self
            .ip
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{LEASE_PREFIX}{ip}-{}", self.port)
    }
}

/// Keeps this server's Lease and the `default/kubernetes` Endpoints up to date until
/// `shutdown` (with `client`, an admin client of this server).
pub async fn run(client: ApiClient, cfg: EndpointReconcilerConfig, shutdown: CancellationToken) {
    loop {
        if let Err(e) = reconcile(&client, &cfg).await {
            tracing::warn!(error = %e, "publishing the API server address failed; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
}

/// One round: renew our Lease, then list the live servers in the Endpoints.
async fn reconcile(client: &ApiClient, cfg: &EndpointReconcilerConfig) -> Result<(), ClientError> {
    let now = chrono::Utc::now();
    renew_lease(client, cfg, &now).await?;
    let (leases, _) = client.list(LEASES).await?;
    let live = live_servers(&leases, now);
    ensure_service(client, cfg).await?;
    let subsets = subsets(&live);
    match client.get(ENDPOINTS).await? {
        Some(ep) if ep.get("subsets").unwrap_or(&Value::Null) == &subsets => Ok(()),
        Some(mut ep) => {
            // Keeps metadata.resourceVersion: a concurrent writer makes this a 409.
            ep["subsets"] = subsets;
            client.update(ENDPOINTS, &ep).await.map(drop)
        }
        None => {
            let ep = json!({
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": subsets,
            });
            match client
                .create("/api/v1/namespaces/default/endpoints", &ep)
                .await
            {
                Ok(_) => Ok(()),
                // Another server was faster; the next round compares with its version.
                Err(e) if e.is_conflict() => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

async fn renew_lease(
    client: &ApiClient,
    cfg: &EndpointReconcilerConfig,
    now: &chrono::DateTime<chrono::Utc>,
) -> Result<(), ClientError> {
    let name = cfg.lease_name();
    let path = format!("{LEASES}/{name}");
    let renew = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let spec = json!({
        "holderIdentity": format!("{}:{}", cfg.ip, cfg.port),
        "leaseDurationSeconds": cfg.lease_duration.as_secs().max(1),
        "renewTime": renew,
    });
    match client.get(&path).await? {
        Some(mut lease) => {
            lease["spec"] = spec;
            client.update(&path, &lease).await.map(drop)
        }
        None => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": "kube-system",
                    "annotations": {
                        IP_ANNOTATION: cfg.ip,
                        PORT_ANNOTATION: cfg.port.to_string(),
                    },
                },
                "spec": spec,
            });
            client.create(LEASES, &lease).await.map(drop)
        }
    }
}

async fn ensure_service(
    client: &ApiClient,
    cfg: &EndpointReconcilerConfig,
) -> Result<(), ClientError> {
    if client.get(SERVICE).await?.is_some() {
        return Ok(());
    }
    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": cfg.port}],
        },
    });
    match client
        .create("/api/v1/namespaces/default/services", &svc)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_conflict() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The (ip, port) of every server Lease not expired at `now`.
fn live_servers(leases: &[Value], now: chrono::DateTime<chrono::Utc>) -> BTreeSet<(String, u16)> {
    let mut out = BTreeSet::new();
    for lease in leases {
        let name = lease
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !name.starts_with(LEASE_PREFIX) {
            continue;
        }
        let annotation = |k: &str| {
            lease
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(k))
                .and_then(Value::as_str)
        };
        let (Some(ip), Some(port)) = (
            annotation(IP_ANNOTATION),
            annotation(PORT_ANNOTATION).and_then(|p| p.parse::<u16>().ok()),
        ) else {
            continue;
        };
        let renewed = lease
            .pointer("/spec/renewTime")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let duration = lease
            .pointer("/spec/leaseDurationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let Some(renewed) = renewed else {
            continue;
        };
        if renewed.to_utc() + chrono::TimeDelta::seconds(duration) > now {
            out.insert((ip.to_string(), port));
        }
    }
    out
}

/// One subset per port, as Kubernetes groups addresses sharing their ports.
fn subsets(live: &BTreeSet<(String, u16)>) -> Value {
    let mut by_port: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for (ip, port) in live {
        by_port.entry(*port).or_default().push(ip);
    }
    Value::Array(
        by_port
            .into_iter()
            .map(|(port, ips)| {
                json!({
                    "addresses": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                    "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, ip: &str, port: u16, renewed: &str, secs: i64) -> Value {
        json!({
            "metadata": {"name": name, "annotations": {
                IP_ANNOTATION: ip, PORT_ANNOTATION: port.to_string()}},
            "spec": {"renewTime": renewed, "leaseDurationSeconds": secs},
        })
    }

    #[test]
    fn lists_only_unexpired_server_leases_grouped_by_port() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z")
            .expect("time")
            .to_utc();
        let leases = [
            lease(
                "flotilla-apiserver-a",
                "10.0.0.1",
                6443,
                "2026-01-01T00:00:50.000000Z",
                30,
            ),
            lease(
                "flotilla-apiserver-b",
                "10.0.0.2",
                6443,
                "2026-01-01T00:00:45Z",
                30,
            ),
            lease(
                "flotilla-apiserver-c",
                "127.0.0.1",
                7443,
                "2026-01-01T00:00:59Z",
                30,
            ),
            // Expired: renewed 40 s ago with a 30 s lease.
            lease(
                "flotilla-apiserver-d",
                "10.0.0.4",
                6443,
                "2026-01-01T00:00:20Z",
                30,
            ),
            // Not a server lease.
            lease(
                "kube-scheduler",
                "10.0.0.5",
                6443,
                "2026-01-01T00:00:59Z",
                30,
            ),
        ];
        let live = live_servers(&leases, now);
        assert_eq!(live.len(), 3);
        let subsets = subsets(&live);
        let ep = json!({ "subsets": subsets });
        assert_eq!(
            apiclient::endpoint_urls(&ep, "https"),
            [
                "https://10.0.0.1:6443",
                "https://10.0.0.2:6443",
                "https://127.0.0.1:7443"
            ]
        );
    }

    #[test]
    fn lease_names_are_valid_object_names() {
        let cfg = EndpointReconcilerConfig::new("fd00::1", 6443);
        assert_eq!(cfg.lease_name(), "flotilla-apiserver-fd00--1-6443");
    }
}
