//! The Raft log's entries: an append-only, segmented file log (`raftlog/` in the data dir).
//!
//! Not sled: a sled flush hands the write to sled's IO thread pool and waits on a condition
//! variable, and it queues behind sled's own page-table snapshots and segment cleaning, so on a
//! busy machine one flush took tens of milliseconds (seconds at worst) where a plain write and
//! `fdatasync` take well under one; the leader's Raft core waits for that flush on every entry.
//!
//! Records are `[len u32][crc32 u32][payload]` (little endian); a segment file is named after
//! the index of its first entry and rolls over past [`SEGMENT_BYTES`]. Appended records stay in
//! process memory until [`Wal::flush`] writes and syncs them, so a crash (or a fault test's
//! copy of the data dir) loses exactly what was not flushed. On open, a torn or corrupt tail of
//! the last segment is cut off; anything else that does not parse is an error.
//!
//! The last segment grows in steps of [`PREALLOC_BYTES`] of written zeros ahead of its
//! records (a record header of zeros ends the log), so most flushes overwrite allocated blocks
//! and `fdatasync` has no metadata to commit: it does not wait for an ext4 journal commit,
//! which would also carry every other file's pending metadata and ordered data (sled, snapshot
//! files, the other members on the same disk). A finished segment is cut to its records.
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::trash::Trash;

/// A segment rolls over to a new file past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Zeros written ahead of the last segment's records at a time. The flush that writes them
/// also commits the new file length (an ext4 journal commit), and every member does it at the
/// same entry, so its cost lands on one commit of the whole cluster: a 1 MiB step took 3-7 ms
/// alone on this disk, and in `flotilla bench api` it showed as a cluster of 15-20 slow calls
/// (10-15 ms) at the same point of every paced run; a 256 KiB step costs ~1.5 ms, 4 times as
/// often, and the cluster is gone. It is not moved to a background thread: writing zeros into
/// the same file takes the inode lock that the records' writes need.
const PREALLOC_BYTES: u64 = 256 * 1024;
const HEADER: usize = 8;

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("raft log: {what}"))
}

#[derive(Debug)]
struct Segment {
    /// Index of the first entry the file was created for (its name).
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of records written to the file (all of them synced once a flush returns).
    written: u64,
    /// Length of the file: records, then zeros.
    allocated: u64,
}

/// Where an entry's payload is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// Position in `segments`' order, as the segment's `first`.
    seg: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct State {
    segments: Vec<Segment>,
    /// Locations of the entries held, by index (openraft appends them in order; its storage
    /// test suite also leaves gaps).
    index: BTreeMap<u64, Loc>,
    /// Records appended to the last segment, not yet written.
    pending: Vec<u8>,
}

impl State {
    fn last(&self) -> &Segment {
        self.segments
            .last()
            .expect("invariant: the log always has a segment")
    }

    fn segment(&self, first: u64) -> Option<&Segment> {
        self.segments.iter().find(|s| s.first == first)
    }

    fn last_index(&self) -> Option<u64> {
        self.index.last_key_value().map(|(k, _)| *k)
    }
}

/// How far the log is on stable storage. Shared with the state machine, which applies no
/// entry beyond it, and with the transport, which tells followers of no commit beyond it (see
/// `crate::commit_gate`).
#[derive(Debug, Default)]
pub(crate) struct Durability {
    /// Index of the last entry synced (0: none).
    synced: AtomicU64,
    /// A sync failed (or a fault test crashed the member there): nothing more becomes durable.
    failed: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Durability {
    pub(crate) fn synced(&self) -> u64 {
        self.synced.load(Ordering::SeqCst)
    }

    fn advance(&self, index: u64) {
        self.synced.fetch_max(index, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Entries from `index` on were removed.
    fn cut(&self, index: u64) {
        self.synced
            .fetch_min(index.saturating_sub(1), Ordering::SeqCst);
    }

    /// Marks the log failed and wakes every waiter.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Waits until entry `index` is synced; `false` if the log failed first.
    pub(crate) async fn wait_synced(&self, index: u64) -> bool {
        loop {
            // Created before the checks: `notify_waiters` wakes it even if not yet polled.
            let changed = self.changed.notified();
            if self.synced() >= index {
                return true;
            }
            if self.has_failed() {
                return false;
            }
            changed.await;
        }
    }
}

/// The entry log of one member. Appends and truncations come from openraft's core, one at a
/// time; a flush may run beside an append (the leader syncs in the background), and reads may
/// run concurrently with everything.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    state: Mutex<State>,
    /// Held through a whole flush or truncation, so that they never interleave.
    flushing: Mutex<()>,
    durability: Arc<Durability>,
    /// Where deleted segments go (freed gradually); without one they are freed at once.
    trash: Option<Trash>,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_segment(dir: &Path, first: u64) -> io::Result<Segment> {
    let path = segment_path(dir, first);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    sync_dir(dir)?;
    Ok(Segment {
        first,
        path,
        file: Arc::new(file),
        written: 0,
        allocated: 0,
    })
}

impl Wal {
    /// Opens (or creates) the log in `dir`, recovering the entries on disk. Entries are
    /// returned by [`Wal::read`] as the payloads given to [`Wal::append`]; `index_of` tells the
    /// index a payload was appended at.
    pub(crate) fn open(
        dir: &Path,
        index_of: impl Fn(&[u8]) -> io::Result<u64>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".log")
                && let Ok(first) = n.parse::<u64>()
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut st = State {
            segments: Vec::new(),
            index: BTreeMap::new(),
            pending: Vec::new(),
        };
        let n = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let is_last = i + 1 == n;
            let path = segment_path(dir, first);
            let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            let seg = first;
            let mut off = 0usize;
            let end = loop {
                if off == data.len() {
                    break off;
                }
                let torn = |why: &str| -> io::Result<usize> {
                    if is_last {
                        tracing::warn!(path = %path.display(), offset = off, why, "cutting off the raft log's torn tail");
                        Ok(off)
                    } else {
                        Err(invalid(format!("{why} at {}:{off}", path.display())))
                    }
                };
                if data.len() - off < HEADER {
                    break torn("short header")?;
                }
                let len = u32::from_le_bytes(data[off..off + 4].try_into().map_err(invalid)?);
                let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().map_err(invalid)?);
                // A zero-filled tail (a crash after the file grew but before its data landed)
                // reads as a record of length 0 whose checksum, crc32 of nothing, is 0 too;
                // appends never write an empty payload.
                if len == 0 {
                    // The clean end of a preallocated segment: zeros from here on.
                    if data[off..].iter().all(|b| *b == 0) {
                        break off;
                    }
                    break torn("zeroed record header")?;
                }
                let start = off + HEADER;
                let Some(stop) = start.checked_add(len as usize).filter(|s| *s <= data.len())
                else {
                    break torn("short record")?;
                };
                let payload = &data[start..stop];
                if crc32fast::hash(payload) != crc {
                    break torn("checksum mismatch")?;
                }
                let idx = index_of(payload)?;
                let loc = Loc {
                    seg,
                    offset: start as u64,
                    len,
                };
                if let Some(last) = st.last_index()
                    && idx <= last
                {
                    return Err(invalid(format!(
                        "entry {idx} after {last} in {}",
                        path.display()
                    )));
                }
                st.index.insert(idx, loc);
                off = stop;
            };
            // The last segment drops its preallocated zeros too (a flush writes them again);
            // a finished one keeps an all-zero tail (cut by older versions only after the
            // next segment existed), which reads as its end.
            if end < data.len() && is_last {
                file.set_len(end as u64)?;
                file.sync_all()?;
            }
            st.segments.push(Segment {
                first,
                path,
                file: Arc::new(file),
                written: end as u64,
                allocated: if is_last { end } else { data.len() } as u64,
            });
        }
        if st.segments.is_empty() {
            st.segments.push(create_segment(dir, 1)?);
        }
        // What a killed process wrote may still be only in the page cache: sync it before
        // counting it as durable.
        st.last().file.sync_data()?;
        let durability = Arc::new(Durability::default());
        durability.advance(st.last_index().unwrap_or(0));
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(st),
            flushing: Mutex::new(()),
            durability,
            trash: None,
        })
    }

    /// Deletes segments through `trash` (see [`crate::trash`]).
    pub(crate) fn with_trash(mut self, trash: Trash) -> Self {
        self.trash = Some(trash);
        self
    }

    fn delete(&self, path: &Path) -> io::Result<()> {
        match &self.trash {
            Some(t) => t.remove(path),
            None => std::fs::remove_file(path),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_flushing(&self) -> MutexGuard<'_, ()> {
        self.flushing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How far this log is synced.
    pub(crate) fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    /// Whether the last segment is full, so that the next flush should find nothing appended
    /// after what it writes (only then does it start a new segment).
    pub(crate) fn segment_full(&self) -> bool {
        let st = self.lock();
        st.last().written + st.pending.len() as u64 >= SEGMENT_BYTES
    }

    /// `(first, last)` index held, if any.
    pub(crate) fn bounds(&self) -> Option<(u64, u64)> {
        let st = self.lock();
        let first = st.index.first_key_value()?.0;
        Some((*first, st.last_index()?))
    }

    /// Appends the entry at `index` (in memory until [`Wal::flush`]), after every entry held
    /// (to replace entries, truncate them first).
    pub(crate) fn append(&self, index: u64, payload: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(last) = st.last_index()
            && index <= last
        {
            return Err(invalid(format!("append of {index} after {last}")));
        }
        let len = u32::try_from(payload.len()).map_err(invalid)?;
        let last = st.last();
        let (seg, offset) = (
            last.first,
            last.written + (st.pending.len() + HEADER) as u64,
        );
        st.pending.extend_from_slice(&len.to_le_bytes());
        st.pending
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        st.pending.extend_from_slice(payload);
        st.index.insert(index, Loc { seg, offset, len });
        Ok(())
    }

    /// Writes and syncs what was appended (blocking: call it off the async runtime).
    pub(crate) fn flush(&self) -> io::Result<()> {
        let _flushing = self.lock_flushing();
        let (file, at, mut bytes, allocated, upto) = {
            let st = self.lock();
            if st.pending.is_empty() {
                return Ok(());
            }
            let last = st.last();
            // Fault tests (F9): what is written from here on is not durable until the sync.
            crate::faults::synced(&last.path, last.written);
            // A copy: readers keep finding these entries in `pending` meanwhile.
            (
                last.file.clone(),
                last.written,
                st.pending.clone(),
                last.allocated,
                st.last_index().unwrap_or(0),
            )
        };
        let n = bytes.len();
        let end = at + n as u64;
        // Past the zeros: write the next step of them with the records (this one sync then
        // commits the new file length too).
        let grown = (end > allocated).then(|| end.div_ceil(PREALLOC_BYTES) * PREALLOC_BYTES);
        if let Some(grown) = grown {
            bytes.resize((grown - at) as usize, 0);
        }
        file.write_all_at(&bytes, at)?;
        file.sync_data()?;
        self.durability.advance(upto);
        let mut st = self.lock();
        st.pending.drain(..n);
        let next = st.last_index().map_or(1, |l| l + 1);
        let all_written = st.pending.is_empty();
        let last = st
            .segments
            .last_mut()
            .expect("invariant: the log always has a segment");
        last.written += n as u64;
        crate::faults::synced(&last.path, last.written);
        if let Some(grown) = grown {
            last.allocated = last.allocated.max(grown);
        }
        if last.written >= SEGMENT_BYTES && all_written {
            // Finished: cut to its records before the next segment exists, so only the last
            // segment ends in zeros.
            last.file.set_len(last.written)?;
            last.file.sync_all()?;
            last.allocated = last.written;
            let seg = create_segment(&self.dir, next)?;
            st.segments.push(seg);
        }
        Ok(())
    }

    /// The payload of entry `index`, if held.
    pub(crate) fn read(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let st = self.lock();
        let Some(loc) = st.index.get(&index).copied() else {
            return Ok(None);
        };
        let seg = st
            .segment(loc.seg)
            .ok_or_else(|| invalid(format!("segment {} of entry {index} is gone", loc.seg)))?;
        let mut buf = vec![0; loc.len as usize];
        if loc.offset >= seg.written {
            let start = (loc.offset - seg.written) as usize;
            buf.copy_from_slice(&st.pending[start..start + loc.len as usize]);
        } else {
            seg.file.read_exact_at(&mut buf, loc.offset)?;
        }
        Ok(Some(buf))
    }

    /// Indexes held in `[from, to]`.
    pub(crate) fn indexes(&self, from: u64, to: u64) -> Vec<u64> {
        if from > to {
            return Vec::new();
        }
        self.lock()
            .index
            .range(from..=to)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Removes entries from `index` on, durably.
    pub(crate) fn truncate(&self, index: u64) -> io::Result<()> {
        let _flushing = self.lock_flushing();
        let mut st = self.lock();
        self.durability.cut(index);
        let removed = st.index.split_off(&index);
        let Some(cut) = removed.values().next().copied() else {
            return Ok(());
        };
        // Later segments go entirely (unwritten records are the last one's); the one holding
        // `index` is cut at its record.
        while st.segments.len() > 1 && st.last().first > cut.seg {
            let seg = st.segments.pop().expect("invariant: checked above");
            self.delete(&seg.path)?;
            st.pending.clear();
        }
        let at = cut.offset - HEADER as u64;
        let last = st
            .segments
            .last_mut()
            .expect("invariant: the log always has a segment");
        if at < last.written {
            last.file.set_len(at)?;
            last.file.sync_all()?;
            last.written = at;
            last.allocated = at;
            st.pending.clear();
        } else {
            let keep_pending = (at - last.written) as usize;
            st.pending.truncate(keep_pending);
        }
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Forgets entries up to `index` (inclusive) and deletes the segment files holding only
    /// such entries. The caller has made the purge point durable first, so that a crash in
    /// between never shows a hole.
    pub(crate) fn purge(&self, index: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.index = st.index.split_off(&(index + 1));
        let mut removed = false;
        while st.segments.len() > 1 && st.segments[1].first <= index + 1 {
            let seg = st.segments.remove(0);
            self.delete(&seg.path)?;
            removed = true;
        }
        drop(st);
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(p: &[u8]) -> io::Result<u64> {
        Ok(u64::from_le_bytes(p[..8].try_into().map_err(invalid)?))
    }

    fn entry(i: u64) -> Vec<u8> {
        let mut v = i.to_le_bytes().to_vec();
        v.extend(std::iter::repeat_n(b'x', (i % 7) as usize));
        v
    }

    #[test]
    fn appends_truncates_purges_and_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), idx).expect("open");
        assert_eq!(wal.bounds(), None);
        for i in 1..=10 {
            wal.append(i, &entry(i)).expect("append");
        }
        // Readable before the flush, durable only after it.
        assert_eq!(wal.read(3).expect("read"), Some(entry(3)));
        assert_eq!(Wal::open(dir.path(), idx).expect("reopen").bounds(), None);
        wal.flush().expect("flush");
        wal.truncate(8).expect("truncate");
        wal.append(8, &entry(8)).expect("append");
        wal.flush().expect("flush");
        assert!(wal.append(8, &entry(8)).is_err(), "no overwrite");
        wal.purge(4).expect("purge");
        assert_eq!(wal.bounds(), Some((5, 8)));
        assert_eq!(wal.read(4).expect("read"), None);
        drop(wal);

        let wal = Wal::open(dir.path(), idx).expect("reopen");
        // Entries before the purge point are still in the file; the purge point says so.
        assert_eq!(wal.bounds().map(|b| b.1), Some(8));
        assert_eq!(wal.read(8).expect("read"), Some(entry(8)));
        assert_eq!(wal.read(9).expect("read"), None);
        // A purge past the end, then appends from there (a snapshot was installed).
        wal.purge(20).expect("purge");
        wal.append(21, &entry(21)).expect("append");
        wal.flush().expect("flush");
        let records = wal.lock().last().written;
        drop(wal);

        // A torn tail is cut off (the last record loses its end; zeros may follow).
        let path = segment_path(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(records - 3).expect("tear");
        let wal = Wal::open(dir.path(), idx).expect("reopen");
        assert_eq!(wal.bounds(), Some((1, 8)));
        wal.append(9, &entry(9)).expect("append after repair");
        wal.flush().expect("flush");
        drop(wal);

        // So is a zero-filled tail (length 0 and checksum 0 look like a valid empty record).
        let len = std::fs::metadata(&path).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len + 64).expect("grow with zeros");
        let wal = Wal::open(dir.path(), idx).expect("reopen over zeros");
        assert_eq!(wal.bounds(), Some((1, 9)));
        wal.append(10, &entry(10)).expect("append after repair");
        assert_eq!(wal.read(10).expect("read"), Some(entry(10)));
    }

    #[test]
    fn durability_follows_flushes_truncations_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), idx).expect("open");
        let durable = wal.durability();
        for i in 1..=4 {
            wal.append(i, &entry(i)).expect("append");
        }
        assert_eq!(durable.synced(), 0, "appended is not synced");
        wal.flush().expect("flush");
        assert_eq!(durable.synced(), 4);
        wal.append(5, &entry(5)).expect("append");
        assert_eq!(durable.synced(), 4);
        wal.truncate(3).expect("truncate");
        assert_eq!(
            durable.synced(),
            2,
            "a replaced entry is no longer the synced one"
        );
        wal.append(3, &entry(3)).expect("append");
        wal.flush().expect("flush");
        assert_eq!(durable.synced(), 3);
        drop(wal);
        let wal = Wal::open(dir.path(), idx).expect("reopen");
        assert_eq!(
            wal.durability().synced(),
            3,
            "what is found on open is synced"
        );
    }

    #[tokio::test]
    async fn waiting_for_a_sync_ends_with_it_or_with_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Arc::new(Wal::open(dir.path(), idx).expect("open"));
        let durable = wal.durability();
        wal.append(1, &entry(1)).expect("append");
        let waiter = tokio::spawn({
            let durable = durable.clone();
            async move { durable.wait_synced(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tokio::task::spawn_blocking(move || wal.flush())
            .await
            .expect("task")
            .expect("flush");
        assert!(waiter.await.expect("waiter"), "synced");
        let failing = tokio::spawn({
            let durable = durable.clone();
            async move { durable.wait_synced(2).await }
        });
        tokio::task::yield_now().await;
        durable.fail();
        assert!(!failing.await.expect("waiter"), "failed");
    }

    #[test]
    fn preallocated_zeros_end_the_log_and_stray_bytes_after_them_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment_path(dir.path(), 1);
        let wal = Wal::open(dir.path(), idx).expect("open");
        for i in 1..=5 {
            wal.append(i, &entry(i)).expect("append");
        }
        wal.flush().expect("flush");
        let len = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(len, PREALLOC_BYTES, "the segment grew by a step of zeros");
        let written = wal.lock().last().written;
        assert!(written < len);
        for i in 6..=8 {
            wal.append(i, &entry(i)).expect("append");
            wal.flush().expect("flush");
        }
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), len);
        drop(wal);

        // Reopened: the zeros are the end, not a torn tail; appends go on after the records.
        let wal = Wal::open(dir.path(), idx).expect("reopen");
        assert_eq!(wal.bounds(), Some((1, 8)));
        wal.append(9, &entry(9)).expect("append");
        wal.flush().expect("flush");
        let written = wal.lock().last().written;
        drop(wal);

        // Bytes a crash left after a zeroed gap (a later page of an unsynced write) are cut
        // off, so a later crash cannot bring them back after newer records.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(b"stale", written + 4096)
            .expect("stray bytes");
        drop(f);
        let wal = Wal::open(dir.path(), idx).expect("reopen");
        assert_eq!(wal.bounds(), Some((1, 9)));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), written);
        assert_eq!(wal.read(9).expect("read"), Some(entry(9)));
    }
}
