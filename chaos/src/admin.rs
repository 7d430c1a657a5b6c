//! The fault-injection admin endpoint of a live `flotilla store` member (started only with
//! `--fault-admin ADDR`) and its client, used by `flotilla chaos --fault-admin`.
//!
//! Plain HTTP/1.1 with JSON bodies, one request per connection:
//! - `GET /faults` — the faults in force;
//! - `PUT /faults` — replace them with a [`FaultSpec`];
//! - `DELETE /faults` — heal (no faults).
//!
//! Faults act on this member's side only: its outgoing Raft messages and forwarded client
//! requests (`cut_to`), the answers it waits for (`cut_from`), random drops, delays and
//! duplicates of its Raft messages, a delay before each log append or vote save (a slow
//! disk), and an offset of the clock its lessor counts lease TTLs with (a clock jump when it
//! changes; F15). A symmetric partition is set on the members of both sides.
use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::net::{DiskFaults, NetFaults, Router};

/// Faults requested through the admin endpoint. Peers are member names from the initial
/// cluster or member ids in hex.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSpec {
    /// Peers this member's messages no longer reach.
    pub cut_to: Vec<String>,
    /// Peers whose messages (answers included) no longer reach this member.
    pub cut_from: Vec<String>,
    /// Probability of losing each Raft message.
    pub drop: f64,
    /// Extra delay per Raft message, uniformly in `[lo, hi]` milliseconds.
    pub delay_ms: Option<(u64, u64)>,
    /// Probability of sending a Raft request twice.
    pub duplicate: f64,
    /// Delay before every log append and vote save, in milliseconds.
    pub disk_delay_ms: u64,
    /// Offset of the member's lease clock in milliseconds; setting it jumps that clock
    /// (forward when it grows), healing jumps it back. Raft timers are not affected.
    pub clock_offset_ms: i64,
}

/// The member-side state the endpoint controls.
#[derive(Debug, Clone)]
pub struct FaultAdmin {
    router: Router,
    disk: DiskFaults,
    clock_offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    me: usize,
    /// Peer name or hex id -> router index.
    peers: HashMap<String, usize>,
    current: std::sync::Arc<std::sync::Mutex<FaultSpec>>,
}

impl FaultAdmin {
    /// Sets up the router for a member of `initial_cluster` (`(name, peer URL)`) named `me`.
    /// Member `i` of the list is router index `i`.
    pub fn new(
        seed: u64,
        token: &str,
        initial_cluster: &[(String, String)],
        me: &str,
    ) -> anyhow::Result<Self> {
        let router = Router::new(seed);
        let mut peers = HashMap::new();
        let mut my_index = None;
        for (i, (name, url)) in initial_cluster.iter().enumerate() {
            let id = store::member_id(token, url);
            router.register(id, i);
            router.register_url(url, i);
            peers.insert(name.clone(), i);
            peers.insert(format!("{id:x}"), i);
            if name == me {
                my_index = Some(i);
            }
        }
        let me = my_index.with_context(|| format!("{me:?} is not in the initial cluster"))?;
        Ok(Self {
            router,
            disk: DiskFaults::default(),
            clock_offset_ms: std::sync::Arc::default(),
            me,
            peers,
            current: std::sync::Arc::default(),
        })
    }

    /// The Raft transport to start the member with.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// This member's router index.
    pub fn index(&self) -> usize {
        self.me
    }

    /// The disk switch to wrap the member's log store with.
    pub fn disk(&self) -> DiskFaults {
        self.disk.clone()
    }

    /// The lease clock offset to start the member with (`FaultHooks::clock_offset_ms`).
    pub fn clock_offset_ms(&self) -> std::sync::Arc<std::sync::atomic::AtomicI64> {
        self.clock_offset_ms.clone()
    }

    /// Applies `spec` (replacing earlier faults).
    pub fn apply(&self, spec: FaultSpec) -> anyhow::Result<()> {
        let resolve = |p: &String| {
            self.peers
                .get(p)
                .copied()
                .with_context(|| format!("unknown peer {p:?} (use a member name or hex id)"))
        };
        let mut net = NetFaults {
            drop: spec.drop.clamp(0.0, 1.0),
            duplicate: spec.duplicate.clamp(0.0, 1.0),
            delay: spec
                .delay_ms
                .map(|(lo, hi)| (Duration::from_millis(lo), Duration::from_millis(hi.max(lo)))),
            ..NetFaults::default()
        };
        for p in &spec.cut_to {
            net.cut.insert((self.me, resolve(p)?));
        }
        for p in &spec.cut_from {
            net.cut.insert((resolve(p)?, self.me));
        }
        self.router.set(net);
        self.disk
            .set_delay(Duration::from_millis(spec.disk_delay_ms));
        self.clock_offset_ms
            .store(spec.clock_offset_ms, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(?spec, "fault injection changed");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = spec;
        Ok(())
    }

    fn current(&self) -> FaultSpec {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Serves the endpoint on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, admin: FaultAdmin, cancel: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &admin).await {
                tracing::debug!(error = %e, "fault admin request failed");
            }
        });
    }
}

/// Reads one HTTP/1.1 request: `(method, path, body)`.
async fn read_request(stream: &mut TcpStream) -> anyhow::Result<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "request head too large");
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_owned();
    let path = first.next().unwrap_or_default().to_owned();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    anyhow::ensure!(len <= 1024 * 1024, "request body too large");
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok((method, path, body))
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> anyhow::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn handle(mut stream: TcpStream, admin: &FaultAdmin) -> anyhow::Result<()> {
    let (method, path, body) = read_request(&mut stream).await?;
    let error =
        |e: &dyn std::fmt::Display| serde_json::json!({ "error": e.to_string() }).to_string();
    if path != "/faults" {
        return respond(&mut stream, "404 Not Found", &error(&"only /faults exists")).await;
    }
    let result = match method.as_str() {
        "GET" => Ok(()),
        "PUT" => serde_json::from_slice::<FaultSpec>(&body)
            .map_err(anyhow::Error::from)
            .and_then(|spec| admin.apply(spec)),
        "DELETE" => admin.apply(FaultSpec::default()),
        _ => {
            return respond(
                &mut stream,
                "405 Method Not Allowed",
                &error(&"use GET, PUT or DELETE"),
            )
            .await;
        }
    };
    match result {
        Ok(()) => {
            let body = serde_json::to_string(&admin.current())?;
            respond(&mut stream, "200 OK", &body).await
        }
        Err(e) => respond(&mut stream, "400 Bad Request", &error(&format!("{e:#}"))).await,
    }
}

/// Sends `method /faults` with an optional spec to the admin endpoint at `addr`
/// (`host:port` or `http://host:port`); returns the faults in force afterwards.
pub async fn request(
    addr: &str,
    method: &str,
    spec: Option<&FaultSpec>,
) -> anyhow::Result<FaultSpec> {
    let hostport = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(hostport))
        .await
        .with_context(|| format!("fault admin {hostport}: connect timed out"))?
        .with_context(|| {
            format!(
                "fault admin {hostport}: cannot connect (is the member running with --fault-admin?)"
            )
        })?;
    let body = spec
        .map(serde_json::to_string)
        .transpose()?
        .unwrap_or_default();
    let req = format!(
        "{method} /faults HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut resp))
        .await
        .with_context(|| format!("fault admin {hostport}: no answer"))??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("fault admin {hostport}: malformed answer"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.contains(" 200 "),
        "fault admin {hostport}: {status}: {body}"
    );
    Ok(serde_json::from_str(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_endpoint_applies_and_heals_faults() {
        let cluster = vec![
            ("a".to_owned(), "http://127.0.0.1:1".to_owned()),
            ("b".to_owned(), "http://127.0.0.1:2".to_owned()),
        ];
        let admin = FaultAdmin::new(1, "t", &cluster, "a").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, admin.clone(), cancel.clone()));
        let spec = FaultSpec {
            cut_to: vec!["b".into()],
            disk_delay_ms: 20,
            clock_offset_ms: -1500,
            ..FaultSpec::default()
        };
        let now = request(&addr, "PUT", Some(&spec)).await.unwrap();
        assert_eq!(now, spec);
        let clock = admin.clock_offset_ms();
        assert_eq!(clock.load(std::sync::atomic::Ordering::Relaxed), -1500);
        assert_eq!(request(&addr, "GET", None).await.unwrap(), spec);
        // The forwarding filter sees the cut towards b's peer URL, not the other way.
        let filter = admin.router().forward_filter(admin.index());
        assert_eq!(filter("http://127.0.0.1:2"), store::LinkFate::LoseRequest);
        let bad = FaultSpec {
            cut_from: vec!["nobody".into()],
            ..FaultSpec::default()
        };
        let err = request(&addr, "PUT", Some(&bad)).await.unwrap_err();
        assert!(err.to_string().contains("unknown peer"), "{err}");
        assert_eq!(
            request(&addr, "DELETE", None).await.unwrap(),
            FaultSpec::default()
        );
        assert_eq!(filter("http://127.0.0.1:2"), store::LinkFate::Deliver);
        cancel.cancel();
    }
}
