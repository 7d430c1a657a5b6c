//! In-process clusters over loopback with real sled data dirs in tempdirs.
use std::net::SocketAddr;
use std::time::Duration;

use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::{PutRequest, RangeRequest};
use store::{ClusterState, Node, NodeHandle, StoreConfig, Tunables};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,store=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Tunables for tests: fast elections, generous request timeout for 2 loaded cores.
pub fn test_tunables() -> Tunables {
    Tunables {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_secs(10),
        ..Tunables::default()
    }
}

pub struct TestCluster {
    pub nodes: Vec<Option<NodeHandle>>,
    pub configs: Vec<StoreConfig>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

impl TestCluster {
    pub async fn start(n: usize, tunables: Tunables) -> Self {
        Self::start_inner(n, tunables, None).await
    }

    /// A new cluster (token `restored`) whose members are first restored from `snapshot`
    /// (`store::restore`, what `flotilla snapshot restore` runs).
    pub async fn start_restored(n: usize, tunables: Tunables, snapshot: &std::path::Path) -> Self {
        Self::start_inner(n, tunables, Some(snapshot)).await
    }

    async fn start_inner(n: usize, tunables: Tunables, snapshot: Option<&std::path::Path>) -> Self {
        let mut listeners = Vec::new();
        let mut initial = Vec::new();
        for i in 0..n {
            let (c, ca) = bind().await;
            let (p, pa) = bind().await;
            initial.push((format!("n{}", i + 1), format!("http://{pa}")));
            listeners.push((c, ca, p, pa));
        }
        let mut nodes = Vec::new();
        let mut configs = Vec::new();
        let mut dirs = Vec::new();
        for (i, (c, ca, p, pa)) in listeners.into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut config = StoreConfig {
                name: format!("n{}", i + 1),
                data_dir: dir.path().join("data"),
                listen_client_addr: ca,
                listen_peer_addr: pa,
                initial_cluster: initial.clone(),
                initial_cluster_state: ClusterState::New,
                tunables: tunables.clone(),
                ..StoreConfig::default()
            };
            if let Some(file) = snapshot {
                config.initial_cluster_token = "restored".into();
                let restored = store::restore(file, &config).await.expect("restore");
                tracing::info!(?restored, member = %config.name, "restored");
            }
            let node = Node::start_with_listeners(config.clone(), c, p)
                .await
                .expect("start node");
            nodes.push(Some(node));
            configs.push(config);
            dirs.push(dir);
        }
        Self {
            nodes,
            configs,
            _dirs: dirs,
        }
    }

    /// Adds a member process (not yet in the cluster) that will join with state `existing`.
    pub async fn prepare_joiner(&mut self) -> (StoreConfig, TcpListener, TcpListener) {
        let (c, ca) = bind().await;
        let (p, pa) = bind().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("n{}", self.configs.len() + 1);
        let mut initial = self.configs[0].initial_cluster.clone();
        initial.push((name.clone(), format!("http://{pa}")));
        let config = StoreConfig {
            name,
            data_dir: dir.path().join("data"),
            listen_client_addr: ca,
            listen_peer_addr: pa,
            initial_cluster: initial,
            initial_cluster_state: ClusterState::Existing,
            tunables: self.configs[0].tunables.clone(),
            ..StoreConfig::default()
        };
        self._dirs.push(dir);
        (config, c, p)
    }

    pub fn node(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn client_url(&self, i: usize) -> String {
        format!("http://{}", self.configs[i].listen_client_addr)
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::connect(self.client_url(i))
            .await
            .expect("connect")
    }

    /// Index of the member all running members agree leads.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .iter()
                .flatten()
                .map(|n| n.metrics().leader)
                .collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && let Some(i) = self
                    .nodes
                    .iter()
                    .position(|n| n.as_ref().is_some_and(|n| n.id() == *l))
            {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader within {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    pub async fn restart(&mut self, i: usize) {
        let config = self.configs[i].clone();
        let c = rebind(config.listen_client_addr).await;
        let p = rebind(config.listen_peer_addr).await;
        let node = Node::start_with_listeners(config, c, p)
            .await
            .expect("restart");
        self.nodes[i] = Some(node);
    }

    /// Restarts a stopped member listening on and advertising a new peer URL (after an
    /// `etcdctl member update` told the cluster).
    pub async fn restart_with_peer_url(&mut self, i: usize, url: &str) {
        let pa: SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .expect("peer url host:port");
        let config = &mut self.configs[i];
        config.listen_peer_addr = pa;
        config.advertise_peer_url = Some(url.to_owned());
        config.initial_cluster_state = ClusterState::Existing;
        let config = config.clone();
        let c = rebind(config.listen_client_addr).await;
        let p = rebind(pa).await;
        let node = Node::start_with_listeners(config, c, p)
            .await
            .expect("restart with a new peer URL");
        self.nodes[i] = Some(node);
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i).await;
        }
    }
}

pub async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    kv.put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("header")
    .revision
}

pub async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<String> {
    let r = kv
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    r.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

/// Polls `f` until it returns true.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Binds a restarted member's old address again. The port can stay taken for a moment: the
/// stopped member's listener may still be closing, or (the ports came from the ephemeral range)
/// a live outgoing connection may hold it as its local port; both pass, so retry for 10 s.
async fn rebind(addr: std::net::SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    }
}

/// A plain HTTP/1.1 GET of `path` on a member's client URL (`http://host:port`): the status
/// and the body. Written by hand so the tests show exactly what a probe sends.
pub async fn http_get(client_url: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = client_url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut raw))
        .await
        .expect("HTTP answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, body.to_owned())
}

/// Puts 4 KiB values under `prefix` (`{prefix}0`, `{prefix}1`, ...) until the store refuses
/// one (a small space quota's NOSPACE); the refusal.
pub async fn put_until_refused(kv: &mut KvClient<Channel>, prefix: &str) -> tonic::Status {
    for i in 0..100 {
        let put = kv
            .put(PutRequest {
                key: format!("{prefix}{i}").into(),
                value: vec![b'x'; 4096],
                ..Default::default()
            })
            .await;
        if let Err(e) = put {
            return e;
        }
    }
    panic!("100 puts of 4 KiB under {prefix:?} were all accepted: no space quota reached");
}
