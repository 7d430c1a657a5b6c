//! Member configuration: identity, addresses, initial cluster and tunables.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Whether this member bootstraps a new cluster or joins an existing one (etcd's
/// `--initial-cluster-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterState {
    /// Bootstrap: every member of `initial_cluster` initializes the same membership.
    #[default]
    New,
    /// Join a running cluster that already added this member (`etcdctl member add`).
    Existing,
}

/// Knobs with etcd-like defaults.
#[derive(Debug, Clone)]
pub struct Tunables {
    /// Leader heartbeat period (etcd `--heartbeat-interval`, default 100 ms).
    pub heartbeat_interval: Duration,
    /// How long followers go without hearing a leader before one campaigns (etcd
    /// `--election-timeout`, default 1000 ms). A follower campaigns after a random time in
    /// `[0.9, 1.2) ×` this: openraft 0.9 waits out its leader lease (the maximum election
    /// timeout, set to 0.6 × this) plus a randomized election timeout (0.3–0.6 × this).
    pub election_timeout: Duration,
    /// Applied entries between snapshots (etcd `--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept in the log after a snapshot, for slightly lagging followers.
    pub snapshot_catchup_entries: u64,
    /// Largest accepted request (etcd `--max-request-bytes`, 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most operations per Txn branch (etcd `--max-txn-ops`, 128).
    pub max_txn_ops: usize,
    /// Space quota; exceeding it raises the NOSPACE alarm (etcd `--quota-backend-bytes`, 2 GiB).
    pub quota_backend_bytes: u64,
    /// Most client requests packed into one Raft entry (group commit).
    pub max_batch_ops: usize,
    /// How long a request waits for a leader before failing with `request timed out`.
    pub request_timeout: Duration,
    /// Automatic compaction of the key history by the leader (etcd `--auto-compaction-*`).
    pub auto_compaction: AutoCompaction,
    /// A write-path phase (log sync, proposal, write) at least this slow is logged on its own
    /// with its time (target `store::stats`, debug), like etcd's `--warning-apply-duration`.
    pub slow_phase: Duration,
}

/// Automatic compaction of the key history (etcd `--auto-compaction-mode` and
/// `--auto-compaction-retention`). Off by default, as in etcd; the history is held in memory
/// until something compacts it (the Kubernetes API server does every 5 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoCompaction {
    /// Keep all history until a client compacts.
    #[default]
    Off,
    /// Keep the history of the last `retention` (etcd's `periodic` mode): the leader notes the
    /// revision every tenth of `min(retention, 1 h)` and, that often, compacts to the revision
    /// it noted `retention` ago.
    Periodic(Duration),
    /// Keep the last `keep` revisions (etcd's `revision` mode): every `every` (etcd: 5
    /// minutes) the leader compacts to the current revision minus `keep`.
    Revision {
        /// Revisions kept.
        keep: i64,
        /// How often the leader compacts.
        every: Duration,
    },
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_count: 100_000,
            snapshot_catchup_entries: 5_000,
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            quota_backend_bytes: 2 * 1024 * 1024 * 1024,
            max_batch_ops: 256,
            request_timeout: Duration::from_secs(7),
            auto_compaction: AutoCompaction::Off,
            slow_phase: Duration::from_millis(20),
        }
    }
}

/// Configuration of one store member. Flag names of `flotilla store` follow etcd's.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Human-readable member name (`--name`), unique in the cluster.
    pub name: String,
    /// Where sled keeps the log, vote, state machine and snapshots (`--data-dir`).
    pub data_dir: PathBuf,
    /// Address serving the etcd v3 API (`--listen-client-urls`).
    pub listen_client_addr: SocketAddr,
    /// Address serving Raft traffic between members (`--listen-peer-urls`).
    pub listen_peer_addr: SocketAddr,
    /// Peer URL other members use to reach this one; defaults to `http://<listen_peer_addr>`.
    pub advertise_peer_url: Option<String>,
    /// Client URL reported in `MemberList`; defaults to `http://<listen_client_addr>`.
    pub advertise_client_url: Option<String>,
    /// `(name, peer URL)` of every initial member, this one included (`--initial-cluster`).
    pub initial_cluster: Vec<(String, String)>,
    /// Bootstrap or join (`--initial-cluster-state`).
    pub initial_cluster_state: ClusterState,
    /// Distinguishes clusters; the cluster id is derived from it (`--initial-cluster-token`).
    pub initial_cluster_token: String,
    /// Timing and limits.
    pub tunables: Tunables,
    /// Test-only fault injection (crash points, the planted ack-before-flush bug); off by default.
    pub fault_hooks: crate::faults::FaultHooks,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let peer: SocketAddr = ([127, 0, 0, 1], 2380).into();
        Self {
            name: "default".to_owned(),
            data_dir: PathBuf::from("default.flotilla"),
            listen_client_addr: ([127, 0, 0, 1], 2379).into(),
            listen_peer_addr: peer,
            advertise_peer_url: None,
            advertise_client_url: None,
            initial_cluster: vec![("default".to_owned(), format!("http://{peer}"))],
            initial_cluster_state: ClusterState::New,
            initial_cluster_token: "flotilla-cluster".to_owned(),
            tunables: Tunables::default(),
            fault_hooks: crate::faults::FaultHooks::default(),
        }
    }
}

/// Invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--initial-cluster` does not name this member.
    #[error("member {name:?} is not listed in the initial cluster ({listed})")]
    NotInInitialCluster {
        /// This member's name.
        name: String,
        /// The names that are listed.
        listed: String,
    },
    /// Two members share a name or a peer URL.
    #[error("duplicate member {0:?} in the initial cluster")]
    Duplicate(String),
    /// A malformed `name=url` list or URL.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// Heartbeat must be well below the election timeout.
    #[error("heartbeat interval must be at most a quarter of the election timeout")]
    Timing,
}

impl StoreConfig {
    /// The members `--initial-cluster` lists, by member id (derived from the token and URL).
    pub(crate) fn initial_members(&self) -> std::collections::BTreeMap<u64, crate::types::Member> {
        self.initial_cluster
            .iter()
            .map(|(name, url)| {
                (
                    member_id(&self.initial_cluster_token, url),
                    crate::types::Member {
                        name: name.clone(),
                        peer_url: url.clone(),
                        client_url: String::new(),
                        promote_when_ready: false,
                    },
                )
            })
            .collect()
    }

    /// Peer URL advertised to other members.
    pub fn peer_url(&self) -> String {
        self.advertise_peer_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen_peer_addr))
    }

    /// Client URL advertised in `MemberList`.
    pub fn client_url(&self) -> String {
        self.advertise_client_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen_client_addr))
    }

    /// Parses etcd's `name1=url1,name2=url2` form.
    pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
                what: "initial cluster entry (want name=url)",
                value: part.to_owned(),
            })?;
            if name.is_empty() || !url.starts_with("http://") {
                return Err(ConfigError::Invalid {
                    what: "initial cluster entry (want name=http://host:port)",
                    value: part.to_owned(),
                });
            }
            out.push((name.to_owned(), url.to_owned()));
        }
        Ok(out)
    }

    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.tunables;
        // openraft's minimum election timeout (0.3 × this) must exceed the heartbeat.
        if t.heartbeat_interval * 4 > t.election_timeout {
            return Err(ConfigError::Timing);
        }
        let mut names = std::collections::BTreeSet::new();
        let mut urls = std::collections::BTreeSet::new();
        for (name, url) in &self.initial_cluster {
            if !names.insert(name) {
                return Err(ConfigError::Duplicate(name.clone()));
            }
            if !urls.insert(url) {
                return Err(ConfigError::Duplicate(url.clone()));
            }
        }
        if self.initial_cluster_state == ClusterState::New
            && !self.initial_cluster.iter().any(|(n, _)| n == &self.name)
        {
            return Err(ConfigError::NotInInitialCluster {
                name: self.name.clone(),
                listed: self
                    .initial_cluster
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        Ok(())
    }
}

/// FNV-1a: stable across builds and platforms (member and cluster ids are persisted).
pub(crate) fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // etcd ids are non-zero; 0 means "none" on the wire.
    h.max(1)
}

/// Member id = hash of the token and the peer URL, so `member add` (which only knows the
/// URL) and the joining member compute the same id.
pub fn member_id(token: &str, peer_url: &str) -> u64 {
    fnv64(&[token.as_bytes(), peer_url.as_bytes()])
}

/// Cluster id = hash of the token.
pub(crate) fn cluster_id(token: &str) -> u64 {
    fnv64(&[b"cluster", token.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster() {
        let v = StoreConfig::parse_initial_cluster("a=http://1:2,b=http://3:4").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1], ("b".to_owned(), "http://3:4".to_owned()));
        assert!(StoreConfig::parse_initial_cluster("a").is_err());
        assert!(StoreConfig::parse_initial_cluster("a=1.2.3.4:5").is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(member_id("t", "http://a"), member_id("t", "http://a"));
        assert_ne!(member_id("t", "http://a"), member_id("t", "http://b"));
        assert_ne!(member_id("t", "http://a"), member_id("u", "http://a"));
    }
}
