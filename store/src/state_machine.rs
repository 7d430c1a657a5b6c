//! The replicated state machine (openraft storage-v2 `RaftStateMachine`).
//!
//! Memory holds the etcd model ([`Mvcc`]) for reads and watches. What is persisted is the
//! latest snapshot (the whole model, in sled, flushed before openraft may purge the log it
//! covers); on start the model is rebuilt from it and openraft re-applies the log entries
//! after it. Applying an entry therefore writes nothing to sled: with sled, every atomic batch
//! or transaction forces an extra write and sync of its log buffers, which made applying cost
//! as much as the log flush itself. Data dirs of the older layout (records of every applied
//! entry, written in one transaction with `last_applied`) are still read.
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type its storage traits require"
)]
use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::faults::{CrashPoint, FaultHooks, InjectedCrash};
use crate::mvcc::{ApplyOutput, Mvcc, RevEvents};
use crate::pb::mvccpb::Event;
use crate::stats::Stats;
use crate::types::{Member, Reply, Response, TypeConfig, WriteOp, decode, encode};

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

/// A persisted snapshot: metadata and body.
type StoredSnapshot = (SnapshotMeta<u64, Member>, Vec<u8>);

/// What readers need, consistent under one lock.
#[derive(Debug, Default)]
pub(crate) struct SmState {
    pub(crate) mvcc: Mvcc,
    pub(crate) last_applied: Option<LogId<u64>>,
    pub(crate) membership: StoredMembership<u64, Member>,
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
}

/// Serialized snapshot body.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    revision: i64,
    compact_revision: i64,
    /// `(rev, sub, prost-encoded mvccpb.Event)`.
    records: Vec<(i64, u32, Vec<u8>)>,
    leases: Vec<(i64, i64)>,
}

/// The state machine: tree `sm_snapshot` holds the latest snapshot; `sm_records`
/// (`rev|sub` -> event), `sm_leases` and `sm_meta` hold the older layout, read only.
#[derive(Debug, Clone)]
pub struct SledStateMachine {
    shared: Arc<Shared>,
    records: sled::Tree,
    leases: sled::Tree,
    meta: sled::Tree,
    snapshot: sled::Tree,
    /// The log store's metadata tree (for `APPLIED_UPTO`).
    raft_meta: sled::Tree,
    stats: Arc<Stats>,
    hooks: FaultHooks,
}

impl SledStateMachine {
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

    /// Opens the state machine trees of `db` and rebuilds the in-memory model.
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
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
            }),
            records: open("sm_records")?,
            leases: open("sm_leases")?,
            meta: open("sm_meta")?,
            snapshot: open("sm_snapshot")?,
            raft_meta: open("raft_meta")?,
            stats: Arc::default(),
            hooks: FaultHooks::default(),
        };
        let corrupt = |what: &'static str| {
            move |e: &dyn std::fmt::Display| StoreError::Corrupt {
                what,
                detail: e.to_string(),
            }
        };
        let snapshot = sm
            .load_current_snapshot()
            .map_err(|e| corrupt("sm_snapshot")(&e))?;
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
                state_from_snapshot(&meta, &data).map_err(|e| corrupt("sm_snapshot")(&e))?
            }
            _ if legacy_applied.is_some() => {
                sm.load_legacy().map_err(|e| corrupt("state machine")(&e))?
            }
            _ => SmState::default(),
        };
        *sm.shared.write() = state;
        Ok(sm)
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
        })
    }

    fn load_current_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        match self.snapshot.get(CURRENT).map_err(sm_read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(&v).map_err(sm_read_err)?)),
        }
    }
}

/// The model a snapshot body describes.
fn state_from_snapshot(meta: &SnapshotMeta<u64, Member>, data: &[u8]) -> StorageResult<SmState> {
    let body: SnapshotBody = decode(data).map_err(snap_err)?;
    let mut records = Vec::with_capacity(body.records.len());
    for (rev, sub, ev) in &body.records {
        records.push((*rev, *sub, Event::decode(ev.as_slice()).map_err(snap_err)?));
    }
    Ok(SmState {
        mvcc: Mvcc::from_records(
            body.revision,
            body.compact_revision,
            records,
            body.leases.iter().copied(),
        ),
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
    })
}

impl RaftSnapshotBuilder<TypeConfig> for SledStateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (meta, data) = {
            let st = self.shared.read();
            let body = SnapshotBody {
                revision: st.mvcc.revision(),
                compact_revision: st.mvcc.compact_revision(),
                records: st
                    .mvcc
                    .records()
                    .into_iter()
                    .map(|(r, s, e)| (r, s, e.encode_to_vec()))
                    .collect(),
                leases: st.mvcc.leases().collect(),
            };
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
            (meta, encode(&body).map_err(snap_err)?)
        };
        let stored = encode(&(&meta, &data)).map_err(snap_err)?;
        self.snapshot.insert(CURRENT, stored).map_err(snap_err)?;
        self.crash(CrashPoint::SnapshotBuild)?;
        // The snapshot is the persisted state machine: durable before openraft may purge the
        // log entries it covers. From now on the legacy per-entry records are stale.
        self.meta.remove(LAST_APPLIED).map_err(snap_err)?;
        crate::log_store::flush_tree(&self.snapshot)
            .await
            .map_err(snap_err)?;
        self.stats
            .snapshot_durable_at(meta.last_log_id.map_or(0, |l| l.index));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
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
        let start = std::time::Instant::now();
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            // Durable before anything becomes visible: after a crash, openraft re-applies up to
            // here (see `read_committed`), so no reader sees the revision go backwards (the
            // state machine itself is persisted only by snapshots).
            let upto = encode(&Some(last.log_id)).map_err(snap_err)?;
            self.raft_meta
                .insert(crate::log_store::APPLIED_UPTO, upto)
                .map_err(snap_err)?;
            if !self.hooks.ack_before_flush {
                // (The planted bug flushes nothing on the write path, this included.)
                crate::log_store::flush_tree(&self.raft_meta)
                    .await
                    .map_err(snap_err)?;
            }
        }
        let mut responses = Vec::new();
        let mut published = Vec::new();
        {
            let mut st = self.shared.write();
            for entry in entries {
                let mut out = ApplyOutput::default();
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
        Ok(self.load_current_snapshot()?.map(|(meta, data)| Snapshot {
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
        let data = snapshot.into_inner();
        let meta2 = meta.clone();
        let (state, data) = tokio::task::spawn_blocking(move || {
            state_from_snapshot(&meta2, &data).map(|s| (s, data))
        })
        .await
        .map_err(|e| snap_err(std::io::Error::other(e.to_string())))??;
        let stored = encode(&(meta, &data)).map_err(snap_err)?;
        // One insert: after a crash the member has either its old snapshot and log (and is sent
        // this snapshot again) or this one.
        self.snapshot.insert(CURRENT, stored).map_err(snap_err)?;
        self.crash(CrashPoint::SnapshotInstall)?;
        self.meta.remove(LAST_APPLIED).map_err(snap_err)?;
        crate::log_store::flush_tree(&self.snapshot)
            .await
            .map_err(snap_err)?;
        self.stats
            .snapshot_durable_at(meta.last_log_id.map_or(0, |l| l.index));
        {
            let mut st = self.shared.write();
            *st = state;
            // The model jumped: an empty batch tells watch streams to re-join from history.
            let _ = self.shared.events.send(Arc::new(Vec::new()));
        }
        Ok(())
    }
}
