//! In-process store clusters (real sled data dirs in tempdirs) whose Raft traffic goes through a
//! [`Router`] and whose log stores sit behind [`DiskFaults`].
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use store::pb::etcdserverpb::RangeRequest;
use store::pb::etcdserverpb::kv_client::KvClient;
use store::{ClusterState, CrashPoint, FaultHooks, Node, NodeHandle, StoreConfig, Tunables};
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
    /// Crash points armed for this member.
    pub crash: CrashSwitch,
    /// Raft id, known once the member first started (0 before).
    pub id: u64,
    /// Offset of this member's lease clock in ms (F15); survives restarts, like a host's
    /// skewed clock.
    pub clock_offset_ms: Arc<AtomicI64>,
}

#[derive(Debug, Default)]
struct CrashState {
    armed: Option<CrashPoint>,
    /// Set once the member died at a point: every later storage call fails too.
    dead: bool,
    /// The data dir image taken at the moment of the crash.
    image: Option<PathBuf>,
    images: u32,
    /// Read the data dir at every `BeforeLogFlush` while armed (F8).
    capture: bool,
    /// Its files as of the last `BeforeLogFlush`.
    captured: Option<Files>,
    /// Log syncs wait at `BeforeLogFlush` until then (a disk that has stopped answering).
    stall_syncs_until: Option<std::time::Instant>,
}

/// The longest [`CrashSwitch::stall_syncs`] holds a sync.
pub const MAX_SYNC_STALL: Duration = Duration::from_secs(5);

/// Arms a member to crash at a [`CrashPoint`]: when storage reaches it, the data dir is copied
/// as it is on disk at that instant (what a `kill -9` would leave, since sled's unflushed
/// buffers live in process memory) and the storage call fails, which stops Raft on that
/// member. The member is then restarted from the copy.
#[derive(Debug, Clone, Default)]
pub struct CrashSwitch {
    state: Arc<Mutex<CrashState>>,
}

impl CrashSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `point`.
    pub fn arm(&self, point: CrashPoint) {
        let mut s = self.lock();
        s.armed = Some(point);
        s.dead = false;
        s.image = None;
        s.capture = false;
        s.captured = None;
    }

    /// Arms `point` and, until it is reached, keeps the data dir's contents as they were at the
    /// last `BeforeLogFlush` (so the write of the flush that crashes can be told apart).
    pub fn arm_capturing(&self, point: CrashPoint) {
        self.arm(point);
        self.lock().capture = true;
    }

    /// Disarms without crashing.
    pub fn disarm(&self) {
        self.lock().armed = None;
    }

    /// Holds every log sync of the member before it starts (`true`, for at most
    /// [`MAX_SYNC_STALL`]) or lets them go on. Meant for a leader, whose syncs run on their own
    /// thread; a follower's run on the runtime, which the bound keeps from wedging for good.
    pub fn stall_syncs(&self, stall: bool) {
        self.lock().stall_syncs_until = stall.then(|| std::time::Instant::now() + MAX_SYNC_STALL);
    }

    fn hook(&self, data_dir: PathBuf) -> store::CrashHook {
        let me = self.clone();
        Arc::new(move |point| {
            while point == CrashPoint::BeforeLogFlush
                && me
                    .lock()
                    .stall_syncs_until
                    .is_some_and(|until| std::time::Instant::now() < until)
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let mut s = me.lock();
            if s.dead {
                return true;
            }
            if s.capture && s.armed.is_some() && point == CrashPoint::BeforeLogFlush {
                s.captured = read_files(&data_dir).ok();
            }
            if s.armed != Some(point) {
                return false;
            }
            if s.capture {
                // Crash only after a flush that wrote something (there is a write to tear).
                let now = read_files(&data_dir).ok();
                if s.captured.is_none() || now == s.captured {
                    return false;
                }
            }
            s.images += 1;
            let image = image_path(&data_dir, s.images);
            let dropped = match copy_dir(&data_dir, &image) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "crash image failed; not crashing");
                    s.armed = None;
                    return false;
                }
            };
            tracing::info!(?point, image = %image.display(), unsynced_bytes_dropped = dropped, "injected crash");
            s.armed = None;
            s.dead = true;
            s.image = Some(image);
            true
        })
    }
}

/// Every file under a data dir (relative path → contents).
type Files = std::collections::BTreeMap<PathBuf, Vec<u8>>;

fn read_files(dir: &Path) -> std::io::Result<Files> {
    fn walk(root: &Path, dir: &Path, out: &mut Files) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                out.insert(rel, std::fs::read(&path)?);
            }
        }
        Ok(())
    }
    let mut out = Files::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn image_path(data_dir: &Path, n: u32) -> PathBuf {
    let name = data_dir
        .file_name()
        .map_or_else(|| "member".into(), |n| n.to_string_lossy().into_owned());
    data_dir.with_file_name(format!("{name}-crash{n}"))
}

/// Copies a data dir (files and subdirectories) as a power cut at this instant leaves it, the
/// way LazyFS does (F9): a file the Raft log reported syncs for keeps only its synced prefix,
/// since bytes written after the last sync sit in the page cache a power cut empties. (Sled's
/// unsynced writes are process memory and never reach the copy.) Returns the bytes dropped.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut dropped = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            dropped += copy_dir(&entry.path(), &target)?;
            continue;
        }
        // Read before and after the copy: a sync finishing meanwhile may only add bytes that
        // were written before the copy (such bytes may survive a power cut too), and a
        // truncated file's stale report is bounded by the later one.
        let before = FaultHooks::synced_len(&entry.path());
        let len = std::fs::copy(entry.path(), &target)?;
        let after = FaultHooks::synced_len(&entry.path());
        let synced = match (before, after) {
            (Some(b), Some(a)) => Some(b.min(a)),
            (b, a) => b.or(a),
        };
        if let Some(synced) = synced
            && synced < len
        {
            OpenOptions::new()
                .write(true)
                .open(&target)?
                .set_len(synced)?;
            dropped += len - synced;
        }
    }
    Ok(dropped)
}

/// How [`FaultCluster::crash_and_tear`] damages the tail of a crash image (F8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// The latest write landed only half (its second half, at most 1 KiB, keeps the old bytes).
    TornWrite,
    /// One bit flipped in the latest write.
    BitFlip,
    /// The latest write cut short (at most 1 KiB): the file is truncated inside it when it
    /// extended the file, else (segments may be preallocated) the lost part reads as zeros.
    Truncate,
}

/// The byte range `[start, end)` where `new` last differs from `old` (small equal gaps inside
/// one write are bridged), or `None` when they are equal.
fn last_write(old: &[u8], new: &[u8]) -> Option<(usize, usize)> {
    let differs = |i: usize| old.get(i) != new.get(i);
    let mut end = old.len().max(new.len());
    while end > 0 && !differs(end - 1) {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end - 1;
    let mut gap = 0;
    while start > 0 && gap < 64 {
        if differs(start - 1) {
            gap = 0;
        } else {
            gap += 1;
        }
        start -= 1;
    }
    Some((start + gap, end.min(new.len())))
}

/// Damages the file `image` (in a crash image) per `tear`, given its contents just before the
/// flush that crashed; says what it did.
fn tear_file(before: &[u8], image: &Path, tear: Tear) -> anyhow::Result<String> {
    let mut bytes = std::fs::read(image)?;
    let len = bytes.len();
    let what = match tear {
        Tear::TornWrite | Tear::BitFlip | Tear::Truncate => {
            let (a, b) = last_write(before, &bytes).context("no write to tear")?;
            if tear == Tear::Truncate && b == len && len > before.len() {
                let to = (a + (b - a) / 2)
                    .max(b.saturating_sub(1024))
                    .max(before.len());
                bytes.truncate(to);
                format!("file cut from {len} to {to} bytes, inside the latest write [{a}, {b})")
            } else if tear == Tear::Truncate {
                // Writes into a preallocated segment: a cut-short write reads as zeros.
                let from = (a + (b - a) / 2).max(b.saturating_sub(1024));
                bytes[from..b].fill(0);
                format!("latest write [{a}, {b}) cut short: [{from}, {b}) zeroed")
            } else if tear == Tear::BitFlip {
                let at = a + (b - a) / 2;
                bytes[at] ^= 0x10;
                format!("flipped a bit at offset {at} in the latest write [{a}, {b})")
            } else {
                let from = (a + (b - a) / 2).max(b.saturating_sub(1024));
                for (i, byte) in bytes.iter_mut().enumerate().take(b).skip(from) {
                    *byte = before.get(i).copied().unwrap_or(0);
                }
                format!("latest write [{a}, {b}) torn: [{from}, {b}) reverted")
            }
        }
    };
    std::fs::write(image, bytes)?;
    Ok(what)
}

/// A cluster under test.
#[derive(Debug)]
pub struct FaultCluster {
    /// The switchboard all Raft traffic goes through.
    pub router: Router,
    /// Members by index.
    pub members: Vec<Member>,
    /// Start members with the planted ack-before-flush bug (checker self-test).
    pub planted_bug: bool,
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

/// A free loopback address for a member, below Linux's ephemeral range (32768+): a restarted
/// member re-binds its address, and a port from that range may meanwhile be the local end of
/// some outgoing connection, which makes the re-bind fail for as long as it lives.
async fn member_port() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 40) * 300;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).await.is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free loopback port in 20000-31999")
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
        Self::start_with(n, seed, tunables, false).await
    }

    /// Like [`FaultCluster::start`]; `planted_bug` turns on the ack-before-flush bug.
    pub async fn start_with(
        n: usize,
        seed: u64,
        tunables: Tunables,
        planted_bug: bool,
    ) -> anyhow::Result<Self> {
        // Crash images drop what the Raft logs wrote but did not sync (F9).
        FaultHooks::track_synced_lengths();
        let dir = tempfile::tempdir()?;
        let router = Router::new(seed);
        let mut addrs = Vec::new();
        for _ in 0..n {
            addrs.push((member_port().await?, member_port().await?));
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
                crash: CrashSwitch::default(),
                id: 0,
                clock_offset_ms: Arc::default(),
            });
        }
        let mut cluster = Self {
            router,
            members,
            planted_bug,
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
        let mut config = m.config.clone();
        config.fault_hooks = FaultHooks {
            crash: Some(m.crash.hook(config.data_dir.clone())),
            forward: Some(self.router.forward_filter(i)),
            ack_before_flush: self.planted_bug,
            clock_offset_ms: Some(m.clock_offset_ms.clone()),
        };
        self.router
            .register_url(&format!("http://{}", config.listen_peer_addr), i);
        let handle =
            Node::start_wrapped(config, client, peer, self.router.factory(i), move |log| {
                SlowLog::new(log, disk)
            })
            .await
            .with_context(|| format!("start member {i}"))?;
        self.router.register(handle.id(), i);
        m.id = handle.id();
        m.handle = Some(handle);
        Ok(())
    }

    /// Adds a new member through `MemberAdd` (sent to member `via`) and starts it with
    /// `initial-cluster-state existing`; returns its index.
    pub async fn add_member(&mut self, via: usize) -> anyhow::Result<usize> {
        use store::pb::etcdserverpb::MemberAddRequest;
        use store::pb::etcdserverpb::cluster_client::ClusterClient;
        let (c, p) = (member_port().await?, member_port().await?);
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
            crash: CrashSwitch::default(),
            id: 0,
            clock_offset_ms: Arc::default(),
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

    /// Removes member `i`, which is stopped (e.g. it refused to start), through `MemberRemove`
    /// sent to member `via`; it stays stopped.
    pub async fn remove_stopped_member(&mut self, i: usize, via: usize) -> anyhow::Result<()> {
        use store::pb::etcdserverpb::MemberRemoveRequest;
        use store::pb::etcdserverpb::cluster_client::ClusterClient;
        anyhow::ensure!(self.members[i].id != 0, "member {i} never started");
        let mut cc = ClusterClient::connect(self.endpoints()[via].clone()).await?;
        cc.member_remove(MemberRemoveRequest {
            id: self.members[i].id,
        })
        .await
        .context("member remove")?;
        self.members[i].removed = true;
        Ok(())
    }

    /// Crashes member `i` the next time its storage reaches `point` (within `within`), and
    /// leaves it stopped with its data dir replaced by the image taken at that instant.
    /// `Ok(false)` when the point was not reached in time (nothing happened).
    pub async fn crash_at(
        &mut self,
        i: usize,
        point: CrashPoint,
        within: Duration,
    ) -> anyhow::Result<bool> {
        self.members[i].crash.arm(point);
        self.await_crash(i, within).await
    }

    /// Waits (up to `within`) for member `i` to reach the point armed with
    /// [`CrashSwitch::arm`], then stops it and points its data dir at the crash image.
    /// `Ok(false)` (and disarmed) when it did not get there in time.
    pub async fn await_crash(&mut self, i: usize, within: Duration) -> anyhow::Result<bool> {
        let switch = self.members[i].crash.clone();
        let deadline = tokio::time::Instant::now() + within;
        let image = loop {
            if let Some(image) = switch.lock().image.clone() {
                break image;
            }
            if tokio::time::Instant::now() > deadline {
                switch.disarm();
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.stop_member(i).await;
        self.members[i].config.data_dir = image;
        let mut s = switch.lock();
        s.dead = false;
        s.image = None;
        Ok(true)
    }

    /// F8: crashes member `i` right after a log flush, before openraft learns of it, and
    /// damages the image it restarts from per `tear`, within the bytes that flush wrote (found
    /// by comparing with the data dir as it was just before the flush; whatever file the log
    /// lives in): a crash in the middle of that write. Those entries were never acknowledged. Returns what was done; the member
    /// stays stopped.
    pub async fn crash_and_tear(&mut self, i: usize, tear: Tear) -> anyhow::Result<String> {
        for _ in 0..20 {
            self.members[i]
                .crash
                .arm_capturing(CrashPoint::AfterLogFlush);
            anyhow::ensure!(
                self.await_crash(i, Duration::from_secs(10)).await?,
                "member {i} never flushed its log"
            );
            let before = self.members[i].crash.lock().captured.take();
            let image = self.members[i].config.data_dir.clone();
            let after = read_files(&image)?;
            // The flush's write: the one file that changed (another writer in the same instant
            // would blur which write is the latest; then try again).
            let changed: Vec<&PathBuf> = after
                .keys()
                .filter(|f| before.as_ref().is_some_and(|b| b.get(*f) != after.get(*f)))
                .collect();
            match (&before, changed.as_slice()) {
                (Some(before), [file]) => {
                    let old = before.get(*file).map_or(&[][..], Vec::as_slice);
                    let what = tear_file(old, &image.join(file), tear)?;
                    return Ok(format!("{}: {what}", file.display()));
                }
                // Not exactly one file written: restart from the intact image and try a later
                // flush.
                _ => {
                    self.start_member(i).await?;
                    self.wait_caught_up(i, Duration::from_secs(20)).await?;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::bail!("member {i}: no flush in 20 wrote exactly one file to tear")
    }

    /// Waits until member `i` has applied what the leader had applied when this was called.
    pub async fn wait_caught_up(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let l = self.wait_leader(timeout).await?;
        let applied = |i: usize| {
            self.members[i]
                .handle
                .as_ref()
                .map_or(0, |h| h.metrics().last_applied)
        };
        let target = applied(l);
        let deadline = tokio::time::Instant::now() + timeout;
        while applied(i) < target {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "member {i} stuck at applied {} < {target}",
                applied(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Crashes every running member at once (a power cut of the whole cluster): links are
    /// cut first and in-flight messages drained, so no member acknowledges anything after its
    /// image is taken; then each member is stopped and its data dir replaced by the image,
    /// which keeps only what was synced (see `copy_dir`). Returns the unsynced bytes dropped.
    pub async fn crash_all(&mut self) -> anyhow::Result<u64> {
        self.crash_all_with(|_, _| Ok(())).await
    }

    /// [`FaultCluster::crash_all`], calling `at_crash(i, data_dir)` for each member the
    /// instant it is dead (no storage call gets past a crash point any more) and before its
    /// image is taken: F9's self-check writes unsynced bytes there.
    pub async fn crash_all_with(
        &mut self,
        mut at_crash: impl FnMut(usize, &Path) -> std::io::Result<()>,
    ) -> anyhow::Result<u64> {
        let n = self.members.len();
        self.router.update(|f| {
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        f.cut.insert((a, b));
                    }
                }
            }
        });
        // Longer than any in-flight RPC's remaining time on loopback.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut images = Vec::new();
        let mut dropped = 0;
        for i in 0..n {
            let m = &mut self.members[i];
            if m.handle.is_none() {
                continue;
            }
            m.crash.lock().dead = true;
            m.crash.lock().images += 1;
            let n_img = m.crash.lock().images;
            let image = image_path(&m.config.data_dir, n_img);
            at_crash(i, &m.config.data_dir).with_context(|| format!("crash member {i}"))?;
            dropped += copy_dir(&m.config.data_dir, &image)
                .with_context(|| format!("image member {i}"))?;
            images.push((i, image));
        }
        for (i, image) in images {
            self.stop_member(i).await;
            self.members[i].config.data_dir = image;
            self.members[i].crash.lock().dead = false;
        }
        Ok(dropped)
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
