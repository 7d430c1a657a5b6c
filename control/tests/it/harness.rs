//! An in-process API server on port 0 (HTTPS + tokens, MemStore), the real kubectl, the Python
//! client, and a tiny HTTPS client for exact status-code checks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use control::apiserver::{ApiServer, ApiServerConfig};
use control::storage::MemStore;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// A running API server for one test.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub admin_token: String,
    pub readonly_token: String,
    pub ca_pem: String,
    pub pki: control::apiserver::Pki,
    /// Set when the server runs on a MemStore (fault injection: outage, compaction).
    pub mem: Option<MemStore>,
    /// Set when the server runs on an embedded Flotilla store through RemoteStore.
    node: Option<store::NodeHandle>,
    /// Set when the server runs on a real etcd 3.4 (child process) through RemoteStore.
    etcd: Option<std::sync::Mutex<tokio::process::Child>>,
    /// etcd v3 endpoint of the remote store, if any.
    endpoint: Option<String>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(node) = self.node.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { node.shutdown().await });
        }
    }
}

/// The venv kubectl installed by `scripts/kubectl` (called from `scripts/setup`).
pub fn kubectl_path() -> PathBuf {
    if let Ok(p) = std::env::var("FLOTILLA_KUBECTL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kubectl")
}

fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/python")
}

/// A server on a MemStore.
pub async fn start() -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let mem = MemStore::new();
    let mut s = start_with(dir, mem.clone()).await?;
    s.mem = Some(mem);
    Ok(s)
}

/// A server on an embedded one-member Flotilla store, through the etcd v3 RemoteStore.
pub async fn start_embedded() -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let node = control::storage::embedded::start(&dir.path().join("store")).await?;
    let store =
        control::storage::RemoteStore::connect(&[format!("http://{}", node.client_addr())])?;
    // A fresh one-member store elects itself quickly; wait for writes to work.
    let mut s = None;
    for _ in 0..100 {
        match start_with_ref(dir.path(), store.clone()).await {
            Ok(x) => {
                s = Some(x);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let (addr, kubeconfig, pki, shutdown, task) =
        s.context("embedded store never became writable")?;
    let mut s = Server::assemble(dir, addr, kubeconfig, pki, shutdown, task, None, None);
    s.endpoint = Some(format!("http://{}", node.client_addr()));
    s.node = Some(node);
    Ok(s)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A server on a real etcd 3.4 (Debian `etcd-server`, installed by scripts/setup), through
/// the etcd v3 RemoteStore.
pub async fn start_etcd() -> anyhow::Result<Server> {
    let bin = std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".into());
    let dir = tempfile::tempdir()?;
    let (cport, pport) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{cport}");
    let peer_url = format!("http://127.0.0.1:{pport}");
    let child = tokio::process::Command::new(&bin)
        .arg("--name=t")
        .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=t={peer_url}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!("etcd 3.4 not found ({bin}): run scripts/setup (it installs the Debian package etcd-server)")
        })?;
    let store = control::storage::RemoteStore::connect(std::slice::from_ref(&client_url))?;
    let mut started = None;
    for _ in 0..150 {
        match start_with_ref(dir.path(), store.clone()).await {
            Ok(x) => {
                started = Some(x);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let (addr, kubeconfig, pki, shutdown, task) = started.context("etcd never became writable")?;
    let mut s = Server::assemble(dir, addr, kubeconfig, pki, shutdown, task, None, None);
    s.etcd = Some(std::sync::Mutex::new(child));
    s.endpoint = Some(client_url);
    Ok(s)
}

async fn start_with<S: control::storage::Store>(
    dir: tempfile::TempDir,
    store: S,
) -> anyhow::Result<Server> {
    let (addr, kubeconfig, pki, shutdown, task) = start_with_ref(dir.path(), store).await?;
    Ok(Server::assemble(
        dir, addr, kubeconfig, pki, shutdown, task, None, None,
    ))
}

type Started = (
    std::net::SocketAddr,
    PathBuf,
    control::apiserver::Pki,
    CancellationToken,
    tokio::task::JoinHandle<()>,
);

async fn start_with_ref<S: control::storage::Store>(
    dir: &Path,
    store: S,
) -> anyhow::Result<Started> {
    let mut config = ApiServerConfig::new(dir);
    // Every test server keeps an audit log (every request at Metadata level): the layer runs
    // under every test, and `audit_events` reads what it wrote.
    config.audit = Some(control::apiserver::AuditConfig::new(dir.join("audit.log")));
    let server = ApiServer::new(config, store)?;
    server.bootstrap().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let kubeconfig = server.write_kubeconfig(addr)?;
    let pki = server.pki().context("secure mode has PKI")?.clone();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = server.serve(listener, token).await {
            eprintln!("server failed: {e:?}");
        }
    });
    Ok((addr, kubeconfig, pki, shutdown, task))
}

impl Server {
    #[allow(clippy::too_many_arguments, reason = "test plumbing")]
    fn assemble(
        dir: tempfile::TempDir,
        addr: std::net::SocketAddr,
        kubeconfig: PathBuf,
        pki: control::apiserver::Pki,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        mem: Option<MemStore>,
        node: Option<store::NodeHandle>,
    ) -> Server {
        Server {
            addr,
            kubeconfig,
            admin_token: pki.admin_token.clone(),
            readonly_token: pki.readonly_token.clone(),
            ca_pem: pki.ca_pem.clone(),
            pki,
            dir,
            mem,
            node,
            etcd: None,
            endpoint: None,
            shutdown,
            task: Some(task),
        }
    }
}

impl Server {
    /// The audit events written so far (`audit.log` in the server's data dir).
    pub fn audit_events(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log"))?;
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
            .collect()
    }
}

/// Declares `mod <name> { mem, store, etcd }`: the scenario `<name>(&Server)` on a MemStore,
/// on an embedded Flotilla store and on a real etcd 3.4, the last two through RemoteStore.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mem() -> anyhow::Result<()> {
                super::$name(&$crate::harness::start().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn store() -> anyhow::Result<()> {
                super::$name(&$crate::harness::start_embedded().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() -> anyhow::Result<()> {
                super::$name(&$crate::harness::start_etcd().await?).await
            }
        }
    )*};
}

/// Output of one kubectl run.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(self) -> anyhow::Result<String> {
        if self.code != 0 {
            bail!(
                "command failed ({}):\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self.stdout)
    }
}

impl Server {
    /// Starts (`true`) or ends a store outage. Returns whether the store is back; the embedded
    /// store is shut down for good, so ending its outage returns `false`.
    pub async fn store_outage(&self, down: bool) -> anyhow::Result<bool> {
        if let Some(mem) = &self.mem {
            mem.set_unavailable(down);
            return Ok(true);
        }
        if down && let Some(node) = &self.node {
            node.shutdown().await;
        }
        if down && let Some(etcd) = &self.etcd {
            let mut child = etcd.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            child.start_kill()?;
        }
        Ok(false)
    }

    /// Compacts the store's history up to its current revision.
    pub async fn compact(&self) -> anyhow::Result<()> {
        if let Some(mem) = &self.mem {
            mem.compact();
            return Ok(());
        }
        let endpoint = self.endpoint.clone().context("no remote store")?;
        let mut kv = store::pb::etcdserverpb::kv_client::KvClient::connect(endpoint).await?;
        let rev = kv
            .range(store::pb::etcdserverpb::RangeRequest {
                key: b"/".to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .header
            .context("header")?
            .revision;
        kv.compact(store::pb::etcdserverpb::CompactionRequest {
            revision: rev,
            physical: true,
        })
        .await?;
        Ok(())
    }

    /// Writes a kubeconfig using `token` (or none) for this server.
    pub fn kubeconfig_with(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            self.pki.kubeconfig(
                &format!("https://127.0.0.1:{}", self.addr.port()),
                "u",
                token,
            ),
        )?;
        Ok(path)
    }

    /// Runs the real kubectl with the admin kubeconfig and a fresh discovery cache per server.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<Out> {
        self.kubectl_as(&self.kubeconfig.clone(), args, None).await
    }

    pub async fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<Out> {
        self.kubectl_as(&self.kubeconfig.clone(), args, Some(stdin))
            .await
    }

    pub async fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<Out> {
        let bin = kubectl_path();
        if !bin.exists() {
            bail!(
                "kubectl 1.37.1 not found at {}: run scripts/setup (it calls scripts/kubectl, which installs it into target/tools/venv)",
                bin.display()
            );
        }
        let cache = self.dir.path().join("kubectl-cache");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        if let (Some(text), Some(mut sin)) = (stdin, child.stdin.take()) {
            sin.write_all(text.as_bytes()).await?;
            drop(sin);
        }
        let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {args:?} timed out"))??;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs a Python script with the venv's official `kubernetes` client; KUBECONFIG is set.
    pub async fn python(&self, script: &str) -> anyhow::Result<Out> {
        let py = venv_python();
        if !py.exists() {
            bail!(
                "python venv not found at {}: run scripts/setup",
                py.display()
            );
        }
        let path = self.dir.path().join("client.py");
        std::fs::write(&path, script)?;
        let child = tokio::process::Command::new(&py)
            .arg(&path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .context("python client timed out")??;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// One HTTPS/1.1 request with `token` (admin when `None`); returns status, headers, body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Resp> {
        let token = self.admin_token.clone();
        self.http_as(Some(&token), method, path, headers, body)
            .await
    }

    pub async fn http_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Resp> {
        let mut s = self.connect().await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        // The server may answer (413) and close before the whole body is sent: read anyway.
        let _ = s.write_all(body).await;
        let _ = s.flush().await;
        let mut raw = Vec::new();
        match tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw)).await {
            Ok(r) => {
                // rustls reports a missing close_notify as an error after the data arrived.
                if let Err(e) = r
                    && raw.is_empty()
                {
                    return Err(e.into());
                }
            }
            Err(_) => bail!("response timed out"),
        }
        Resp::parse(&raw)
    }

    /// Opens a streaming request (watch) and returns the TLS stream after the request is sent.
    pub async fn open_stream(&self, path: &str) -> anyhow::Result<StreamReader> {
        let mut s = self.connect().await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            self.admin_token
        );
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        Ok(StreamReader { s, buf: Vec::new() })
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        Ok(connector.connect(name, tcp).await?)
    }
}

/// Reads newline-delimited JSON events from a chunked watch response.
pub struct StreamReader {
    s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl StreamReader {
    /// Next complete JSON line (chunk framing is skipped: lines that are not JSON are ignored).
    pub async fn next_event(&mut self, within: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                let t = text.trim();
                if t.starts_with('{')
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(t)
                {
                    return Ok(v);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                .await
                .context("no watch event in time")??;
            if n == 0 {
                bail!("watch stream closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    fn parse(raw: &[u8]) -> anyhow::Result<Resp> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no header end in response")?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .context("no status line")?
            .parse()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = i + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
    out
}
