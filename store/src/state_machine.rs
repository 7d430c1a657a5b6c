//! The replicated state machine in sled (openraft storage-v2 `RaftStateMachine`).
//!
//! Memory holds the etcd model ([`Mvcc`]) for reads and watches; sled holds its records. Each
//! Raft entry is applied in one sled transaction that also writes `last_applied`, so replay after
//! a crash is idempotent. Snapshots are the full model, stored in sled as well.
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
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::broadcast;

use crate::error::StoreError;
use crate::mvcc::{ApplyOutput, Change, Mvcc, RevEvents};
use crate::pb::mvccpb::Event;
use crate::types::{Member, Reply, Response, TypeConfig, decode, encode};

type StorageResult<T> = Result<T, StorageError<u64>>;

const LAST_APPLIED: &[u8] = b"last_applied";
const MEMBERSHIP: &[u8] = b"membership";
const REVISION: &[u8] = b"revision";
const COMPACT: &[u8] = b"compact_revision";
const INSTALLING: &[u8] = b"installing";
const CURRENT: &[u8] = b"current";

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}
fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}
fn snap_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

fn record_key(rev: i64, sub: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&rev.to_be_bytes());
    k[8..].copy_from_slice(&sub.to_be_bytes());
    k
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

/// The state machine: trees `sm_records` (`rev|sub` -> event), `sm_leases`, `sm_meta`,
/// `sm_snapshot`.
#[derive(Debug, Clone)]
pub struct SledStateMachine {
    shared: Arc<Shared>,
    records: sled::Tree,
    leases: sled::Tree,
    meta: sled::Tree,
    snapshot: sled::Tree,
}

impl SledStateMachine {
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
        };
        let corrupt = |what: &'static str| {
            move |e: &dyn std::fmt::Display| StoreError::Corrupt {
                what,
                detail: e.to_string(),
            }
        };
        // Finish a snapshot installation a crash interrupted.
        if sm
            .meta
            .get(INSTALLING)
            .map_err(|e| corrupt("sm_meta")(&e))?
            .is_some()
        {
            let (meta, data) = sm
                .load_current_snapshot()
                .map_err(|e| corrupt("sm_snapshot")(&e))?
                .ok_or_else(|| StoreError::Corrupt {
                    what: "sm_snapshot",
                    detail: "installation marker without snapshot".to_owned(),
                })?;
            sm.write_snapshot_state(&meta, &data)
                .map_err(|e| corrupt("sm_snapshot")(&e))?;
        }
        let state = sm.load().map_err(|e| corrupt("state machine")(&e))?;
        *sm.shared.write() = state;
        Ok(sm)
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn load(&self) -> StorageResult<SmState> {
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

    /// Persists one entry's changes and the new applied position atomically.
    fn persist(&self, st: &SmState, changes: &[Change]) -> StorageResult<()> {
        let mut rec_batch = sled::Batch::default();
        let mut lease_batch = sled::Batch::default();
        for c in changes {
            match c {
                Change::Record { rev, sub, event } => {
                    rec_batch.insert(&record_key(*rev, *sub), event.encode_to_vec())
                }
                Change::RemoveRecord { rev, sub } => rec_batch.remove(&record_key(*rev, *sub)),
                Change::LeasePut { id, ttl } => {
                    lease_batch.insert(&id.to_be_bytes(), &ttl.to_be_bytes())
                }
                Change::LeaseDelete { id } => lease_batch.remove(&id.to_be_bytes()),
            }
        }
        let mut meta_batch = sled::Batch::default();
        meta_batch.insert(
            LAST_APPLIED,
            encode(&st.last_applied).map_err(sm_write_err)?,
        );
        meta_batch.insert(MEMBERSHIP, encode(&st.membership).map_err(sm_write_err)?);
        meta_batch.insert(REVISION, &st.mvcc.revision().to_be_bytes());
        meta_batch.insert(COMPACT, &st.mvcc.compact_revision().to_be_bytes());
        (&self.records, &self.leases, &self.meta)
            .transaction(|(r, l, m)| {
                r.apply_batch(&rec_batch)?;
                l.apply_batch(&lease_batch)?;
                m.apply_batch(&meta_batch)?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => sm_write_err(e),
                TransactionError::Abort(()) => sm_write_err(std::io::Error::other("aborted")),
            })
    }

    fn load_current_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        match self.snapshot.get(CURRENT).map_err(sm_read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(&v).map_err(sm_read_err)?)),
        }
    }

    /// Replaces the persisted model with a snapshot's (the caller sets the `INSTALLING` marker
    /// first, so a crash midway is redone on open).
    fn write_snapshot_state(
        &self,
        meta: &SnapshotMeta<u64, Member>,
        data: &[u8],
    ) -> StorageResult<SmState> {
        let body: SnapshotBody = decode(data).map_err(snap_err)?;
        self.records.clear().map_err(snap_err)?;
        self.leases.clear().map_err(snap_err)?;
        let mut records = Vec::with_capacity(body.records.len());
        let mut batch = sled::Batch::default();
        for (rev, sub, ev) in &body.records {
            batch.insert(&record_key(*rev, *sub), ev.as_slice());
            records.push((*rev, *sub, Event::decode(ev.as_slice()).map_err(snap_err)?));
        }
        self.records.apply_batch(batch).map_err(snap_err)?;
        let mut batch = sled::Batch::default();
        for (id, ttl) in &body.leases {
            batch.insert(&id.to_be_bytes(), &ttl.to_be_bytes());
        }
        self.leases.apply_batch(batch).map_err(snap_err)?;
        let state = SmState {
            mvcc: Mvcc::from_records(
                body.revision,
                body.compact_revision,
                records,
                body.leases.iter().copied(),
            ),
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.persist(&state, &[])?;
        self.meta.remove(INSTALLING).map_err(snap_err)?;
        self.meta.flush().map_err(snap_err)?;
        Ok(state)
    }
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
                self.persist(&st, &out.changes)?;
                published.extend(out.events);
                responses.push(resp);
            }
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
        let data = snapshot.into_inner();
        let stored = encode(&(meta, &data)).map_err(snap_err)?;
        self.snapshot.insert(CURRENT, stored).map_err(snap_err)?;
        self.meta.insert(INSTALLING, &[1u8]).map_err(snap_err)?;
        self.meta.flush_async().await.map_err(snap_err)?;
        let this = self.clone();
        let meta2 = meta.clone();
        let state = tokio::task::spawn_blocking(move || this.write_snapshot_state(&meta2, &data))
            .await
            .map_err(|e| snap_err(std::io::Error::other(e.to_string())))??;
        {
            let mut st = self.shared.write();
            *st = state;
            // The model jumped: an empty batch tells watch streams to re-join from history.
            let _ = self.shared.events.send(Arc::new(Vec::new()));
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.load_current_snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
