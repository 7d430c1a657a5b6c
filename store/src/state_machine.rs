//! The replicated state machine (openraft storage-v2 `RaftStateMachine`).
//!
//! Memory holds the etcd model ([`Mvcc`]) for reads and watches. What is persisted is the
//! latest snapshot (the whole model, as a file: see `snapshot`), durable before openraft may
//! purge the log it covers; on start the model is rebuilt from it and openraft re-applies the
//! log entries after it. Applying an entry therefore writes nothing to disk. A snapshot is
//! built on a blocking thread in chunks of keys, each under a short read lock, while entries
//! keep being applied (the model keeps the snapshot's state readable: see
//! `Mvcc::hold_compaction`). Data dirs of older layouts (the snapshot as a sled value, or
//! records of every applied entry written with `last_applied`) are still read.
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type its storage traits require"
)]
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use prost::Message;
use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::faults::{CrashPoint, FaultHooks, InjectedCrash};
use crate::mvcc::{ApplyOutput, Mvcc, RevEvents, SnapshotPoint};
use crate::pb::mvccpb::Event;
use crate::snapshot::{self as file, BodyWriter, Stored as StoredSnapshot};
use crate::stats::Stats;
use crate::trash::Trash;
use crate::types::{Member, Reply, Response, TypeConfig, WriteOp, decode};
use crate::wal::Durability;

type StorageResult<T> = Result<T, StorageError<u64>>;

const LAST_APPLIED: &[u8] = b"last_applied";
const MEMBERSHIP: &[u8] = b"membership";
const REVISION: &[u8] = b"revision";
const COMPACT: &[u8] = b"compact_revision";
const CURRENT: &[u8] = b"current";

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}
fn snap_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

/// What readers need, consistent under one lock.
#[derive(Debug, Default)]
pub(crate) struct SmState {
    pub(crate) mvcc: Mvcc,
    pub(crate) last_applied: Option<LogId<u64>>,
    pub(crate) membership: StoredMembership<u64, Member>,
    /// Bumped when an installed snapshot replaces the model (a snapshot build in progress
    /// then stops visiting it).
    epoch: u64,
}

/// State shared with the services: the model and the event feed watchers subscribe to.
#[derive(Debug)]
pub(crate) struct Shared {
    state: RwLock<SmState>,
    /// One message per applied batch; subscribe while holding the read lock so that replay
    /// up to the current revision and the live feed join without gap or overlap. An empty
    /// message means the model was replaced by a snapshot.
    pub(crate) events: broadcast::Sender<Arc<Vec<RevEvents>>>,
    db: sled::Db,
    /// Last log id of the snapshot file; held while the file is replaced.
    on_disk: Mutex<Option<LogId<u64>>>,
    /// Held by a snapshot build (builds share one temporary file).
    building: Mutex<()>,
}

impl Shared {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, SmState> {
        // A poisoned lock means an apply panicked mid-way: the process is going down anyway.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, SmState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
    /// Flushes sled (on shutdown).
    pub(crate) fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "flush on shutdown failed");
        }
    }
    /// Bytes sled uses on disk.
    pub(crate) fn db_size(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// The whole model as a snapshot body, encoded in memory (a backup, see
    /// [`crate::backup`]). Visited like a snapshot build, whose lock it takes: both hold off
    /// compaction while they visit.
    pub(crate) fn backup_body(&self) -> std::io::Result<Vec<u8>> {
        let _building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let (point, epoch) = {
            let mut st = self.write();
            (st.mvcc.hold_compaction(), st.epoch)
        };
        let mut body = BodyWriter::new(&point, 1024 * 1024);
        let visited = self.visit_into(&point, epoch, &mut body);
        let released = self.release_compaction(epoch);
        match visited {
            Ok(true) if released => Ok(body.finish()),
            Ok(_) => Err(std::io::Error::other(
                "the member installed a snapshot from the leader meanwhile; try again",
            )),
            Err(e) => Err(e),
        }
    }

    /// Records every version of the model at `point` into `body`, in chunks under short read
    /// locks (applying goes on between them; a file body is written out between them, outside
    /// the lock). `false` if an installed snapshot replaced the model (`epoch`) meanwhile.
    fn visit_into(
        &self,
        point: &SnapshotPoint,
        epoch: u64,
        body: &mut BodyWriter,
    ) -> std::io::Result<bool> {
        let mut after = None;
        loop {
            {
                let st = self.read();
                if st.epoch != epoch {
                    return Ok(false);
                }
                match st
                    .mvcc
                    .visit_versions(point, after.as_ref(), 256, |k, v| body.record(k, v))
                {
                    Some(k) => after = Some(k),
                    None => return Ok(true),
                }
            }
            body.flush_if_full()?;
        }
    }

    /// Ends a `hold_compaction` taken at `epoch`; `false` if the model was replaced meanwhile
    /// (the new model holds nothing).
    fn release_compaction(&self, epoch: u64) -> bool {
        let mut st = self.write();
        let same = st.epoch == epoch;
        if same {
            st.mvcc.release_compaction();
        }
        same
    }
}

/// The state machine: the snapshot file in the data dir holds the latest snapshot; the sled
/// trees `sm_snapshot` (a snapshot as one value), `sm_records` (`rev|sub` -> event),
/// `sm_leases` and `sm_meta` hold older layouts, read only.
#[derive(Debug, Clone)]
pub struct SledStateMachine {
    shared: Arc<Shared>,
    dir: PathBuf,
    records: sled::Tree,
    leases: sled::Tree,
    meta: sled::Tree,
    snapshot: sled::Tree,
    stats: Arc<Stats>,
    hooks: FaultHooks,
    /// Where replaced snapshot files go (the log store's trash); without one they are freed
    /// at once.
    trash: Option<Trash>,
    /// How far the Raft log is synced: no entry is applied beyond it (the leader reports its
    /// appends to openraft before syncing them; see `SledLogStore::append`).
    log_durability: Option<Arc<Durability>>,
}

impl SledStateMachine {
    /// Frees replaced snapshot files through `trash` (see [`crate::trash`]).
    pub(crate) fn with_trash(mut self, trash: Trash) -> Self {
        self.trash = Some(trash);
        self
    }

    /// Applies entries only once the Raft log has them synced.
    pub(crate) fn with_log_durability(mut self, durability: Arc<Durability>) -> Self {
        self.log_durability = Some(durability);
        self
    }

    /// Shares the member's counters and fault hooks.
    pub(crate) fn with(mut self, stats: Arc<Stats>, hooks: FaultHooks) -> Self {
        // What was loaded on open is durable.
        let loaded = self.shared.read().last_applied.map_or(0, |l| l.index);
        stats.snapshot_durable_at(loaded);
        self.stats = stats;
        self.hooks = hooks;
        self
    }

    fn crash(&self, point: CrashPoint) -> StorageResult<()> {
        if self.hooks.crash_at(point) {
            self.stats.sm_failed();
            return Err(snap_err(InjectedCrash(point)));
        }
        Ok(())
    }

    /// Opens the state machine of the data dir `dir` (sled database `db`) and rebuilds the
    /// in-memory model.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Self, StoreError> {
        let open = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: std::path::PathBuf::from(name),
                source,
            })
        };
        let sm = Self {
            shared: Arc::new(Shared {
                state: RwLock::new(SmState::default()),
                events: broadcast::channel(1024).0,
                db: db.clone(),
                on_disk: Mutex::new(None),
                building: Mutex::new(()),
            }),
            dir: dir.to_path_buf(),
            records: open("sm_records")?,
            leases: open("sm_leases")?,
            meta: open("sm_meta")?,
            snapshot: open("sm_snapshot")?,
            stats: Arc::default(),
            hooks: FaultHooks::default(),
            trash: None,
            log_durability: None,
        };
        let corrupt = |what: &'static str| {
            move |e: &dyn std::fmt::Display| StoreError::Corrupt {
                what,
                detail: e.to_string(),
            }
        };
        file::remove_leftover(dir);
        let in_file = file::read_file(dir).map_err(|e| corrupt("snapshot file")(&e))?;
        *sm.on_disk() = in_file.as_ref().and_then(|(m, _)| m.last_log_id);
        let in_sled = sm
            .load_sled_snapshot()
            .map_err(|e| corrupt("sm_snapshot")(&e))?;
        let snapshot = match (in_file, in_sled) {
            (Some(f), Some(s)) if s.0.last_log_id > f.0.last_log_id => Some(s),
            (Some(f), _) => Some(f),
            (None, s) => s,
        };
        // Data dirs written before snapshots became the only persisted state machine kept
        // every applied entry's records; they are still read when newer than the snapshot.
        let legacy_applied: Option<LogId<u64>> = match sm
            .meta
            .get(LAST_APPLIED)
            .map_err(|e| corrupt("sm_meta")(&e))?
        {
            Some(v) => decode(&v).map_err(|e| corrupt("sm_meta")(&e))?,
            None => None,
        };
        let state = match snapshot {
            Some((meta, data)) if legacy_applied <= meta.last_log_id => {
                state_from_snapshot(&meta, &data).map_err(|e| corrupt("snapshot")(&e))?
            }
            _ if legacy_applied.is_some() => {
                sm.load_legacy().map_err(|e| corrupt("state machine")(&e))?
            }
            _ => SmState::default(),
        };
        *sm.shared.write() = state;
        Ok(sm)
    }

    fn on_disk(&self) -> std::sync::MutexGuard<'_, Option<LogId<u64>>> {
        self.shared
            .on_disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `body` the current snapshot file unless the file already holds a newer one;
    /// dies at `point` (a crash hook) once it is written but before it replaces the old one.
    fn persist(
        &self,
        meta: &SnapshotMeta<u64, Member>,
        body: &[u8],
        point: CrashPoint,
    ) -> StorageResult<()> {
        let mut on_disk = self.on_disk();
        if on_disk.is_some() && *on_disk >= meta.last_log_id {
            return Ok(());
        }
        let written = file::write_file(&self.dir, meta, body, self.trash.as_ref(), || {
            self.hooks.crash_at(point)
        })
        .map_err(snap_err)?;
        if !written {
            self.stats.sm_failed();
            return Err(snap_err(InjectedCrash(point)));
        }
        *on_disk = meta.last_log_id;
        drop(on_disk);
        self.persisted(meta)
    }

    /// Bookkeeping once the snapshot of `meta` is the current file.
    fn persisted(&self, meta: &SnapshotMeta<u64, Member>) -> StorageResult<()> {
        // The older layouts are stale from now on (losing these removals is harmless: open
        // picks the newest state).
        self.meta.remove(LAST_APPLIED).map_err(snap_err)?;
        self.snapshot.remove(CURRENT).map_err(snap_err)?;
        self.stats
            .snapshot_durable_at(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    /// The current snapshot: the file, or a snapshot stored in sled by an older version.
    fn load_current(&self) -> StorageResult<Option<StoredSnapshot>> {
        let in_file = {
            let _on_disk = self.on_disk();
            file::read_file(&self.dir).map_err(sm_read_err)?
        };
        match in_file {
            Some(s) => Ok(Some(s)),
            None => self.load_sled_snapshot(),
        }
    }

    /// Builds and persists a snapshot of the current state (on a blocking thread), streaming
    /// it to the snapshot file (see `snapshot`).
    fn build_blocking(&self) -> StorageResult<Snapshot<TypeConfig>> {
        // Builds share one temporary file.
        let _building = self
            .shared
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (point, epoch, meta) = {
            let mut st = self.shared.write();
            let point = st.mvcc.hold_compaction();
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let snapshot_id = match st.last_applied {
                Some(l) => format!("{}-{}-{nanos}", l.leader_id, l.index),
                None => format!("none-{nanos}"),
            };
            let meta = SnapshotMeta {
                last_log_id: st.last_applied,
                last_membership: st.membership.clone(),
                snapshot_id,
            };
            (point, st.epoch, meta)
        };
        let streamed = self.stream_body(&point, epoch, &meta);
        let released = self.shared.release_compaction(epoch);
        let body = match streamed {
            Ok(Some(body)) if released => body,
            other => {
                file::discard_built(&self.dir);
                other?;
                // An installed snapshot replaced the model meanwhile: it is the newer snapshot.
                return self.current_meta();
            }
        };
        let finished = body.finish_file();
        if let Err(e) = finished {
            file::discard_built(&self.dir);
            return Err(snap_err(e));
        }
        // A crash here leaves the new snapshot under its temporary name (removed on open).
        self.crash(CrashPoint::SnapshotBuild)?;
        {
            let mut on_disk = self.on_disk();
            if on_disk.is_some() && *on_disk >= meta.last_log_id {
                // An install got a newer one on disk meanwhile.
                file::discard_built(&self.dir);
            } else {
                file::commit_built(&self.dir, self.trash.as_ref()).map_err(snap_err)?;
                *on_disk = meta.last_log_id;
            }
        }
        self.persisted(&meta)?;
        self.current_meta()
    }

    /// Streams the model at `point` into a new snapshot file; `None` if an installed snapshot
    /// replaced the model meanwhile.
    fn stream_body(
        &self,
        point: &SnapshotPoint,
        epoch: u64,
        meta: &SnapshotMeta<u64, Member>,
    ) -> StorageResult<Option<BodyWriter>> {
        let mut body = BodyWriter::to_file(&self.dir, meta, point).map_err(snap_err)?;
        let complete = self
            .shared
            .visit_into(point, epoch, &mut body)
            .map_err(snap_err)?;
        Ok(complete.then_some(body))
    }

    /// What a build returns: the current snapshot's meta, with an empty body. openraft 0.9
    /// keeps only the meta of a built snapshot (`core/sm/worker.rs`: `BuildSnapshot(snap.meta)`)
    /// and reads a snapshot to send through `get_current_snapshot`, which reads the file.
    /// Reading the body back here only to be dropped put its tens of MB in resident memory
    /// (allocated on the blocking thread, freed on a Tokio worker; measured: a member at 227
    /// MiB instead of about 150 for over a second after a build of 80 MB).
    fn current_meta(&self) -> StorageResult<Snapshot<TypeConfig>> {
        let meta = {
            let _on_disk = self.on_disk();
            file::read_meta(&self.dir).map_err(sm_read_err)?
        };
        let meta = meta.ok_or_else(|| snap_err(std::io::Error::other("snapshot file missing")))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Reads the per-entry record layout of older data dirs.
    fn load_legacy(&self) -> StorageResult<SmState> {
        let get = |k: &[u8]| self.meta.get(k).map_err(sm_read_err);
        let last_applied: Option<LogId<u64>> = match get(LAST_APPLIED)? {
            Some(v) => decode(&v).map_err(sm_read_err)?,
            None => None,
        };
        let membership: StoredMembership<u64, Member> = match get(MEMBERSHIP)? {
            Some(v) => decode(&v).map_err(sm_read_err)?,
            None => StoredMembership::default(),
        };
        let int = |v: Option<sled::IVec>| -> i64 {
            v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, i64::from_be_bytes)
        };
        let revision = int(get(REVISION)?);
        let compact = int(get(COMPACT)?);
        let mut records = Vec::new();
        for item in self.records.iter() {
            let (k, v) = item.map_err(sm_read_err)?;
            if k.len() != 12 {
                continue;
            }
            let rev = i64::from_be_bytes(k[..8].try_into().map_err(sm_read_err)?);
            let sub = u32::from_be_bytes(k[8..].try_into().map_err(sm_read_err)?);
            records.push((rev, sub, Event::decode(v.as_ref()).map_err(sm_read_err)?));
        }
        let mut leases = Vec::new();
        for item in self.leases.iter() {
            let (k, v) = item.map_err(sm_read_err)?;
            let id = i64::from_be_bytes(k.as_ref().try_into().map_err(sm_read_err)?);
            let ttl = i64::from_be_bytes(v.as_ref().try_into().map_err(sm_read_err)?);
            leases.push((id, ttl));
        }
        Ok(SmState {
            mvcc: Mvcc::from_records(revision, compact, records, leases),
            last_applied,
            membership,
            epoch: 0,
        })
    }

    fn load_sled_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        match self.snapshot.get(CURRENT).map_err(sm_read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(&v).map_err(sm_read_err)?)),
        }
    }
}

/// The model a snapshot body describes.
fn state_from_snapshot(meta: &SnapshotMeta<u64, Member>, data: &[u8]) -> StorageResult<SmState> {
    Ok(SmState {
        mvcc: file::decode_body(data).map_err(snap_err)?,
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        epoch: 0,
    })
}

impl RaftSnapshotBuilder<TypeConfig> for SledStateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Encoding tens of MB must not hold a Tokio worker (nor the model's lock: see
        // `build_blocking`).
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build_blocking())
            .await
            .map_err(|e| snap_err(std::io::Error::other(e.to_string())))?
    }
}

impl RaftStateMachine<TypeConfig> for SledStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, Member>)> {
        let st = self.shared.read();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if let (Some(durability), Some(last)) = (&self.log_durability, entries.last())
            && !self.hooks.ack_before_flush
            && !durability.wait_synced(last.log_id.index).await
        {
            self.stats.sm_failed();
            return Err(StorageIOError::write_logs(AnyError::error(
                "the raft log failed before these entries were synced",
            ))
            .into());
        }
        let start = std::time::Instant::now();
        let mut responses = Vec::new();
        let mut published = Vec::new();
        {
            let mut st = self.shared.write();
            // Subscribers join under the read lock, so none can appear until this is sent.
            let skip_events = self.shared.events.receiver_count() == 0;
            for entry in entries {
                let mut out = ApplyOutput {
                    skip_events,
                    ..ApplyOutput::default()
                };
                let mut resp = Response::default();
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(req) => {
                        if req.ops.iter().any(|op| matches!(op, WriteOp::Compact(_))) {
                            self.crash(CrashPoint::Compaction)?;
                        }
                        for op in &req.ops {
                            let result = st.mvcc.apply(op, &mut out);
                            resp.replies.push(Reply {
                                revision: st.mvcc.revision(),
                                result,
                            });
                        }
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    }
                }
                st.last_applied = Some(entry.log_id);
                published.extend(out.events);
                responses.push(resp);
            }
            self.stats
                .applied_entries
                .fetch_add(responses.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Stats::record(&self.stats.apply_ns, None, start);
            if !published.is_empty() {
                // No receivers is fine: nobody watches.
                let _ = self.shared.events.send(Arc::new(published));
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let res = self.install(meta, snapshot).await;
        if res.is_err() {
            self.stats.sm_failed();
        }
        res
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let this = self.clone();
        let current = tokio::task::spawn_blocking(move || this.load_current())
            .await
            .map_err(|e| snap_err(std::io::Error::other(e.to_string())))??;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl SledStateMachine {
    async fn install(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let this = self.clone();
        let meta2 = meta.clone();
        let state = tokio::task::spawn_blocking(move || {
            let data = snapshot.into_inner();
            let state = state_from_snapshot(&meta2, &data)?;
            // After a crash the member has either its old snapshot and log (and is sent this
            // snapshot again) or this one.
            this.persist(&meta2, &data, CrashPoint::SnapshotInstall)?;
            Ok::<_, StorageError<u64>>(state)
        })
        .await
        .map_err(|e| snap_err(std::io::Error::other(e.to_string())))??;
        let mut st = self.shared.write();
        let epoch = st.epoch + 1;
        *st = state;
        st.epoch = epoch;
        // The model jumped: an empty batch tells watch streams to re-join from history.
        let _ = self.shared.events.send(Arc::new(Vec::new()));
        Ok(())
    }
}
