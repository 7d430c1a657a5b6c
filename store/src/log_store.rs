//! The Raft log (openraft storage-v2 `RaftLogStorage`): entries in the [`Wal`] (segment files
//! under `raftlog/` in the data dir), vote, commit index and purge point in sled.
//!
//! Durability: `append` syncs a follower's entries before it reports the write complete to
//! openraft; the leader's it reports at once and syncs in the background (see `append`);
//! `save_vote` syncs the log and sled before returning; the purge point is durable before any
//! entry file is deleted.
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type its storage traits require"
)]
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::faults::{CrashPoint, FaultHooks, InjectedCrash};
use crate::stats::Stats;
use crate::trash::Trash;
use crate::types::{TypeConfig, decode, encode, entry_log_id};
use crate::wal::{Durability, Wal};

type StorageResult<T> = Result<T, StorageError<u64>>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
/// Written by older versions of the state machine (entries up to here were committed); still
/// read so their data dirs re-apply as far as they did.
const APPLIED_UPTO: &[u8] = b"applied_upto";

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

/// The Raft log: entries in the write-ahead log (`wal`), Raft metadata in the sled tree `raft_meta`. (The sled
/// tree `raft_log`, big-endian index keys, held the entries in older data dirs; they are moved
/// into the log on open.)
#[derive(Clone, Debug)]
pub struct SledLogStore {
    db: sled::Db,
    wal: Arc<Wal>,
    meta: sled::Tree,
    stats: Arc<Stats>,
    hooks: FaultHooks,
    /// Purge only what the durable snapshot covers (set when running with a state machine).
    gate_purge: bool,
    trash: Trash,
    /// This member's Raft id (0 until known: never the leader's log).
    member: u64,
    /// The saved vote is this member's own, committed: appends are the leader's. Only the
    /// instance openraft owns saves votes and appends, so this needs no sharing.
    leading: bool,
    /// A background sync is due to start.
    sync_scheduled: Arc<AtomicBool>,
}

fn io_err(e: std::io::Error) -> sled::Error {
    sled::Error::Io(e)
}

impl SledLogStore {
    /// Opens the log of the data dir `dir`, whose sled database is `db`.
    pub fn new(db: &sled::Db, dir: &Path) -> Result<Self, sled::Error> {
        let index_of = |payload: &[u8]| -> std::io::Result<u64> {
            Ok(entry_log_id(payload).map_err(std::io::Error::other)?.index)
        };
        let trash = Trash::open(dir).map_err(io_err)?;
        let wal = Wal::open(&dir.join("raftlog"), index_of)
            .map_err(io_err)?
            .with_trash(trash.clone());
        let store = Self {
            trash,
            db: db.clone(),
            wal: Arc::new(wal),
            meta: db.open_tree("raft_meta")?,
            stats: Arc::default(),
            hooks: FaultHooks::default(),
            gate_purge: false,
            member: 0,
            leading: false,
            sync_scheduled: Arc::default(),
        };
        store.import_legacy_log()?;
        let purged: Option<LogId<u64>> = match store.meta.get(LAST_PURGED)? {
            Some(v) => Some(decode(&v).map_err(|e| io_err(std::io::Error::other(e)))?),
            None => None,
        };
        if let Some(p) = purged {
            store.wal.purge(p.index).map_err(io_err)?;
        }
        Ok(store)
    }

    /// Moves entries an older version kept in the sled tree `raft_log` into the log.
    fn import_legacy_log(&self) -> Result<(), sled::Error> {
        let legacy = self.db.open_tree("raft_log")?;
        if legacy.is_empty() {
            return Ok(());
        }
        // A crash during an earlier import left a partial copy: start over.
        if let Some((first, _)) = self.wal.bounds() {
            self.wal.truncate(first).map_err(io_err)?;
        }
        for item in legacy.iter() {
            let (k, v) = item?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io_err(std::io::Error::other("bad legacy log key")))?,
            );
            self.wal.append(idx, &v).map_err(io_err)?;
        }
        self.wal.flush().map_err(io_err)?;
        legacy.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// The data dir's trash, for the state machine's replaced snapshots.
    pub(crate) fn trash(&self) -> Trash {
        self.trash.clone()
    }

    /// Shares the member's counters and fault hooks.
    pub(crate) fn with(mut self, stats: Arc<Stats>, hooks: FaultHooks) -> Self {
        self.stats = stats;
        self.hooks = hooks;
        self.gate_purge = true;
        self
    }

    /// Runs a blocking log operation off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Wal) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || f(&wal))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("log task: {e}"))))
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

    /// Writes and syncs the appended entries (blocking), through the crash points. A failure
    /// marks the log failed: nothing appended later may become durable out of order.
    fn sync_log(&self) -> StorageResult<()> {
        let res = self.sync_log_inner();
        if res.is_err() {
            self.wal.durability().fail();
        }
        res
    }

    fn sync_log_inner(&self) -> StorageResult<()> {
        self.crash(CrashPoint::BeforeLogFlush)?;
        let start = Instant::now();
        let res = self.wal.flush();
        self.stats
            .h_log_sync
            .observe("log sync", start.elapsed(), self.stats.slow);
        self.stats.log_flushes.fetch_add(1, Ordering::Relaxed);
        Stats::record(
            &self.stats.log_flush_ns,
            Some(&self.stats.log_flush_max_ns),
            start,
        );
        res.map_err(write_err)?;
        self.crash(CrashPoint::AfterLogFlush)
    }

    /// Has a blocking-pool thread sync what was appended, unless one is already due to start
    /// (it will find these entries too): one sync covers every append made before it starts.
    fn sync_in_background(&self) {
        if self.sync_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.sync_scheduled.store(false, Ordering::SeqCst);
            if let Err(e) = this.sync_log() {
                tracing::error!(error = %e, "raft log sync failed; this member stops");
            }
        });
    }

    /// Tells the log which member it belongs to, so that it knows when it is the leader's.
    pub(crate) fn for_member(mut self, id: u64) -> StorageResult<Self> {
        self.member = id;
        let vote = self.get_meta::<Vote<u64>>(VOTE)?;
        self.note_vote(vote.as_ref());
        Ok(self)
    }

    fn note_vote(&mut self, vote: Option<&Vote<u64>>) {
        let me = self.member;
        self.leading = vote
            .is_some_and(|v| me != 0 && v.is_committed() && v.leader_id().voted_for() == Some(me));
    }

    /// The leader's commit as followers may learn it: no further than this log is synced
    /// (`None` when that point's entry cannot be read; followers then keep what they have).
    pub(crate) fn durable_commit(&self, commit: Option<LogId<u64>>) -> Option<LogId<u64>> {
        let commit = commit?;
        let synced = self.wal.durability().synced();
        if commit.index <= synced {
            return Some(commit);
        }
        let bytes = self.wal.read(synced).ok().flatten()?;
        entry_log_id(&bytes).ok()
    }

    /// How far this log is synced.
    pub(crate) fn durability(&self) -> Arc<Durability> {
        self.wal.durability()
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let Some((first, last)) = self.wal.bounds() else {
            return Ok(Vec::new());
        };
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first);
        let mut out = Vec::new();
        for idx in self.wal.indexes(start, last) {
            if !range.contains(&idx) {
                break;
            }
            let Some(bytes) = self.wal.read(idx).map_err(read_err)? else {
                break;
            };
            out.push(decode(&bytes).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(LAST_PURGED)?;
        let last = match self.wal.bounds() {
            None => None,
            Some((_, last)) => match self.wal.read(last).map_err(read_err)? {
                None => None,
                Some(v) => Some(entry_log_id(&v).map_err(read_err)?),
            },
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.max(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.put_meta(VOTE, vote)?;
        self.note_vote(Some(vote));
        // Entries before the vote, as a flush of one sled database covered both (only the
        // planted bug leaves any unflushed).
        self.blocking(|w| w.flush()).await.map_err(write_err)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        // Made durable by the next explicit sled flush (vote, purge, shutdown), not per commit:
        // losing it only means re-applying less on restart (up to the snapshot), and a member
        // learns the commit index again from the leader (or, restored as leader, from its
        // followers' acknowledgements).
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        let committed = self.get_meta::<Option<LogId<u64>>>(COMMITTED)?.flatten();
        let applied = self.get_meta::<Option<LogId<u64>>>(APPLIED_UPTO)?.flatten();
        let committed = committed.max(applied);
        // Never past the log: the two live in different files, and an entry is flushed before
        // it can be committed, but only the planted bug's unflushed entries could be missing.
        let state = self.get_log_state().await?;
        Ok(match (committed, state.last_log_id) {
            (Some(c), Some(last)) if c.index > last.index => Some(last),
            (Some(_), None) => None,
            (c, _) => c,
        })
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        if self.wal.durability().has_failed() {
            return Err(write_err(std::io::Error::other(
                "an earlier sync of the raft log failed",
            )));
        }
        let mut changes_membership = false;
        for entry in entries {
            changes_membership |= matches!(entry.payload, EntryPayload::Membership(_));
            let bytes = encode(&entry).map_err(write_err)?;
            self.wal
                .append(entry.log_id.index, &bytes)
                .map_err(write_err)?;
        }
        if self.hooks.ack_before_flush {
            // The planted bug: openraft counts this entry as durable while it is only in memory.
            callback.log_io_completed(Ok(()));
            return self.crash(CrashPoint::BeforeLogFlush);
        }
        if self.leading && !changes_membership && !self.wal.segment_full() {
            // The leader tells openraft at once and syncs in the background, so replication
            // to the followers overlaps its own sync (openraft 0.9 replicates only once this
            // returns). Safe because nothing counts on the leader's copy before it is synced:
            // the state machine applies no entry past the synced index, and followers learn
            // of no commit past it (`crate::commit_gate`), so whatever a client or a follower
            // sees as committed is synced on a majority. A membership change takes the
            // synchronous path: openraft acts on its commit (the next step of a joint change)
            // without going through either gate. So does an append that fills the segment,
            // which starts the next one only when nothing is left unwritten.
            callback.log_io_completed(Ok(()));
            self.sync_in_background();
            return Ok(());
        }
        // Synced on this runtime thread, not the blocking pool. openraft 0.9's core awaits
        // this flush before it does anything else, so nothing of the core's waits longer; the
        // hand-off to a pool thread and back cost two thread switches per entry on every
        // member (measured: +10-20 % puts/s at 16 clients, sequential put p50 -0.2 ms). The
        // runtime's other worker keeps serving the rest meanwhile.
        match self.sync_log() {
            Ok(()) => {
                // Durable before openraft may count this entry towards a quorum.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let index = log_id.index;
        self.blocking(move |w| w.truncate(index))
            .await
            .map_err(write_err)
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
        // The purge point is durable before entry files go: a crash in between leaves extra
        // entries, never a hole. (Unflushed entries, which only the planted bug leaves, are
        // flushed too, as a flush of the one sled database holding everything used to.)
        self.put_meta(LAST_PURGED, &log_id)?;
        self.blocking(|w| w.flush()).await.map_err(write_err)?;
        self.flush().await?;
        let index = log_id.index;
        self.blocking(move |w| w.purge(index))
            .await
            .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    #[tokio::test]
    async fn reopens_after_a_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
        {
            let db = crate::node::open_db(&dir.path().join("db"))
                .await
                .expect("sled");
            let store = SledLogStore::new(&db, dir.path()).expect("open");
            for i in 1..=5 {
                let e: Entry<TypeConfig> = Entry {
                    log_id: log_id(i),
                    payload: EntryPayload::Blank,
                };
                store
                    .wal
                    .append(i, &encode(&e).expect("encode"))
                    .expect("append");
            }
            store.wal.flush().expect("flush");
            store
                .put_meta(LAST_PURGED, &log_id(3))
                .expect("purge point");
            store.wal.purge(3).expect("purge");
            db.flush().expect("flush");
        }
        // Opened as a member opens it: sled may hold the previous handle's lock for a moment
        // after the drop (its background threads), which `open_db` waits out.
        let db = crate::node::open_db(&dir.path().join("db"))
            .await
            .expect("sled");
        let mut store = SledLogStore::new(&db, dir.path()).expect("reopen");
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(3)));
        assert_eq!(state.last_log_id, Some(log_id(5)));
        let entries = store.try_get_log_entries(4..=5).await.expect("read");
        assert_eq!(entries.len(), 2);
    }
}
