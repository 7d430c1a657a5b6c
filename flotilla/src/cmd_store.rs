//! `flotilla store`: run one member of the Raft-replicated store (etcd v3 API).
//!
//! Flags are named like etcd's so an etcd operator can reuse their command lines.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// Arguments of `flotilla store` (etcd flag names).
#[derive(clap::Args, Debug)]
pub(crate) struct StoreArgs {
    /// Human-readable name of this member.
    #[arg(long, default_value = "default", env = "FLOTILLA_STORE_NAME")]
    name: String,
    /// Data directory (default `./<name>.flotilla`).
    #[arg(long, env = "FLOTILLA_STORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// URL to serve the etcd v3 API on (only http, one address).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    listen_client_urls: String,
    /// URL to serve Raft traffic on (only http, one address).
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    listen_peer_urls: String,
    /// Client URL to advertise to the cluster (default: the listen client URL).
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// Peer URL to advertise to the cluster (default: the listen peer URL).
    #[arg(long)]
    initial_advertise_peer_urls: Option<String>,
    /// Initial cluster, `name=http://host:port,...` (default: this member alone).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` to bootstrap, `existing` to join a cluster that already ran `member add`.
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    initial_cluster_state: String,
    /// Token distinguishing this cluster from others (the cluster id derives from it).
    #[arg(long, default_value = "flotilla-cluster")]
    initial_cluster_token: String,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Election timeout in milliseconds.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Applied entries between Raft snapshots (etcd's default: 100,000). Each snapshot
    /// writes the whole key space to a new file.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Largest accepted request in bytes.
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// Most operations in one Txn.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// Space quota in bytes; exceeding it raises the NOSPACE alarm.
    #[arg(long, default_value_t = 2 * 1024 * 1024 * 1024)]
    quota_backend_bytes: u64,
    /// Automatic compaction, as etcd: `periodic` keeps `--auto-compaction-retention` of
    /// time, `revision` keeps that many revisions.
    #[arg(long, default_value = "periodic", value_parser = ["periodic", "revision"])]
    auto_compaction_mode: String,
    /// History the leader keeps when it compacts on its own: for `periodic` a duration (`30m`,
    /// `1h`, `90s`; a bare number is hours, as etcd), for `revision` a count (compacted every
    /// 5 minutes). `0`, the default as in etcd, leaves compaction to clients; the history is
    /// held in memory until then.
    #[arg(long, default_value = "0")]
    auto_compaction_retention: String,
    /// A write-path phase (log sync, proposal, write, follower append) at least this slow, in
    /// ms, is logged on its own with its time (`RUST_LOG=store::stats=debug`), so stalls can be
    /// lined up across members.
    #[arg(
        long,
        default_value_t = store::Tunables::default().slow_phase.as_millis() as u64,
        value_name = "MS"
    )]
    slow_phase_ms: u64,
    /// Serve the fault-injection admin endpoint (HTTP, `/faults`) on this address, e.g.
    /// `127.0.0.1:2381`: partitions, message drops/delays/duplicates and a slow disk for this
    /// member, driven by `flotilla chaos --fault-admin`. Off by default; never expose it.
    #[arg(long, value_name = "ADDR")]
    fault_admin: Option<SocketAddr>,
}

/// etcd's `--auto-compaction-mode` and `--auto-compaction-retention`.
fn auto_compaction(mode: &str, retention: &str) -> anyhow::Result<store::AutoCompaction> {
    let r = retention.trim();
    if mode == "revision" {
        let keep: i64 = r.parse().with_context(|| {
            format!("--auto-compaction-retention {r:?}: give a number of revisions in revision mode, e.g. 10000")
        })?;
        return Ok(match keep {
            0 => store::AutoCompaction::Off,
            k if k < 0 => bail!("--auto-compaction-retention {r:?}: must not be negative"),
            k => store::AutoCompaction::Revision {
                keep: k,
                every: Duration::from_secs(300),
            },
        });
    }
    let bad = || {
        anyhow::anyhow!(
            "--auto-compaction-retention {r:?}: give a duration in periodic mode, e.g. 30m, 1h, 90s (a bare number is hours)"
        )
    };
    let split = r
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(r.len());
    let (number, unit) = r.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "" | "h" => number * 3600.0,
        "m" => number * 60.0,
        "s" => number,
        "ms" => number / 1000.0,
        _ => return Err(bad()),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(bad());
    }
    Ok(if seconds == 0.0 {
        store::AutoCompaction::Off
    } else {
        store::AutoCompaction::Periodic(Duration::from_secs_f64(seconds))
    })
}

/// `http://host:port[,...]` -> the first address.
fn parse_url(flag: &str, s: &str) -> anyhow::Result<(String, SocketAddr)> {
    let first = s.split(',').next().unwrap_or_default().trim();
    let Some(rest) = first.strip_prefix("http://") else {
        bail!("--{flag}: only http:// URLs are supported, got {first:?}");
    };
    let hostport = rest.trim_end_matches('/');
    let addr: SocketAddr = match hostport.parse() {
        Ok(a) => a,
        Err(_) => {
            use std::net::ToSocketAddrs;
            hostport
                .to_socket_addrs()
                .with_context(|| format!("--{flag}: cannot resolve {hostport:?}"))?
                .next()
                .with_context(|| format!("--{flag}: no address for {hostport:?}"))?
        }
    };
    Ok((first.trim_end_matches('/').to_owned(), addr))
}

impl StoreArgs {
    fn into_config(self) -> anyhow::Result<store::StoreConfig> {
        let (client_url, client_addr) = parse_url("listen-client-urls", &self.listen_client_urls)?;
        let (peer_url, peer_addr) = parse_url("listen-peer-urls", &self.listen_peer_urls)?;
        let advertise_peer = match &self.initial_advertise_peer_urls {
            Some(u) => parse_url("initial-advertise-peer-urls", u)?.0,
            None => peer_url,
        };
        let advertise_client = match &self.advertise_client_urls {
            Some(u) => parse_url("advertise-client-urls", u)?.0,
            None => client_url,
        };
        let initial_cluster = match &self.initial_cluster {
            Some(s) => store::StoreConfig::parse_initial_cluster(s).context("--initial-cluster")?,
            None => vec![(self.name.clone(), advertise_peer.clone())],
        };
        if let Some((_, url)) = initial_cluster.iter().find(|(n, _)| *n == self.name)
            && *url != advertise_peer
        {
            bail!(
                "--initial-cluster lists {} at {url}, but this member's peer URL is {advertise_peer} \
                 (set --listen-peer-urls or --initial-advertise-peer-urls to match)",
                self.name
            );
        }
        let tunables = store::Tunables {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval),
            election_timeout: Duration::from_millis(self.election_timeout),
            snapshot_count: self.snapshot_count,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            quota_backend_bytes: self.quota_backend_bytes,
            auto_compaction: auto_compaction(
                &self.auto_compaction_mode,
                &self.auto_compaction_retention,
            )?,
            slow_phase: Duration::from_millis(self.slow_phase_ms),
            ..store::Tunables::default()
        };
        Ok(store::StoreConfig {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!("{}.flotilla", self.name))),
            name: self.name,
            listen_client_addr: client_addr,
            listen_peer_addr: peer_addr,
            advertise_peer_url: Some(advertise_peer),
            advertise_client_url: Some(advertise_client),
            initial_cluster,
            initial_cluster_state: if self.initial_cluster_state == "existing" {
                store::ClusterState::Existing
            } else {
                store::ClusterState::New
            },
            initial_cluster_token: self.initial_cluster_token,
            tunables,
            fault_hooks: store::FaultHooks::default(),
        })
    }
}

/// Arguments of `flotilla snapshot restore` (etcd's `etcdctl snapshot restore`).
#[derive(clap::Args, Debug)]
pub(crate) struct RestoreArgs {
    /// A file `etcdctl snapshot save` wrote from a Flotilla store.
    snapshot: PathBuf,
    /// The flags the restored member will be started with: `--name`, `--data-dir` (a new
    /// one), `--initial-cluster` (every member of the new cluster), `--initial-cluster-token`
    /// and the peer URLs.
    #[command(flatten)]
    member: StoreArgs,
}

/// Writes a new member data dir holding a backup; the member then starts with the same flags.
pub(crate) fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let config = args.member.into_config()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to build the tokio runtime")?;
    let restored = rt
        .block_on(store::restore(&args.snapshot, &config))
        .with_context(|| format!("failed to restore member {:?}", config.name))?;
    println!(
        "restored {} keys at revision {} into {} for member {:?} of a new {}-member cluster; \
         start it with the same flags: flotilla store --name {} --data-dir {} ...",
        restored.keys,
        restored.revision,
        config.data_dir.display(),
        config.name,
        restored.members,
        config.name,
        config.data_dir.display(),
    );
    Ok(())
}

/// Runs a store member until SIGINT or SIGTERM.
pub(crate) fn run(args: StoreArgs) -> anyhow::Result<()> {
    let fault_admin = args.fault_admin;
    let config = args.into_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to build the tokio runtime")?;
    rt.block_on(async move {
        let name = config.name.clone();
        let data_dir = config.data_dir.clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        let node = match fault_admin {
            None => store::Node::start(config).await,
            Some(addr) => start_with_fault_admin(config, addr, cancel.clone()).await?,
        }
        .with_context(|| format!("failed to start store member {name:?}"))?;
        tracing::info!(
            member = %name,
            id = format_args!("{:x}", node.id()),
            client = %node.client_addr(),
            peer = %node.peer_addr(),
            data_dir = %data_dir.display(),
            "store member serving the etcd v3 API"
        );
        wait_for_signal().await?;
        tracing::info!("shutting down");
        cancel.cancel();
        node.shutdown().await;
        Ok(())
    })
}

/// Starts the member with its Raft transport and log store behind the fault-injection
/// switches, and serves the admin endpoint on `addr`.
async fn start_with_fault_admin(
    config: store::StoreConfig,
    addr: SocketAddr,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Result<store::NodeHandle, store::StoreError>> {
    let admin = chaos::admin::FaultAdmin::new(
        rand::random(),
        &config.initial_cluster_token,
        &config.initial_cluster,
        &config.name,
    )?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--fault-admin: cannot listen on {addr}"))?;
    let bind = |a: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .map_err(|source| store::StoreError::Bind {
                addr: a,
                what,
                source,
            })
    };
    let client = match bind(config.listen_client_addr, "client").await {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let peer = match bind(config.listen_peer_addr, "peer").await {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let mut config = config;
    config.fault_hooks.forward = Some(admin.router().forward_filter(admin.index()));
    config.fault_hooks.clock_offset_ms = Some(admin.clock_offset_ms());
    let disk = admin.disk();
    let node = store::Node::start_wrapped(
        config,
        client,
        peer,
        admin.router().factory(admin.index()),
        move |log| chaos::net::SlowLog::new(log, disk),
    )
    .await;
    tracing::warn!(%addr, "fault-injection admin endpoint enabled (PUT/DELETE /faults)");
    tokio::spawn(chaos::admin::serve(listener, admin, cancel));
    Ok(node)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::AutoCompaction;

    #[test]
    fn auto_compaction_flags_read_like_etcds() {
        let p = |m, r| auto_compaction(m, r).map_err(|e| e.to_string());
        assert_eq!(p("periodic", "0"), Ok(AutoCompaction::Off));
        assert_eq!(
            p("periodic", "1"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            p("periodic", "30m"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(1800)))
        );
        assert_eq!(
            p("periodic", "1.5h"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(
            p("revision", "1000"),
            Ok(AutoCompaction::Revision {
                keep: 1000,
                every: Duration::from_secs(300)
            })
        );
        assert!(p("periodic", "soon").unwrap_err().contains("duration"));
        assert!(p("periodic", "10d").unwrap_err().contains("duration"));
        assert!(
            p("revision", "1h")
                .unwrap_err()
                .contains("number of revisions")
        );
        assert!(p("revision", "-5").unwrap_err().contains("negative"));
    }
}
