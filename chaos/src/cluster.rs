//! In-process store clusters (real sled data dirs in tempdirs) whose Raft traffic goes through a
//! [`Router`] and whose log stores sit behind [`DiskFaults`].
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use store::pb::etcdserverpb::RangeRequest;
use store::pb::etcdserverpb::kv_client::KvClient;
use store::{ClusterState, Node, NodeHandle, StoreConfig, Tunables};
use tokio::net::TcpListener;

use super::net::{DiskFaults, Router, SlowLog};

/// One member slot: its config survives restarts.
#[derive(Debug)]
pub struct Member {
    /// Configuration (fixed addresses, data dir).
    pub config: StoreConfig,
    /// The running member, `None` while stopped.
    pub handle: Option<NodeHandle>,
    /// Storage faults of this member.
    pub disk: DiskFaults,
    /// Removed from the cluster (stays stopped).
    pub removed: bool,
}

/// A cluster under test.
#[derive(Debug)]
pub struct FaultCluster {
    /// The switchboard all Raft traffic goes through.
    pub router: Router,
    /// Members by index.
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

/// Tunables for fault tests: fast elections, frequent snapshots (so partitions outlive the log),
/// generous request timeouts for loaded CI machines.
pub fn fault_tunables() -> Tunables {
    Tunables {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout: Duration::from_millis(600),
        snapshot_count: 300,
        snapshot_catchup_entries: 50,
        request_timeout: Duration::from_secs(3),
        ..Tunables::default()
    }
}

async fn bind_retry(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.map_or_else(|| anyhow::anyhow!("bind {addr}"), Into::into))
}

impl FaultCluster {
    /// Starts `n` members on loopback port-0 addresses.
    pub async fn start(n: usize, seed: u64, tunables: Tunables) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let router = Router::new(seed);
        let mut addrs = Vec::new();
        for _ in 0..n {
            // Bind then drop to learn free ports; re-bound immediately below.
            let c = TcpListener::bind("127.0.0.1:0").await?;
            let p = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push((c.local_addr()?, p.local_addr()?));
        }
        let initial: Vec<(String, String)> = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, p))| (format!("m{i}"), format!("http://{p}")))
            .collect();
        let mut members = Vec::new();
        for (i, (c, p)) in addrs.into_iter().enumerate() {
            members.push(Member {
                config: StoreConfig {
                    name: format!("m{i}"),
                    data_dir: dir.path().join(format!("m{i}")),
                    listen_client_addr: c,
                    listen_peer_addr: p,
                    initial_cluster: initial.clone(),
                    initial_cluster_state: ClusterState::New,
                    initial_cluster_token: format!("faults-{seed}"),
                    tunables: tunables.clone(),
                    ..StoreConfig::default()
                },
                handle: None,
                disk: DiskFaults::default(),
                removed: false,
            });
        }
        let mut cluster = Self {
            router,
            members,
            _dir: dir,
        };
        for i in 0..n {
            cluster.start_member(i).await?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts, reopening its data dir) member `i`.
    pub async fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        if m.handle.is_some() {
            return Ok(());
        }
        let client = bind_retry(m.config.listen_client_addr).await?;
        let peer = bind_retry(m.config.listen_peer_addr).await?;
        let disk = m.disk.clone();
        let handle = Node::start_wrapped(
            m.config.clone(),
            client,
            peer,
            self.router.factory(i),
            move |log| SlowLog::new(log, disk),
        )
        .await
        .with_context(|| format!("start member {i}"))?;
        self.router.register(handle.id(), i);
        m.handle = Some(handle);
        Ok(())
    }

    /// Adds a new member through `MemberAdd` (sent to member `via`) and starts it with
    /// `initial-cluster-state existing`; returns its index.
    pub async fn add_member(&mut self, via: usize) -> anyhow::Result<usize> {
        use store::pb::etcdserverpb::MemberAddRequest;
        use store::pb::etcdserverpb::cluster_client::ClusterClient;
        let c = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let p = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let i = self.members.len();
        let template = self.members[0].config.clone();
        let mut initial: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| {
                (
                    m.config.name.clone(),
                    format!("http://{}", m.config.listen_peer_addr),
                )
            })
            .collect();
        initial.push((format!("m{i}"), format!("http://{p}")));
        let mut cc = ClusterClient::connect(self.endpoints()[via].clone()).await?;
        cc.member_add(MemberAddRequest {
            peer_ur_ls: vec![format!("http://{p}")],
            is_learner: false,
        })
        .await
        .context("member add")?;
        self.members.push(Member {
            config: StoreConfig {
                name: format!("m{i}"),
                data_dir: template.data_dir.with_file_name(format!("m{i}")),
                listen_client_addr: c,
                listen_peer_addr: p,
                initial_cluster: initial,
                initial_cluster_state: ClusterState::Existing,
                ..template
            },
            handle: None,
            disk: DiskFaults::default(),
            removed: false,
        });
        self.start_member(i).await?;
        Ok(i)
    }

    /// Removes member `i` through `MemberRemove` (sent to member `via`), then stops it.
    pub async fn remove_member(&mut self, i: usize, via: usize) -> anyhow::Result<()> {
        use store::pb::etcdserverpb::MemberRemoveRequest;
        use store::pb::etcdserverpb::cluster_client::ClusterClient;
        let id = self.members[i]
            .handle
            .as_ref()
            .context("member to remove is not running")?
            .id();
        let mut cc = ClusterClient::connect(self.endpoints()[via].clone()).await?;
        cc.member_remove(MemberRemoveRequest { id })
            .await
            .context("member remove")?;
        self.members[i].removed = true;
        self.stop_member(i).await;
        Ok(())
    }

    /// Stops member `i` (its tasks, Raft and sled handles go away; the data dir stays).
    pub async fn stop_member(&mut self, i: usize) {
        if let Some(h) = self.members[i].handle.take() {
            h.shutdown().await;
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs by member index.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.config.listen_client_addr))
            .collect()
    }

    /// Index of the member running members agree leads, if any.
    pub fn leader(&self) -> Option<usize> {
        let views: Vec<Option<u64>> = self
            .members
            .iter()
            .filter_map(|m| m.handle.as_ref())
            .map(|h| h.metrics().leader)
            .collect();
        let first = (*views.first()?)?;
        if views.iter().any(|v| *v != Some(first)) {
            return None;
        }
        self.members
            .iter()
            .position(|m| m.handle.as_ref().is_some_and(|h| h.id() == first))
    }

    /// Waits for an agreed leader.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("no agreed leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running member applied the same log index and revision.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let views: Vec<(u64, i64)> = self
                .members
                .iter()
                .filter_map(|m| m.handle.as_ref())
                .map(|h| {
                    let m = h.metrics();
                    (m.last_applied, m.revision)
                })
                .collect();
            if views.windows(2).all(|w| w[0] == w[1]) && self.leader().is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "members did not converge within {timeout:?}: (applied, revision) = {views:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every key of member `i` as `(key, value, mod_revision, create_revision, version)`, read
    /// serializably from that member.
    pub async fn dump(&self, i: usize) -> anyhow::Result<Vec<super::checks::KvRow>> {
        let mut kv = KvClient::connect(self.endpoints()[i].clone()).await?;
        let resp = kv
            .range(RangeRequest {
                key: vec![0],
                range_end: vec![0],
                serializable: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(resp
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.mod_revision,
                    kv.create_revision,
                    kv.version,
                )
            })
            .collect())
    }

    /// Stops every member.
    pub async fn shutdown(mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i).await;
        }
    }
}
