//! `core/v1` Probe and its handlers (exec, httpGet, tcpSocket), with Kubernetes' defaults.
use serde::{Deserialize, Serialize};

/// An `int-or-string` value (`port: 8080` or `port: http`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(i64),
    /// A name (a named container port for probes).
    String(String),
}

impl Default for IntOrString {
    fn default() -> Self {
        IntOrString::Int(0)
    }
}

/// `core/v1` ContainerPort.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// IANA service name, referenced by named probe ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number the container listens on.
    pub container_port: i64,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `core/v1` ExecAction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecAction {
    /// Command run inside the container; exit code 0 is healthy.
    #[serde(default)]
    pub command: Vec<String>,
}

/// `core/v1` HTTPHeader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    #[serde(default)]
    pub value: String,
}

/// `core/v1` HTTPGetAction: any status in 200..400 is healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetAction {
    /// Request path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port number or named container port.
    pub port: IntOrString,
    /// Host to connect to (default: the pod IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `HTTP` (default) or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

/// `core/v1` TCPSocketAction: a successful connect is healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSocketAction {
    /// Port number or named container port.
    pub port: IntOrString,
    /// Host to connect to (default: the pod IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `core/v1` Probe. Absent numbers take Kubernetes' defaults (see the accessors).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Run a command in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Send an HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// Open a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Seconds after the container started before the first probe (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<i64>,
    /// Seconds between probes (default 10, minimum 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i64>,
    /// Seconds after which one probe counts as failed (default 1, minimum 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// Consecutive successes to count as healthy after a failure (default 1; must be 1 for
    /// liveness and startup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<i64>,
    /// Consecutive failures to count as unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    /// Grace period when a liveness or startup failure kills the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
}

fn at_least(v: Option<i64>, default: i64, min: i64) -> u64 {
    u64::try_from(v.unwrap_or(default).max(min)).unwrap_or(1)
}

impl Probe {
    /// `initialDelaySeconds` (default 0).
    pub fn initial_delay(&self) -> u64 {
        at_least(self.initial_delay_seconds, 0, 0)
    }
    /// `periodSeconds` (default 10, at least 1).
    pub fn period(&self) -> u64 {
        at_least(self.period_seconds, 10, 1)
    }
    /// `timeoutSeconds` (default 1, at least 1).
    pub fn timeout(&self) -> u64 {
        at_least(self.timeout_seconds, 1, 1)
    }
    /// `successThreshold` (default 1, at least 1).
    pub fn success_threshold(&self) -> u64 {
        at_least(self.success_threshold, 1, 1)
    }
    /// `failureThreshold` (default 3, at least 1).
    pub fn failure_threshold(&self) -> u64 {
        at_least(self.failure_threshold, 3, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_json_with_defaults() {
        let p: Probe = serde_json::from_str(
            r#"{"httpGet":{"path":"/healthz","port":"http"},"periodSeconds":2,"failureThreshold":1}"#,
        )
        .expect("parses");
        let h = p.http_get.as_ref().expect("httpGet");
        assert_eq!(h.port, IntOrString::String("http".into()));
        assert_eq!((p.period(), p.failure_threshold()), (2, 1));
        assert_eq!(
            (p.initial_delay(), p.timeout(), p.success_threshold()),
            (0, 1, 1)
        );
        let t: Probe = serde_json::from_str(r#"{"tcpSocket":{"port":8080},"periodSeconds":0}"#)
            .expect("parses");
        assert_eq!(
            t.tcp_socket.as_ref().expect("tcp").port,
            IntOrString::Int(8080)
        );
        assert_eq!(t.period(), 1, "periodSeconds is at least 1");
    }
}
