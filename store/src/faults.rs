//! Fault-injection seams for tests and the chaos tooling. Nothing here is reachable from the
//! command line except through `flotilla store --fault-admin`; by default every hook is off.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Named places in the storage code where a crash hook may kill the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// Log entries are in sled's buffers but not yet flushed.
    BeforeLogFlush,
    /// Log entries are flushed, openraft has not been told yet.
    AfterLogFlush,
    /// A snapshot was built and stored, not yet handed to openraft.
    SnapshotBuild,
    /// A received snapshot is half written into the state machine (install marker set).
    SnapshotInstall,
    /// A compaction is about to be applied (history not yet dropped).
    Compaction,
}

impl CrashPoint {
    /// Every point, in the order a write meets them.
    pub const ALL: [CrashPoint; 5] = [
        CrashPoint::BeforeLogFlush,
        CrashPoint::AfterLogFlush,
        CrashPoint::SnapshotBuild,
        CrashPoint::SnapshotInstall,
        CrashPoint::Compaction,
    ];
}

/// Decides at each [`CrashPoint`] whether the member dies there. Returning `true` makes the
/// storage call fail at once (openraft stops the member, as if the process had died); the
/// hook itself may first capture the data dir, which is then exactly what a `kill -9` at that
/// point would have left behind.
pub type CrashHook = Arc<dyn Fn(CrashPoint) -> bool + Send + Sync>;

/// What happens to one client request a follower forwards to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFate {
    /// Delivered normally.
    Deliver,
    /// Lost on the way: the leader never sees it; the caller times out.
    LoseRequest,
    /// Executed by the leader, the answer lost: the caller times out (unknown outcome).
    LoseResponse,
}

/// Decides the fate of each forwarded request from this member to the leader at the given
/// peer URL (the forwarding channel is separate from the Raft transport, so a partition
/// has to cut both).
pub type ForwardFilter = Arc<dyn Fn(&str) -> LinkFate + Send + Sync>;

/// Test-only behaviour switches of one member.
#[derive(Clone, Default)]
pub struct FaultHooks {
    /// Called at every crash point.
    pub crash: Option<CrashHook>,
    /// Consulted for every request forwarded to the leader.
    pub forward: Option<ForwardFilter>,
    /// PLANTED BUG, for showing that the fault suite's checker catches it: acknowledge log
    /// appends to openraft before (instead of after) flushing them, so acknowledged writes
    /// live only in memory until a later flush.
    pub ack_before_flush: bool,
    /// F15: milliseconds added to the clock this member's lessor measures lease TTLs with
    /// (negative: behind). Changing it is a clock jump; changing it in small steps is a clock
    /// running fast or slow. Only lease expiry reads it: Raft's own timers (elections,
    /// heartbeats, openraft's leader lease) and ReadIndex keep the real Tokio clock.
    pub clock_offset_ms: Option<Arc<AtomicI64>>,
}

/// Whether the Raft log reports its synced lengths (see [`FaultHooks::track_synced_lengths`]).
static TRACK_SYNCED: AtomicBool = AtomicBool::new(false);
/// Raft log segment file → length known to be on stable storage.
static SYNCED: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

/// The Raft log tells that the first `len` bytes of the segment file `path` are durable (none
/// beyond). One relaxed atomic load unless a fault test turned tracking on.
pub(crate) fn synced(path: &Path, len: u64) {
    if TRACK_SYNCED.load(Ordering::Relaxed) {
        SYNCED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), len);
    }
}

impl FaultHooks {
    /// F9 (LazyFS-style power cuts): from now on, in this process, every member's Raft log
    /// reports how far each of its segment files is synced, so that a crash image can drop
    /// what a power cut would lose (written but not yet synced bytes) with
    /// [`FaultHooks::synced_len`]. Process-wide and never turned off (files are told apart by
    /// path).
    pub fn track_synced_lengths() {
        TRACK_SYNCED.store(true, Ordering::Relaxed);
    }

    /// How many leading bytes of the Raft log segment file `path` were synced when last
    /// reported (`None`: no report since tracking started, e.g. the file was only opened, so
    /// all of it is as durable as it was found). Bytes past this length were written after the
    /// last sync; a power cut may lose them.
    pub fn synced_len(path: &Path) -> Option<u64> {
        SYNCED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .copied()
    }

    /// Whether the member should die at `point`.
    pub(crate) fn crash_at(&self, point: CrashPoint) -> bool {
        self.crash.as_ref().is_some_and(|h| h(point))
    }

    /// Fate of a request forwarded to `peer_url`.
    pub(crate) fn forward_fate(&self, peer_url: &str) -> LinkFate {
        self.forward
            .as_ref()
            .map_or(LinkFate::Deliver, |f| f(peer_url))
    }
}

impl fmt::Debug for FaultHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHooks")
            .field("crash", &self.crash.as_ref().map(|_| "hook"))
            .field("forward", &self.forward.as_ref().map(|_| "filter"))
            .field("ack_before_flush", &self.ack_before_flush)
            .field("clock_offset_ms", &self.clock_offset_ms)
            .finish()
    }
}

/// The storage error a crash hook causes.
#[derive(Debug, thiserror::Error)]
#[error("crash injected at {0:?}")]
pub(crate) struct InjectedCrash(pub(crate) CrashPoint);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Wal;

    fn index_of(p: &[u8]) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(
            p[..8].try_into().map_err(std::io::Error::other)?,
        ))
    }

    #[test]
    fn the_raft_log_reports_what_it_synced() {
        FaultHooks::track_synced_lengths();
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), index_of).expect("open");
        let seg = std::fs::read_dir(dir.path())
            .expect("read dir")
            .next()
            .expect("one segment")
            .expect("entry")
            .path();
        let len = || std::fs::metadata(&seg).expect("meta").len();
        assert_eq!(FaultHooks::synced_len(&seg), None);
        wal.append(1, &1u64.to_le_bytes()).expect("append");
        assert_eq!(FaultHooks::synced_len(&seg), None, "appends stay in memory");
        wal.flush().expect("flush");
        // The file may run on past the records (pre-allocated zeros, which read as the log's
        // end): what counts is the records' length.
        let first = FaultHooks::synced_len(&seg).expect("a flush reports");
        assert!(first > 0 && first <= len());
        wal.append(2, &2u64.to_le_bytes()).expect("append");
        wal.flush().expect("flush");
        let second = FaultHooks::synced_len(&seg).expect("a flush reports");
        assert_eq!(second, 2 * first, "two records of one size");
        // A truncation cuts the file to its records and leaves the report stale (never
        // shorter than the records); the next flush reports the truncated length first.
        wal.truncate(2).expect("truncate");
        assert_eq!(len(), first);
        assert_eq!(FaultHooks::synced_len(&seg), Some(second));
        wal.append(2, &2u64.to_le_bytes()).expect("append");
        wal.flush().expect("flush");
        assert_eq!(FaultHooks::synced_len(&seg), Some(second));
    }
}
