//! Raft log and vote in sled (openraft storage-v2 `RaftLogStorage`).
//!
//! Durability: `append` flushes sled before it reports the write complete to openraft, and
//! `save_vote` flushes before returning; a flush covers every tree of the database.
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type its storage traits require"
)]
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use std::sync::Arc;
use std::time::Instant;

use crate::faults::{CrashPoint, FaultHooks, InjectedCrash};
use crate::stats::Stats;
use crate::types::{TypeConfig, decode, encode};

type StorageResult<T> = Result<T, StorageError<u64>>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
/// Written (and flushed) by the state machine before it makes entries visible: entries up to
/// here are committed, so a restart re-applies at least everything readers saw.
pub(crate) const APPLIED_UPTO: &[u8] = b"applied_upto";

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// `Tree::flush`, run on Tokio's blocking pool. Not `flush_async`: that runs the blocking flush
/// on sled 0.34's process-wide IO pool (7 threads, grown only when more than 7 tasks queue up),
/// and the flush itself waits for buffer writes queued on that same pool, so 7 flushes in flight
/// at once (easily reached with several members, or one member's log and apply flushes under
/// load) took every pool thread and waited forever for writes no thread was left to run.
pub(crate) async fn flush_tree(tree: &sled::Tree) -> sled::Result<usize> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .unwrap_or_else(|e| Err(sled::Error::ReportableBug(format!("flush task: {e}"))))
}

/// The Raft log (`raft_log` tree, big-endian index keys) and Raft metadata (`raft_meta`).
#[derive(Clone, Debug)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    stats: Arc<Stats>,
    hooks: FaultHooks,
    /// Purge only what the durable snapshot covers (set when running with a state machine).
    gate_purge: bool,
}

impl SledLogStore {
    /// Opens the log trees of `db`.
    pub fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            stats: Arc::default(),
            hooks: FaultHooks::default(),
            gate_purge: false,
        })
    }

    /// Shares the member's counters and fault hooks.
    pub(crate) fn with(mut self, stats: Arc<Stats>, hooks: FaultHooks) -> Self {
        self.stats = stats;
        self.hooks = hooks;
        self.gate_purge = true;
        self
    }

    fn crash(&self, point: CrashPoint) -> StorageResult<()> {
        if self.hooks.crash_at(point) {
            return Err(write_err(InjectedCrash(point)));
        }
        Ok(())
    }

    fn get_meta<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &[u8],
    ) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => decode(&v).map(Some).map_err(read_err),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> StorageResult<()> {
        let bytes = encode(v).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn flush(&self) -> StorageResult<()> {
        flush_tree(&self.db).await.map_err(write_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                StorageError::from(StorageIOError::read_logs(AnyError::error("bad log key")))
            })?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(LAST_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            None => None,
            Some((_, v)) => Some(decode::<Entry<TypeConfig>>(&v).map_err(read_err)?.log_id),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.put_meta(VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        // Flushed with the next log append; losing it only means re-applying less on restart.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        let committed = self.get_meta::<Option<LogId<u64>>>(COMMITTED)?.flatten();
        let applied = self.get_meta::<Option<LogId<u64>>>(APPLIED_UPTO)?.flatten();
        Ok(committed.max(applied))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Plain inserts, not a `Batch`: sled writes and syncs its log buffers for every atomic
        // batch, and the flush below makes all of them durable anyway. A crash before the
        // flush leaves a prefix of these entries (sled recovers its log in order): no holes.
        for entry in entries {
            let bytes = encode(&entry).map_err(write_err)?;
            self.log
                .insert(entry.log_id.index.to_be_bytes(), bytes)
                .map_err(write_err)?;
        }
        if self.hooks.ack_before_flush {
            // The planted bug: openraft counts this entry as durable while it is only in memory.
            callback.log_io_completed(Ok(()));
            return self.crash(CrashPoint::BeforeLogFlush);
        }
        self.crash(CrashPoint::BeforeLogFlush)?;
        // Durable before openraft may count this entry towards a quorum.
        let start = Instant::now();
        let res = flush_tree(&self.db).await;
        self.stats
            .log_flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Stats::record(
            &self.stats.log_flush_ns,
            Some(&self.stats.log_flush_max_ns),
            start,
        );
        if res.is_ok() {
            self.crash(CrashPoint::AfterLogFlush)?;
        }
        match res {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = item.map_err(write_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        // openraft 0.9 purges a follower's log while its state machine worker may still be
        // installing the snapshot that covers it; a crash in between would leave a purged log
        // and an older snapshot (a hole openraft refuses to start with). Wait for the snapshot.
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.gate_purge
            && self
                .stats
                .snapshot_durable
                .load(std::sync::atomic::Ordering::SeqCst)
                < log_id.index
        {
            if tokio::time::Instant::now() > give_up {
                // Never wedge Raft on this: purge as openraft asked (the pre-gate behaviour).
                tracing::warn!(
                    upto = log_id.index,
                    "snapshot not durable after 5 s; purging the log anyway"
                );
                break;
            }
            if self
                .stats
                .sm_failed
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(write_err(std::io::Error::other(
                    "state machine failed before its snapshot was durable; not purging the log",
                )));
            }
            let changed = self.stats.snapshot_durable_changed.notified();
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), changed).await;
        }
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = item.map_err(write_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}
