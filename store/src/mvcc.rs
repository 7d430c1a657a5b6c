//! The etcd v3 data model in memory: per-key version history, one revision per write request,
//! compaction, leases and the event history watches replay from.
//!
//! This type is pure (no IO). The state machine persists it only as snapshots
//! ([`Mvcc::visit_versions`] / [`Mvcc::from_versions`]); a snapshot is built while writes go
//! on, so compaction defers dropping versions while one is being built
//! ([`Mvcc::hold_compaction`]).
//!
//! Memory layout (one key costs its bytes once): the index maps each key (an `Arc<[u8]>` shared
//! with the event history and lease key sets) to its versions, each holding only the fields a
//! `KeyValue` needs besides the key; `KeyValue`s are built when read.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use crate::error::EtcdError;
use crate::pb::etcdserverpb::{
    self as pb, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, compare, range_request, request_op, response_op,
};
use crate::pb::mvccpb::{Event, KeyValue, event::EventType};

/// A key, shared by the index, the event history and lease key sets.
pub(crate) type Key = Arc<[u8]>;

/// One version of a key: the value written at `(rev, sub)`, or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    /// Revision of the write (`mod_revision`).
    pub(crate) rev: i64,
    /// Position of the write within its revision.
    pub(crate) sub: u32,
    pub(crate) create_revision: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
    /// `None` = deleted at `rev`.
    pub(crate) value: Option<Box<[u8]>>,
}

impl Version {
    /// The `KeyValue` this version describes (`None` for a tombstone).
    pub(crate) fn kv(&self, key: &[u8]) -> Option<KeyValue> {
        let value = self.value.as_ref()?;
        Some(KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.rev,
            version: self.version,
            value: value.to_vec(),
            lease: self.lease,
        })
    }

    /// The event that wrote this version, without `prev_kv`.
    fn event(&self, key: &[u8]) -> Event {
        match self.kv(key) {
            Some(kv) => Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv: None,
            },
            None => Event {
                r#type: EventType::Delete as i32,
                kv: Some(tombstone(key, self.rev)),
                prev_kv: None,
            },
        }
    }

    fn weight(&self, key: &[u8]) -> u64 {
        let v = self.value.as_ref().map_or(0, |v| v.len());
        (key.len() + v + 48) as u64
    }
}

/// Index of the first version compaction at `compact` keeps: the newest version at or below
/// it survives unless it is a tombstone; older ones go.
fn retained_from(versions: &[Version], compact: i64) -> usize {
    match versions.iter().rposition(|v| v.rev <= compact) {
        None => 0,
        Some(i) if versions[i].value.is_none() => i + 1,
        Some(i) => i,
    }
}

/// A granted lease as replicated (expiry timing is leader-local, see `lessor`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LeaseInfo {
    pub(crate) ttl: i64,
    pub(crate) keys: BTreeSet<Key>,
}

/// Events of one revision (all share it), `prev_kv` always filled when known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RevEvents {
    pub(crate) revision: i64,
    pub(crate) events: Vec<Event>,
}

/// Output of applying ops: the events to publish to watchers.
#[derive(Debug, Default)]
pub(crate) struct ApplyOutput {
    pub(crate) events: Vec<RevEvents>,
    /// Nobody watches: do not build events (they copy every written value).
    pub(crate) skip_events: bool,
}

/// The multi-version key-value model.
#[derive(Debug, Clone)]
pub(crate) struct Mvcc {
    revision: i64,
    compact_revision: i64,
    /// Versions compaction dropped are physically gone up to here (`<= compact_revision`;
    /// lower while a snapshot build holds compaction).
    compacted_upto: i64,
    /// Snapshot builds in progress (see [`Mvcc::hold_compaction`]).
    compaction_holds: u32,
    keys: BTreeMap<Key, Vec<Version>>,
    /// `(rev, sub, key)` of every write at or above `compact_revision`, in order (watch replay).
    history: VecDeque<(i64, u32, Key)>,
    leases: BTreeMap<i64, LeaseInfo>,
    /// Active alarms, `(member id, etcd AlarmType)`: replicated state, as in etcd, so every
    /// member refuses what an alarm forbids, whichever member raised it.
    alarms: BTreeSet<(u64, i32)>,
    /// Approximate logical size in bytes (for the space quota and `Status`).
    size: u64,
}

impl Default for Mvcc {
    fn default() -> Self {
        // etcd starts at revision 1 with no keys; the first write gets revision 2.
        Self {
            revision: 1,
            compact_revision: 0,
            compacted_upto: 0,
            compaction_holds: 0,
            keys: BTreeMap::new(),
            history: VecDeque::new(),
            leases: BTreeMap::new(),
            alarms: BTreeSet::new(),
            size: 0,
        }
    }
}

/// A key range as `BTreeMap::range` bounds.
pub(crate) type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// Key bounds of etcd's `[key, range_end)` convention.
pub(crate) fn bounds<'a>(key: &'a [u8], range_end: &'a [u8]) -> Option<KeyBounds<'a>> {
    if range_end.is_empty() {
        return Some((Bound::Included(key), Bound::Included(key)));
    }
    if range_end == [0] {
        return Some((Bound::Included(key), Bound::Unbounded));
    }
    if range_end <= key {
        return None;
    }
    Some((Bound::Included(key), Bound::Excluded(range_end)))
}

/// Whether `k` lies in `[key, range_end)` (etcd conventions).
pub(crate) fn in_range(k: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return k == key;
    }
    if range_end == [0] {
        return k >= key;
    }
    k >= key && k < range_end
}

fn tombstone(key: &[u8], rev: i64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        mod_revision: rev,
        ..KeyValue::default()
    }
}

/// Write context of one op: every change it makes shares one revision.
struct Writer<'a> {
    rev: i64,
    sub: u32,
    out: &'a mut ApplyOutput,
    events: Vec<Event>,
}

/// What a snapshot captures besides the versions (taken at one applied index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotPoint {
    pub(crate) revision: i64,
    pub(crate) compact_revision: i64,
    pub(crate) leases: Vec<(i64, i64)>,
    pub(crate) alarms: Vec<(u64, i32)>,
}

impl Mvcc {
    /// Current store revision.
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// Revision history was compacted at (0 = never).
    pub(crate) fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Approximate bytes held.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    fn latest(&self, key: &[u8]) -> Option<&Version> {
        self.keys.get(key)?.last().filter(|v| v.value.is_some())
    }

    /// Live keys in a range at the latest revision, with their latest version.
    fn live_range<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
    ) -> Box<dyn Iterator<Item = (&'a Key, &'a Version)> + 'a> {
        match bounds(key, range_end) {
            None => Box::new(std::iter::empty()),
            Some(b) => Box::new(
                self.keys
                    .range::<[u8], _>(b)
                    .filter_map(|(k, vs)| vs.last().filter(|v| v.value.is_some()).map(|v| (k, v))),
            ),
        }
    }

    // ----- reads -----

    /// etcd Range (without header).
    pub(crate) fn range(&self, r: &RangeRequest) -> Result<RangeResponse, EtcdError> {
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        let at = if r.revision <= 0 {
            None
        } else if r.revision > self.revision {
            return Err(EtcdError::FutureRev);
        } else if r.revision < self.compact_revision {
            return Err(EtcdError::Compacted);
        } else {
            Some(r.revision)
        };
        let mut found: Vec<(&Key, &Version)> = Vec::new();
        if let Some(b) = bounds(&r.key, &r.range_end) {
            for (k, versions) in self.keys.range::<[u8], _>(b) {
                let v = match at {
                    None => versions.last(),
                    Some(at) => versions.iter().rev().find(|v| v.rev <= at),
                };
                if let Some(v) = v.filter(|v| v.value.is_some()) {
                    found.push((k, v));
                }
            }
        }
        let count = found.len() as i64;
        found.retain(|(_, v)| {
            (r.min_mod_revision == 0 || v.rev >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || v.rev <= r.max_mod_revision)
                && (r.min_create_revision == 0 || v.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || v.create_revision <= r.max_create_revision)
        });
        sort_found(&mut found, r);
        let mut more = false;
        if r.limit > 0 && found.len() as i64 > r.limit {
            found.truncate(r.limit as usize);
            more = true;
        }
        let kvs = if r.count_only {
            Vec::new()
        } else {
            found
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.to_vec(),
                    create_revision: v.create_revision,
                    mod_revision: v.rev,
                    version: v.version,
                    value: if r.keys_only {
                        Vec::new()
                    } else {
                        v.value.as_deref().unwrap_or_default().to_vec()
                    },
                    lease: v.lease,
                })
                .collect()
        };
        Ok(RangeResponse {
            header: None,
            kvs,
            more,
            count,
        })
    }

    /// Events with revision in `[from, to]` touching `[key, range_end)`, `prev_kv` filled.
    /// The caller checks `from >= compact_revision`.
    pub(crate) fn events_between(
        &self,
        from: i64,
        to: i64,
        key: &[u8],
        range_end: &[u8],
    ) -> Vec<RevEvents> {
        let mut out: Vec<RevEvents> = Vec::new();
        if from > to {
            return out;
        }
        let start = self.history.partition_point(|(rev, _, _)| *rev < from);
        for (rev, _, k) in self.history.range(start..) {
            let rev = *rev;
            if rev > to {
                break;
            }
            if !in_range(k, key, range_end) {
                continue;
            }
            let Some(versions) = self.keys.get(k) else {
                continue;
            };
            let Ok(i) = versions.binary_search_by_key(&rev, |v| v.rev) else {
                continue;
            };
            let mut event = versions[i].event(k);
            // The previous version is gone after a compaction at or above this write.
            if rev > self.compact_revision {
                event.prev_kv = i.checked_sub(1).and_then(|j| versions[j].kv(k));
            }
            match out.last_mut() {
                Some(last) if last.revision == rev => last.events.push(event),
                _ => out.push(RevEvents {
                    revision: rev,
                    events: vec![event],
                }),
            }
        }
        out
    }

    /// Evaluates a Txn without writes (compares and ranges only) against the current state.
    pub(crate) fn read_txn(&self, t: &TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        let succeeded = t.compare.iter().all(|c| self.compare(c));
        let branch = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    Some(response_op::Response::ResponseRange(self.range(r)?))
                }
                Some(request_op::Request::RequestTxn(n)) => {
                    Some(response_op::Response::ResponseTxn(self.read_txn(n)?))
                }
                Some(_) => return Err(EtcdError::Internal("write in a read-only txn".to_owned())),
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(pb::TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    /// Lease TTL as granted, if the lease exists.
    pub(crate) fn lease(&self, id: i64) -> Option<&LeaseInfo> {
        self.leases.get(&id)
    }

    /// Every lease id with its granted TTL.
    pub(crate) fn leases(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl))
    }

    /// Active alarms as `(member id, etcd AlarmType)`.
    pub(crate) fn alarms(&self) -> impl Iterator<Item = (u64, i32)> + '_ {
        self.alarms.iter().copied()
    }

    /// Whether a NOSPACE alarm is active: writes that add data are refused (etcd's capped
    /// applier), deletes, compaction and lease revocation still go through.
    pub(crate) fn nospace(&self) -> bool {
        self.alarms
            .iter()
            .any(|(_, a)| *a == pb::AlarmType::Nospace as i32)
    }

    /// Replaces the alarms (a model rebuilt from a snapshot).
    pub(crate) fn with_alarms(mut self, alarms: impl IntoIterator<Item = (u64, i32)>) -> Self {
        self.alarms = alarms.into_iter().collect();
        self
    }

    fn compare(&self, c: &Compare) -> bool {
        let mut any = false;
        let all = self.live_range(&c.key, &c.range_end).all(|(_, v)| {
            any = true;
            compare_fields(
                c,
                v.create_revision,
                v.rev,
                v.version,
                v.lease,
                v.value.as_deref().unwrap_or_default(),
            )
        });
        if !any {
            // A missing key has every field zero; it has no value to compare.
            if c.target() == compare::CompareTarget::Value {
                return false;
            }
            return compare_fields(c, 0, 0, 0, 0, &[]);
        }
        all
    }

    // ----- writes -----

    /// Applies one replicated op. `Err` leaves the model unchanged.
    pub(crate) fn apply(
        &mut self,
        op: &crate::types::WriteOp,
        out: &mut ApplyOutput,
    ) -> Result<crate::types::OpReply, EtcdError> {
        use crate::types::{OpReply, WriteOp};
        use prost::Message;
        let decode_err = |e: prost::DecodeError| EtcdError::Internal(format!("bad op: {e}"));
        match op {
            WriteOp::Put(b) => {
                if self.nospace() {
                    return Err(EtcdError::NoSpace);
                }
                let r = PutRequest::decode(b.as_slice()).map_err(decode_err)?;
                self.check_put(&r)?;
                let mut w = self.writer(out);
                let resp = self.put(&mut w, r);
                self.finish(w);
                Ok(OpReply::Put(resp.encode_to_vec()))
            }
            WriteOp::DeleteRange(b) => {
                let r = DeleteRangeRequest::decode(b.as_slice()).map_err(decode_err)?;
                if r.key.is_empty() {
                    return Err(EtcdError::EmptyKey);
                }
                let mut w = self.writer(out);
                let resp = self.delete_range(&mut w, &r);
                self.finish(w);
                Ok(OpReply::DeleteRange(resp.encode_to_vec()))
            }
            WriteOp::Txn(b) => {
                let r = TxnRequest::decode(b.as_slice()).map_err(decode_err)?;
                // etcd refuses a transaction that could put anything, whichever branch runs.
                if self.nospace() && (ops_put(&r.success) || ops_put(&r.failure)) {
                    return Err(EtcdError::NoSpace);
                }
                let succeeded = r.compare.iter().all(|c| self.compare(c));
                let branch = if succeeded { r.success } else { r.failure };
                self.check_ops(&branch)?;
                let mut w = self.writer(out);
                let responses = self.exec_ops(&mut w, branch)?;
                self.finish(w);
                Ok(OpReply::Txn(
                    pb::TxnResponse {
                        header: None,
                        succeeded,
                        responses,
                    }
                    .encode_to_vec(),
                ))
            }
            WriteOp::Compact(rev) => {
                self.compact(*rev)?;
                Ok(OpReply::Compact)
            }
            WriteOp::LeaseGrant { id, ttl } => {
                if self.nospace() {
                    return Err(EtcdError::NoSpace);
                }
                if self.leases.contains_key(id) {
                    return Err(EtcdError::LeaseExist);
                }
                self.leases.insert(
                    *id,
                    LeaseInfo {
                        ttl: *ttl,
                        keys: BTreeSet::new(),
                    },
                );
                Ok(OpReply::LeaseGrant)
            }
            WriteOp::LeaseRevoke { id } => {
                let Some(lease) = self.leases.remove(id) else {
                    return Err(EtcdError::LeaseNotFound);
                };
                let mut w = self.writer(out);
                for key in &lease.keys {
                    self.delete_key(&mut w, key);
                }
                self.finish(w);
                Ok(OpReply::LeaseRevoke)
            }
            WriteOp::Alarm {
                activate,
                member,
                alarm,
            } => {
                // etcd answers with the alarms that changed: none for a no-op.
                let changed = if *alarm == pb::AlarmType::None as i32 {
                    false
                } else if *activate {
                    self.alarms.insert((*member, *alarm))
                } else {
                    self.alarms.remove(&(*member, *alarm))
                };
                Ok(OpReply::Alarm(if changed {
                    vec![(*member, *alarm)]
                } else {
                    Vec::new()
                }))
            }
        }
    }

    fn writer<'a>(&self, out: &'a mut ApplyOutput) -> Writer<'a> {
        Writer {
            rev: self.revision + 1,
            sub: 0,
            out,
            events: Vec::new(),
        }
    }

    /// A request that changed anything consumes exactly one revision.
    fn finish(&mut self, w: Writer<'_>) {
        if w.sub > 0 {
            self.revision = w.rev;
            if !w.out.skip_events {
                w.out.events.push(RevEvents {
                    revision: w.rev,
                    events: w.events,
                });
            }
        }
    }

    fn check_put(&self, r: &PutRequest) -> Result<(), EtcdError> {
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
        if r.ignore_value && !r.value.is_empty() {
            return Err(EtcdError::ValueProvided);
        }
        if r.ignore_lease && r.lease != 0 {
            return Err(EtcdError::LeaseProvided);
        }
        let existing = self.latest(&r.key);
        if (r.ignore_value || r.ignore_lease) && existing.is_none() {
            return Err(EtcdError::KeyNotFound);
        }
        if r.lease != 0 && !self.leases.contains_key(&r.lease) {
            return Err(EtcdError::LeaseNotFound);
        }
        Ok(())
    }
    /// Validates the ops of the chosen Txn branch (recursively) before anything is written.
    fn check_ops(&self, ops: &[RequestOp]) -> Result<(), EtcdError> {
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => self.check_put(p)?,
                Some(request_op::Request::RequestRange(r)) => {
                    if r.key.is_empty() {
                        return Err(EtcdError::EmptyKey);
                    }
                    if r.revision > self.revision {
                        return Err(EtcdError::FutureRev);
                    }
                    if r.revision > 0 && r.revision < self.compact_revision {
                        return Err(EtcdError::Compacted);
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) if d.key.is_empty() => {
                    return Err(EtcdError::EmptyKey);
                }
                Some(request_op::Request::RequestDeleteRange(_)) => {}
                Some(request_op::Request::RequestTxn(t)) => {
                    // The nested branch is chosen at execution; both must be valid for
                    // all-or-nothing semantics (compares only read).
                    self.check_ops(&t.success)?;
                    self.check_ops(&t.failure)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    fn exec_ops(
        &mut self,
        w: &mut Writer<'_>,
        ops: Vec<RequestOp>,
    ) -> Result<Vec<ResponseOp>, EtcdError> {
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let resp = match op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    Some(response_op::Response::ResponseRange(self.range(&r)?))
                }
                Some(request_op::Request::RequestPut(p)) => {
                    Some(response_op::Response::ResponsePut(self.put(w, p)))
                }
                Some(request_op::Request::RequestDeleteRange(d)) => Some(
                    response_op::Response::ResponseDeleteRange(self.delete_range(w, &d)),
                ),
                Some(request_op::Request::RequestTxn(t)) => {
                    let succeeded = t.compare.iter().all(|c| self.compare(c));
                    let branch = if succeeded { t.success } else { t.failure };
                    let responses = self.exec_ops(w, branch)?;
                    Some(response_op::Response::ResponseTxn(pb::TxnResponse {
                        header: None,
                        succeeded,
                        responses,
                    }))
                }
                None => None,
            };
            responses.push(ResponseOp { response: resp });
        }
        Ok(responses)
    }

    /// The shared key for `key` (the index's own when the key is known).
    fn key_of(&self, key: &[u8]) -> Key {
        match self.keys.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Key::from(key),
        }
    }

    fn push_version(&mut self, w: &mut Writer<'_>, key: Key, mut version: Version) {
        version.rev = w.rev;
        version.sub = w.sub;
        w.sub += 1;
        self.size += version.weight(&key);
        let event = (!w.out.skip_events).then(|| {
            let prev = self
                .keys
                .get(&key)
                .and_then(|vs| vs.last())
                .and_then(|v| v.kv(&key));
            Event {
                prev_kv: prev,
                ..version.event(&key)
            }
        });
        self.history
            .push_back((version.rev, version.sub, key.clone()));
        self.keys
            .entry(key)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(version);
        if let Some(e) = event {
            w.events.push(e);
        }
    }

    fn put(&mut self, w: &mut Writer<'_>, r: PutRequest) -> pb::PutResponse {
        let key = self.key_of(&r.key);
        let existing = self.latest(&key);
        let old_lease = existing.map_or(0, |v| v.lease);
        let prev_kv = if r.prev_kv {
            existing.and_then(|v| v.kv(&key))
        } else {
            None
        };
        let lease = if r.ignore_lease { old_lease } else { r.lease };
        let value: Box<[u8]> = if r.ignore_value {
            existing.and_then(|v| v.value.clone()).unwrap_or_default()
        } else {
            r.value.into_boxed_slice()
        };
        let version = Version {
            rev: 0,
            sub: 0,
            create_revision: existing.map_or(w.rev, |v| v.create_revision),
            version: existing.map_or(1, |v| v.version + 1),
            lease,
            value: Some(value),
        };
        if old_lease != 0
            && old_lease != lease
            && let Some(l) = self.leases.get_mut(&old_lease)
        {
            l.keys.remove(&key);
        }
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.insert(key.clone());
        }
        self.push_version(w, key, version);
        pb::PutResponse {
            header: None,
            prev_kv,
        }
    }

    fn delete_key(&mut self, w: &mut Writer<'_>, key: &Key) -> Option<KeyValue> {
        let old = self.latest(key)?;
        let (old_lease, old_kv) = (old.lease, old.kv(key));
        if old_lease != 0
            && let Some(l) = self.leases.get_mut(&old_lease)
        {
            l.keys.remove(key);
        }
        let version = Version {
            rev: 0,
            sub: 0,
            create_revision: 0,
            version: 0,
            lease: 0,
            value: None,
        };
        self.push_version(w, key.clone(), version);
        old_kv
    }

    fn delete_range(
        &mut self,
        w: &mut Writer<'_>,
        r: &DeleteRangeRequest,
    ) -> pb::DeleteRangeResponse {
        let keys: Vec<Key> = self
            .live_range(&r.key, &r.range_end)
            .map(|(k, _)| k.clone())
            .collect();
        let mut prev_kvs = Vec::new();
        for k in &keys {
            if let Some(old) = self.delete_key(w, k)
                && r.prev_kv
            {
                prev_kvs.push(old);
            }
        }
        pb::DeleteRangeResponse {
            header: None,
            deleted: keys.len() as i64,
            prev_kvs,
        }
    }

    /// Compacts history below `rev`: per key, versions older than the newest one at or below
    /// `rev` go; that newest one goes too when it is a tombstone. Readers see the effect at
    /// once; the versions are dropped now, or when the last snapshot build in progress ends.
    fn compact(&mut self, rev: i64) -> Result<(), EtcdError> {
        if rev <= self.compact_revision {
            return Err(EtcdError::Compacted);
        }
        if rev > self.revision {
            return Err(EtcdError::FutureRev);
        }
        self.compact_revision = rev;
        while self.history.front().is_some_and(|(r, _, _)| *r < rev) {
            self.history.pop_front();
        }
        if self.compaction_holds == 0 {
            self.drop_compacted();
        }
        Ok(())
    }

    fn drop_compacted(&mut self) {
        if self.compacted_upto >= self.compact_revision {
            return;
        }
        let rev = self.compact_revision;
        let mut emptied = Vec::new();
        for (key, versions) in self.keys.iter_mut() {
            let drop_to = retained_from(versions, rev);
            if drop_to == 0 {
                continue;
            }
            for v in versions.drain(..drop_to) {
                self.size = self.size.saturating_sub(v.weight(key));
            }
            if versions.is_empty() {
                emptied.push(key.clone());
            } else {
                versions.shrink_to_fit();
            }
        }
        for k in emptied {
            self.keys.remove(&k);
        }
        self.compacted_upto = rev;
    }

    /// CRC-32 of every retained version at or below `rev` (0 = all), with the compaction
    /// revision: equal on members with the same applied state (etcd's `HashKV` role).
    pub(crate) fn hash_kv(&self, rev: i64) -> Result<u32, EtcdError> {
        if rev > self.revision {
            return Err(EtcdError::FutureRev);
        }
        if rev > 0 && rev < self.compact_revision {
            return Err(EtcdError::Compacted);
        }
        let upto = if rev <= 0 { self.revision } else { rev };
        let mut h = crc32fast::Hasher::new();
        h.update(&self.compact_revision.to_be_bytes());
        for (key, versions) in &self.keys {
            let from = retained_from(versions, self.compact_revision);
            for v in versions[from..].iter().filter(|v| v.rev <= upto) {
                h.update(&(key.len() as u64).to_be_bytes());
                h.update(key);
                h.update(&v.rev.to_be_bytes());
                h.update(&v.sub.to_be_bytes());
                match &v.value {
                    Some(value) => {
                        h.update(&[1]);
                        h.update(&v.create_revision.to_be_bytes());
                        h.update(&v.version.to_be_bytes());
                        h.update(&v.lease.to_be_bytes());
                        h.update(&(value.len() as u64).to_be_bytes());
                        h.update(value);
                    }
                    None => h.update(&[0]),
                }
            }
        }
        Ok(h.finalize())
    }

    // ----- persistence support -----

    /// Starts a snapshot of the current state: returns what it captures besides the versions
    /// and defers dropping compacted versions until [`Mvcc::release_compaction`], so that
    /// [`Mvcc::visit_versions`] sees this state while later writes go on.
    pub(crate) fn hold_compaction(&mut self) -> SnapshotPoint {
        self.compaction_holds += 1;
        SnapshotPoint {
            revision: self.revision,
            compact_revision: self.compact_revision,
            leases: self.leases().collect(),
            alarms: self.alarms().collect(),
        }
    }

    /// Ends a snapshot build started with [`Mvcc::hold_compaction`].
    pub(crate) fn release_compaction(&mut self) {
        self.compaction_holds = self.compaction_holds.saturating_sub(1);
        if self.compaction_holds == 0 {
            self.drop_compacted();
        }
    }

    /// Calls `f` for every version of the state at `point`, for at most `limit` keys after
    /// `after` (in key order, each key's versions in revision order). Returns the last key
    /// visited, `None` at the end.
    pub(crate) fn visit_versions(
        &self,
        point: &SnapshotPoint,
        after: Option<&Key>,
        limit: usize,
        mut f: impl FnMut(&[u8], &Version),
    ) -> Option<Key> {
        let lower = match after {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Unbounded,
        };
        let mut last = None;
        for (key, versions) in self
            .keys
            .range::<[u8], _>((lower, Bound::Unbounded))
            .take(limit)
        {
            let from = retained_from(versions, point.compact_revision);
            for v in versions[from..]
                .iter()
                .take_while(|v| v.rev <= point.revision)
            {
                f(key, v);
            }
            last = Some(key.clone());
        }
        last
    }

    /// Rebuilds the model from persisted versions (each key's in revision order; keys in any
    /// order).
    pub(crate) fn from_versions(
        revision: i64,
        compact_revision: i64,
        versions: impl IntoIterator<Item = (Vec<u8>, Version)>,
        leases: impl IntoIterator<Item = (i64, i64)>,
    ) -> Self {
        let mut m = Mvcc {
            revision: revision.max(1),
            compact_revision,
            compacted_upto: compact_revision,
            ..Mvcc::default()
        };
        for (id, ttl) in leases {
            m.leases.insert(
                id,
                LeaseInfo {
                    ttl,
                    keys: BTreeSet::new(),
                },
            );
        }
        let mut history = Vec::new();
        let mut last: Option<Key> = None;
        for (key, v) in versions {
            let key = match &last {
                Some(k) if k[..] == key[..] => k.clone(),
                _ => m.key_of(&key),
            };
            m.size += v.weight(&key);
            if v.rev >= compact_revision {
                history.push((v.rev, v.sub, key.clone()));
            }
            m.keys
                .entry(key.clone())
                .or_insert_with(|| Vec::with_capacity(1))
                .push(v);
            last = Some(key);
        }
        history.sort_unstable_by_key(|(rev, sub, _)| (*rev, *sub));
        m.history = history.into();
        for (key, versions) in &m.keys {
            if let Some(v) = versions.last().filter(|v| v.value.is_some())
                && v.lease != 0
                && let Some(l) = m.leases.get_mut(&v.lease)
            {
                l.keys.insert(key.clone());
            }
        }
        m
    }

    /// Rebuilds the model from `(rev, sub, event)` records (the older snapshot layout).
    pub(crate) fn from_records(
        revision: i64,
        compact_revision: i64,
        records: impl IntoIterator<Item = (i64, u32, Event)>,
        leases: impl IntoIterator<Item = (i64, i64)>,
    ) -> Self {
        let versions = records.into_iter().filter_map(|(rev, sub, ev)| {
            let kv = ev.kv?;
            let live = ev.r#type == EventType::Put as i32;
            Some((
                kv.key,
                Version {
                    rev,
                    sub,
                    create_revision: if live { kv.create_revision } else { 0 },
                    version: if live { kv.version } else { 0 },
                    lease: if live { kv.lease } else { 0 },
                    value: live.then(|| kv.value.into_boxed_slice()),
                },
            ))
        });
        Self::from_versions(revision, compact_revision, versions, leases)
    }
}

/// Whether `ops` (nested transactions included) contain a put.
fn ops_put(ops: &[RequestOp]) -> bool {
    ops.iter().any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => ops_put(&t.success) || ops_put(&t.failure),
        _ => false,
    })
}

/// Sorts Range results as requested (they come in key order).
fn sort_found(found: &mut [(&Key, &Version)], r: &RangeRequest) {
    use range_request::{SortOrder, SortTarget};
    let mut order = r.sort_order();
    let target = r.sort_target();
    if order == SortOrder::None && target != SortTarget::Key {
        order = SortOrder::Ascend;
    }
    if order == SortOrder::None || (order == SortOrder::Ascend && target == SortTarget::Key) {
        return; // already in key order
    }
    found.sort_by(|(ka, a), (kb, b)| {
        let o = match target {
            SortTarget::Key => ka.cmp(kb),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.rev.cmp(&b.rev),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            o.reverse()
        } else {
            o
        }
    });
}

fn compare_fields(
    c: &Compare,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
    value: &[u8],
) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    use std::cmp::Ordering;
    let want_int = match &c.target_union {
        Some(
            TargetUnion::Version(x)
            | TargetUnion::CreateRevision(x)
            | TargetUnion::ModRevision(x)
            | TargetUnion::Lease(x),
        ) => *x,
        _ => 0,
    };
    let ord: Ordering = match c.target() {
        CompareTarget::Version => version.cmp(&want_int),
        CompareTarget::Create => create_revision.cmp(&want_int),
        CompareTarget::Mod => mod_revision.cmp(&want_int),
        CompareTarget::Lease => lease.cmp(&want_int),
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            value.cmp(want)
        }
    };
    match c.result() {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::NotEqual => ord != Ordering::Equal,
    }
}

/// Delete ranges and put keys of one Txn branch.
type BranchKeys = (Vec<(Vec<u8>, Vec<u8>)>, BTreeSet<Vec<u8>>);

/// Static Txn checks done before proposing: op count and duplicate keys (etcd's
/// `checkIntervals`).
pub(crate) fn check_txn(t: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    fn count_ok(t: &TxnRequest, max: usize) -> bool {
        t.compare.len() <= max
            && t.success.len() <= max
            && t.failure.len() <= max
            && t.success
                .iter()
                .chain(&t.failure)
                .all(|op| match &op.request {
                    Some(request_op::Request::RequestTxn(n)) => count_ok(n, max),
                    _ => true,
                })
    }
    if !count_ok(t, max_ops) {
        return Err(EtcdError::TooManyOps);
    }
    fn branch(ops: &[RequestOp]) -> Result<BranchKeys, EtcdError> {
        let mut dels = Vec::new();
        let mut puts = BTreeSet::new();
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => {
                    if p.key.is_empty() {
                        return Err(EtcdError::EmptyKey);
                    }
                    if !puts.insert(p.key.clone()) {
                        return Err(EtcdError::DuplicateKey);
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    if d.key.is_empty() {
                        return Err(EtcdError::EmptyKey);
                    }
                    dels.push((d.key.clone(), d.range_end.clone()));
                }
                Some(request_op::Request::RequestRange(r)) if r.key.is_empty() => {
                    return Err(EtcdError::EmptyKey);
                }
                Some(request_op::Request::RequestRange(_)) => {}
                Some(request_op::Request::RequestTxn(n)) => {
                    for c in &n.compare {
                        if c.key.is_empty() {
                            return Err(EtcdError::EmptyKey);
                        }
                    }
                    let (sd, sp) = branch(&n.success)?;
                    let (fd, fp) = branch(&n.failure)?;
                    for k in sp.iter().chain(fp.iter()) {
                        if puts.contains(k) {
                            return Err(EtcdError::DuplicateKey);
                        }
                    }
                    puts.extend(sp);
                    puts.extend(fp);
                    dels.extend(sd);
                    dels.extend(fd);
                }
                None => {}
            }
        }
        for k in &puts {
            if dels.iter().any(|(key, end)| in_range(k, key, end)) {
                return Err(EtcdError::DuplicateKey);
            }
        }
        Ok((dels, puts))
    }
    for c in &t.compare {
        if c.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
    }
    branch(&t.success)?;
    branch(&t.failure)?;
    Ok(())
}

#[cfg(test)]
mod tests;
