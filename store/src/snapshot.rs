//! The persisted state machine: the latest snapshot, as one file in the data dir.
//!
//! Not a sled value: a snapshot holds the whole model (tens of MB), and in sled it was copied
//! into sled's cache and flushed through the same log as the Raft entries, so every snapshot
//! stalled the log flushes behind it. A file is written beside (`.tmp`, fsync, rename, fsync
//! of the directory), so a crash leaves the previous snapshot or the new one, whole.
//!
//! A snapshot this member builds is streamed to its own temporary file as the model is visited
//! (synced every `SYNC_EVERY_BYTES`), never held whole in memory: an in-memory body of a few
//! hundred thousand keys was tens of MB of resident memory for the seconds the build took.
//!
//! File: `FILE_MAGIC`, meta length (u32 LE), postcard `SnapshotMeta`, body. The body is also
//! what openraft sends to followers: `BODY_MAGIC`, revision, compact revision (i64 LE), lease
//! count (u32 LE) and `(id, ttl)` pairs (i64 LE), alarm count (u32 LE) and `(member, alarm)`
//! pairs (u64 LE, i32 LE), then one record per version in key order: rev, sub, create
//! revision, version, lease, a tombstone flag, the key and the value (lengths u32 LE). Bodies
//! of the earlier layouts are still read: `BODY_MAGIC_V2` (the same without alarms) and
//! postcard [`LegacyBody`].
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::path::Path;

use openraft::SnapshotMeta;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::mvcc::{Mvcc, SnapshotPoint, Version};
use crate::pb::mvccpb::Event;
use crate::trash::Trash;
use crate::types::{Member, decode, encode};

/// File name of the current snapshot in the data dir.
const FILE: &str = "flotilla-snapshot";
/// Where a received snapshot is written before it replaces the current one.
const TMP: &str = "flotilla-snapshot.tmp";
/// Where a snapshot being built is streamed (not `TMP`: an install may write that meanwhile).
const BUILD_TMP: &str = "flotilla-snapshot.build.tmp";
const FILE_MAGIC: &[u8; 8] = b"FLSNAPF1";
/// A snapshot file is synced after every this many bytes of body.
const SYNC_EVERY_BYTES: usize = 1024 * 1024;
/// Never the start of a legacy body (a postcard varint of that length would need a revision
/// above 2^56).
const BODY_MAGIC: &[u8; 8] = b"\xFF\xFFflsnp3";
/// The layout before alarms were replicated state.
const BODY_MAGIC_V2: &[u8; 8] = b"\xFF\xFFflsnp2";

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {what}"))
}

/// Snapshot body of the previous layout.
#[derive(Serialize, Deserialize)]
pub(crate) struct LegacyBody {
    revision: i64,
    compact_revision: i64,
    /// `(rev, sub, prost-encoded mvccpb.Event)`.
    records: Vec<(i64, u32, Vec<u8>)>,
    leases: Vec<(i64, i64)>,
}

/// A snapshot as stored: meta and body.
pub(crate) type Stored = (SnapshotMeta<u64, Member>, Vec<u8>);

/// Encodes a body record by record (the model is visited in chunks, see `Mvcc::visit_versions`),
/// either into memory or streamed to the build's temporary file.
pub(crate) struct BodyWriter {
    /// Encoded bytes not yet written to `file` (the whole body when there is no file).
    buf: Vec<u8>,
    /// The temporary file of a build ([`BodyWriter::to_file`]).
    file: Option<File>,
}

impl BodyWriter {
    /// Starts an in-memory body for the state at `point`; `capacity` is a size estimate.
    pub(crate) fn new(point: &SnapshotPoint, capacity: usize) -> Self {
        let mut w = Self {
            buf: Vec::with_capacity(capacity),
            file: None,
        };
        w.header(point);
        w
    }

    /// Starts a snapshot file of `dir` (under a temporary name) with `meta` and a body for the
    /// state at `point`; see [`BodyWriter::flush_if_full`] and [`BodyWriter::finish_file`].
    pub(crate) fn to_file(
        dir: &Path,
        meta: &SnapshotMeta<u64, Member>,
        point: &SnapshotPoint,
    ) -> io::Result<Self> {
        let meta = encode(meta).map_err(invalid)?;
        let file = File::create(dir.join(BUILD_TMP))?;
        let mut w = Self {
            buf: Vec::with_capacity(SYNC_EVERY_BYTES + 128 * 1024),
            file: Some(file),
        };
        w.buf.extend_from_slice(FILE_MAGIC);
        w.buf
            .extend_from_slice(&u32::try_from(meta.len()).map_err(invalid)?.to_le_bytes());
        w.buf.extend_from_slice(&meta);
        w.header(point);
        Ok(w)
    }

    fn header(&mut self, point: &SnapshotPoint) {
        let buf = &mut self.buf;
        buf.extend_from_slice(BODY_MAGIC);
        buf.extend_from_slice(&point.revision.to_le_bytes());
        buf.extend_from_slice(&point.compact_revision.to_le_bytes());
        let n = u32::try_from(point.leases.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&n.to_le_bytes());
        for (id, ttl) in point.leases.iter().take(n as usize) {
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&ttl.to_le_bytes());
        }
        let n = u32::try_from(point.alarms.len()).unwrap_or(u32::MAX);
        buf.extend_from_slice(&n.to_le_bytes());
        for (member, alarm) in point.alarms.iter().take(n as usize) {
            buf.extend_from_slice(&member.to_le_bytes());
            buf.extend_from_slice(&alarm.to_le_bytes());
        }
    }

    /// Appends one version of `key`.
    pub(crate) fn record(&mut self, key: &[u8], v: &Version) {
        let b = &mut self.buf;
        b.extend_from_slice(&v.rev.to_le_bytes());
        b.extend_from_slice(&v.sub.to_le_bytes());
        b.extend_from_slice(&v.create_revision.to_le_bytes());
        b.extend_from_slice(&v.version.to_le_bytes());
        b.extend_from_slice(&v.lease.to_le_bytes());
        b.push(u8::from(v.value.is_none()));
        // Keys and values are bounded by the request size limit, far below 4 GiB.
        b.extend_from_slice(&(key.len() as u32).to_le_bytes());
        b.extend_from_slice(key);
        if let Some(value) = &v.value {
            b.extend_from_slice(&(value.len() as u32).to_le_bytes());
            b.extend_from_slice(value);
        }
    }

    /// Writes and syncs the buffered bytes once there are `SYNC_EVERY_BYTES` of them (file
    /// mode; called between chunks, outside the model's lock). Synced as it goes: tens of MB
    /// left dirty for one final fsync became one large journal commit that every Raft log
    /// `fdatasync` on the disk (this member's and the others') then waited behind.
    pub(crate) fn flush_if_full(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file
            && self.buf.len() >= SYNC_EVERY_BYTES
        {
            f.write_all(&self.buf)?;
            f.sync_data()?;
            self.buf.clear();
        }
        Ok(())
    }

    /// The encoded body (in-memory mode).
    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// Completes the file of [`BodyWriter::to_file`]: everything written and synced under its
    /// temporary name. It replaces the current snapshot only through [`commit_built`].
    pub(crate) fn finish_file(mut self) -> io::Result<()> {
        let Some(mut f) = self.file.take() else {
            return Err(invalid("not a file body"));
        };
        f.write_all(&self.buf)?;
        f.sync_all()
    }
}

/// Makes the file [`BodyWriter::finish_file`] completed the current snapshot of `dir`.
pub(crate) fn commit_built(dir: &Path, trash: Option<&Trash>) -> io::Result<()> {
    replace_current(dir, &dir.join(BUILD_TMP), trash)
}

/// Renames `new` over the current snapshot file, durably. The replaced file goes to `trash`
/// (freed gradually) rather than being freed by the rename.
fn replace_current(dir: &Path, new: &Path, trash: Option<&Trash>) -> io::Result<()> {
    let current = dir.join(FILE);
    let kept = match trash {
        Some(t) => t.keep(&current)?,
        None => None,
    };
    std::fs::rename(new, &current)?;
    File::open(dir)?.sync_all()?;
    if let Some(t) = trash {
        t.release(kept);
    }
    Ok(())
}

/// Drops a build's temporary file (the build was superseded).
pub(crate) fn discard_built(dir: &Path) {
    remove(&dir.join(BUILD_TMP));
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn i64(&mut self) -> io::Result<i64> {
        let b = self.take(8)?;
        Ok(i64::from_le_bytes(b.try_into().map_err(invalid)?))
    }
    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(invalid)?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(invalid)?))
    }
    fn i32(&mut self) -> io::Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes(b.try_into().map_err(invalid)?))
    }
}

/// The model a body describes (either layout).
pub(crate) fn decode_body(data: &[u8]) -> io::Result<Mvcc> {
    let (rest, with_alarms) = match data.strip_prefix(BODY_MAGIC) {
        Some(rest) => (Some(rest), true),
        None => (data.strip_prefix(BODY_MAGIC_V2), false),
    };
    let Some(rest) = rest else {
        let body: LegacyBody = decode(data).map_err(invalid)?;
        let mut records = Vec::with_capacity(body.records.len());
        for (rev, sub, ev) in &body.records {
            records.push((*rev, *sub, Event::decode(ev.as_slice()).map_err(invalid)?));
        }
        return Ok(Mvcc::from_records(
            body.revision,
            body.compact_revision,
            records,
            body.leases,
        ));
    };
    let mut r = Reader(rest);
    let revision = r.i64()?;
    let compact_revision = r.i64()?;
    let n = r.u32()?;
    let mut leases = Vec::with_capacity(n as usize);
    for _ in 0..n {
        leases.push((r.i64()?, r.i64()?));
    }
    let mut alarms = Vec::new();
    if with_alarms {
        for _ in 0..r.u32()? {
            alarms.push((r.u64()?, r.i32()?));
        }
    }
    let mut versions = Vec::new();
    while !r.0.is_empty() {
        let rev = r.i64()?;
        let sub = r.u32()?;
        let create_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        let tombstone = r.take(1)?[0] != 0;
        let klen = r.u32()? as usize;
        let key = r.take(klen)?.to_vec();
        let value = if tombstone {
            None
        } else {
            let vlen = r.u32()? as usize;
            Some(Box::<[u8]>::from(r.take(vlen)?))
        };
        versions.push((
            key,
            Version {
                rev,
                sub,
                create_revision,
                version,
                lease,
                value,
            },
        ));
    }
    Ok(Mvcc::from_versions(revision, compact_revision, versions, leases).with_alarms(alarms))
}

/// Writes `meta` and `body` as the current snapshot of `dir`. `crash` runs once the new
/// snapshot is durable under its temporary name (a crash point): `true` stops there and
/// returns `Ok(false)`.
pub(crate) fn write_file(
    dir: &Path,
    meta: &SnapshotMeta<u64, Member>,
    body: &[u8],
    trash: Option<&Trash>,
    crash: impl FnOnce() -> bool,
) -> io::Result<bool> {
    let meta = encode(meta).map_err(invalid)?;
    let tmp = dir.join(TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(FILE_MAGIC)?;
    f.write_all(&u32::try_from(meta.len()).map_err(invalid)?.to_le_bytes())?;
    f.write_all(&meta)?;
    // Synced as it goes: tens of MB left dirty for one final fsync became one large journal
    // commit that every Raft log `fdatasync` on the disk (this member's and the others') then
    // waited behind.
    for chunk in body.chunks(SYNC_EVERY_BYTES) {
        f.write_all(chunk)?;
        f.sync_data()?;
    }
    f.sync_all()?;
    drop(f);
    if crash() {
        return Ok(false);
    }
    replace_current(dir, &tmp, trash)?;
    Ok(true)
}

/// The current snapshot of `dir`: meta and body.
pub(crate) fn read_file(dir: &Path) -> io::Result<Option<Stored>> {
    let mut f = match File::open(dir.join(FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut data = Vec::with_capacity(f.metadata().map_or(0, |m| m.len() as usize));
    f.read_to_end(&mut data)?;
    let mut r = Reader(&data);
    if r.take(8)? != FILE_MAGIC {
        return Err(invalid("not a snapshot file"));
    }
    let n = r.u32()? as usize;
    let meta = decode(r.take(n)?).map_err(invalid)?;
    // The body stays in the same allocation.
    data.drain(..12 + n);
    Ok(Some((meta, data)))
}

/// The meta of the current snapshot of `dir` (its body is not read).
pub(crate) fn read_meta(dir: &Path) -> io::Result<Option<SnapshotMeta<u64, Member>>> {
    let mut f = match File::open(dir.join(FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut head = [0u8; 12];
    f.read_exact(&mut head)?;
    let mut r = Reader(&head);
    if r.take(8)? != FILE_MAGIC {
        return Err(invalid("not a snapshot file"));
    }
    let n = r.u32()? as usize;
    let mut meta = vec![0u8; n];
    f.read_exact(&mut meta)?;
    Ok(Some(decode(&meta).map_err(invalid)?))
}

/// Removes snapshots left half written by a crash.
pub(crate) fn remove_leftover(dir: &Path) {
    remove(&dir.join(TMP));
    remove(&dir.join(BUILD_TMP));
}

fn remove(tmp: &Path) {
    if let Err(e) = std::fs::remove_file(tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "could not remove a leftover snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::ApplyOutput;
    use crate::pb::etcdserverpb::PutRequest;
    use crate::types::WriteOp;

    #[test]
    fn body_round_trips_and_file_replaces_atomically() {
        let mut m = Mvcc::default();
        let mut out = ApplyOutput::default();
        for (k, v) in [("a", "1"), ("b", "2"), ("a", "3")] {
            let op = WriteOp::Put(
                PutRequest {
                    key: k.into(),
                    value: v.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            m.apply(&op, &mut out).expect("put");
        }
        m.apply(&WriteOp::LeaseGrant { id: 9, ttl: 30 }, &mut out)
            .expect("grant");
        let nospace = WriteOp::Alarm {
            activate: true,
            member: 7,
            alarm: crate::pb::etcdserverpb::AlarmType::Nospace as i32,
        };
        m.apply(&nospace, &mut out).expect("alarm");
        let point = m.hold_compaction();
        let mut w = BodyWriter::new(&point, 0);
        let mut after = None;
        while let Some(k) = m.visit_versions(&point, after.as_ref(), 1, |k, v| w.record(k, v)) {
            after = Some(k);
        }
        m.release_compaction();
        let body = w.finish();
        let back = decode_body(&body).expect("decode");
        assert_eq!(back.revision(), m.revision());
        assert_eq!(back.hash_kv(0), m.hash_kv(0));
        assert_eq!(back.leases().collect::<Vec<_>>(), vec![(9, 30)]);
        assert_eq!(
            back.alarms().collect::<Vec<_>>(),
            vec![(7, crate::pb::etcdserverpb::AlarmType::Nospace as i32)]
        );
        assert!(back.nospace());
        assert!(decode_body(&body[..body.len() - 1]).is_err());
        // A body of the layout before alarms (no alarm section) still reads, with none.
        let alarms_at = BODY_MAGIC.len() + 8 + 8 + 4 + 16;
        let mut v2 = BODY_MAGIC_V2.to_vec();
        v2.extend_from_slice(&body[BODY_MAGIC.len()..alarms_at]);
        v2.extend_from_slice(&body[alarms_at + 4 + 12..]);
        let old = decode_body(&v2).expect("decode the earlier layout");
        assert_eq!(old.hash_kv(0), m.hash_kv(0));
        assert_eq!(old.alarms().count(), 0);

        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read_file(dir.path()).expect("read").is_none());
        let meta = SnapshotMeta::default();
        assert!(!write_file(dir.path(), &meta, &body, None, || true).expect("write"));
        assert!(
            read_file(dir.path()).expect("read").is_none(),
            "crash before rename"
        );
        remove_leftover(dir.path());
        assert!(write_file(dir.path(), &meta, &body, None, || false).expect("write"));
        let (m2, b2) = read_file(dir.path()).expect("read").expect("present");
        assert_eq!(m2, meta);
        assert_eq!(b2, body);
    }

    #[test]
    fn streamed_build_matches_in_memory_body_and_commits_atomically() {
        let mut m = Mvcc::default();
        let mut out = ApplyOutput::default();
        // Enough bytes for several synced chunks.
        for i in 0..6000 {
            let op = WriteOp::Put(
                PutRequest {
                    key: format!("k{i:06}").into(),
                    value: vec![b'v'; 300],
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            m.apply(&op, &mut out).expect("put");
        }
        let point = m.hold_compaction();
        let mut mem = BodyWriter::new(&point, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = SnapshotMeta {
            snapshot_id: "streamed".into(),
            ..SnapshotMeta::default()
        };
        let mut file = BodyWriter::to_file(dir.path(), &meta, &point).expect("create");
        let mut after = None;
        while let Some(k) = m.visit_versions(&point, after.as_ref(), 256, |k, v| {
            mem.record(k, v);
            file.record(k, v);
        }) {
            after = Some(k);
            file.flush_if_full().expect("flush");
            assert!(
                file.buf.len() < 2 * SYNC_EVERY_BYTES,
                "the body is not held whole"
            );
        }
        m.release_compaction();
        let body = mem.finish();
        assert!(body.len() > 2 * SYNC_EVERY_BYTES);
        file.finish_file().expect("finish");
        assert!(
            read_file(dir.path()).expect("read").is_none(),
            "not current before commit"
        );
        commit_built(dir.path(), None).expect("commit");
        let (m2, b2) = read_file(dir.path()).expect("read").expect("present");
        assert_eq!(m2, meta);
        assert_eq!(read_meta(dir.path()).expect("meta"), Some(meta.clone()));
        assert!(b2 == body, "streamed body differs from the in-memory one");
        assert_eq!(decode_body(&b2).expect("decode").hash_kv(0), m.hash_kv(0));

        // A superseded build leaves nothing behind.
        let w = BodyWriter::to_file(dir.path(), &meta, &point).expect("create");
        w.finish_file().expect("finish");
        discard_built(dir.path());
        assert!(!dir.path().join(BUILD_TMP).exists());
    }
}
