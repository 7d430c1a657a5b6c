//! The etcd v3 data model in memory: per-key version history, one revision per write request,
//! compaction, leases and the event history watches replay from.
//!
//! This type is pure (no IO). The state machine persists every [`Change`] it reports in the same
//! sled transaction as `last_applied`, and rebuilds the model from those records on start.
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::error::EtcdError;
use crate::pb::etcdserverpb::{
    self as pb, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, compare, range_request, request_op, response_op,
};
use crate::pb::mvccpb::{Event, KeyValue, event::EventType};

/// One version of a key: the value written at `(rev, sub)`, or a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Version {
    pub(crate) rev: i64,
    pub(crate) sub: u32,
    /// `None` = deleted at `rev`.
    pub(crate) kv: Option<KeyValue>,
}

/// A granted lease as replicated (expiry timing is leader-local, see `lessor`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LeaseInfo {
    pub(crate) ttl: i64,
    pub(crate) keys: BTreeSet<Vec<u8>>,
}

/// A persistent effect of applying an op, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// New version record: the event without `prev_kv`.
    Record {
        rev: i64,
        sub: u32,
        event: Event,
    },
    /// A version dropped by compaction.
    RemoveRecord {
        rev: i64,
        sub: u32,
    },
    LeasePut {
        id: i64,
        ttl: i64,
    },
    LeaseDelete {
        id: i64,
    },
}

/// Events of one revision (all share it), `prev_kv` always filled when known.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RevEvents {
    pub(crate) revision: i64,
    pub(crate) events: Vec<Event>,
}

/// Output of applying ops: what to persist and what to publish to watchers.
#[derive(Debug, Default)]
pub(crate) struct ApplyOutput {
    pub(crate) changes: Vec<Change>,
    pub(crate) events: Vec<RevEvents>,
}

/// The multi-version key-value model.
#[derive(Debug, Clone)]
pub(crate) struct Mvcc {
    revision: i64,
    compact_revision: i64,
    keys: BTreeMap<Vec<u8>, Vec<Version>>,
    /// Revision -> keys changed at it, in sub order (for watch replay).
    history: BTreeMap<i64, Vec<Vec<u8>>>,
    leases: BTreeMap<i64, LeaseInfo>,
    /// Approximate logical size in bytes (for the space quota and `Status`).
    size: u64,
}

impl Default for Mvcc {
    fn default() -> Self {
        // etcd starts at revision 1 with no keys; the first write gets revision 2.
        Self {
            revision: 1,
            compact_revision: 0,
            keys: BTreeMap::new(),
            history: BTreeMap::new(),
            leases: BTreeMap::new(),
            size: 0,
        }
    }
}

/// A key range as `BTreeMap::range` bounds.
pub(crate) type KeyBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Key bounds of etcd's `[key, range_end)` convention.
pub(crate) fn bounds(key: &[u8], range_end: &[u8]) -> Option<KeyBounds> {
    if range_end.is_empty() {
        return Some((Bound::Included(key.to_vec()), Bound::Included(key.to_vec())));
    }
    if range_end == [0] {
        return Some((Bound::Included(key.to_vec()), Bound::Unbounded));
    }
    if range_end <= key {
        return None;
    }
    Some((
        Bound::Included(key.to_vec()),
        Bound::Excluded(range_end.to_vec()),
    ))
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

fn version_weight(kv: &Option<KeyValue>, key: &[u8]) -> u64 {
    let v = kv.as_ref().map_or(0, |kv| kv.value.len());
    (key.len() + v + 48) as u64
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

    fn latest(&self, key: &[u8]) -> Option<&KeyValue> {
        self.keys.get(key)?.last()?.kv.as_ref()
    }

    /// Live kvs in a range at the latest revision.
    fn live_range<'a>(
        &'a self,
        key: &[u8],
        range_end: &[u8],
    ) -> Box<dyn Iterator<Item = &'a KeyValue> + 'a> {
        match bounds(key, range_end) {
            None => Box::new(std::iter::empty()),
            Some(b) => Box::new(
                self.keys
                    .range::<Vec<u8>, _>(b)
                    .filter_map(|(_, vs)| vs.last().and_then(|v| v.kv.as_ref())),
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
        let mut kvs: Vec<KeyValue> = Vec::new();
        if let Some(b) = bounds(&r.key, &r.range_end) {
            for (_, versions) in self.keys.range::<Vec<u8>, _>(b) {
                let v = match at {
                    None => versions.last(),
                    Some(at) => versions.iter().rev().find(|v| v.rev <= at),
                };
                if let Some(kv) = v.and_then(|v| v.kv.as_ref()) {
                    kvs.push(kv.clone());
                }
            }
        }
        let count = kvs.len() as i64;
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        });
        sort_kvs(&mut kvs, r);
        let mut more = false;
        if r.limit > 0 && kvs.len() as i64 > r.limit {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        if r.count_only {
            kvs.clear();
        }
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
        let mut out = Vec::new();
        if from > to {
            return out;
        }
        for (&rev, keys) in self.history.range(from..=to) {
            let mut events = Vec::new();
            for k in keys {
                if !in_range(k, key, range_end) {
                    continue;
                }
                let Some(versions) = self.keys.get(k) else {
                    continue;
                };
                let Ok(i) = versions.binary_search_by_key(&rev, |v| v.rev) else {
                    continue;
                };
                let prev = i.checked_sub(1).and_then(|j| versions[j].kv.clone());
                let (ty, kv) = match &versions[i].kv {
                    Some(kv) => (EventType::Put, kv.clone()),
                    None => (EventType::Delete, tombstone(k, rev)),
                };
                events.push(Event {
                    r#type: ty as i32,
                    kv: Some(kv),
                    prev_kv: prev,
                });
            }
            if !events.is_empty() {
                out.push(RevEvents {
                    revision: rev,
                    events,
                });
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

    fn compare(&self, c: &Compare) -> bool {
        let kvs: Vec<&KeyValue> = self.live_range(&c.key, &c.range_end).collect();
        let target = c.target();
        if kvs.is_empty() {
            if target == compare::CompareTarget::Value {
                return false;
            }
            return compare_kv(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, kv))
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
                let r = PutRequest::decode(b.as_slice()).map_err(decode_err)?;
                self.check_put(&r)?;
                let mut w = self.writer(out);
                let resp = self.put(&mut w, &r);
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
                let succeeded = r.compare.iter().all(|c| self.compare(c));
                let branch = if succeeded { &r.success } else { &r.failure };
                self.check_ops(branch)?;
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
                self.compact(*rev, out)?;
                Ok(OpReply::Compact)
            }
            WriteOp::LeaseGrant { id, ttl } => {
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
                out.changes.push(Change::LeasePut { id: *id, ttl: *ttl });
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
                out.changes.push(Change::LeaseDelete { id: *id });
                Ok(OpReply::LeaseRevoke)
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
            w.out.events.push(RevEvents {
                revision: w.rev,
                events: w.events,
            });
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
        ops: &[RequestOp],
    ) -> Result<Vec<ResponseOp>, EtcdError> {
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let resp = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    Some(response_op::Response::ResponseRange(self.range(r)?))
                }
                Some(request_op::Request::RequestPut(p)) => {
                    Some(response_op::Response::ResponsePut(self.put(w, p)))
                }
                Some(request_op::Request::RequestDeleteRange(d)) => Some(
                    response_op::Response::ResponseDeleteRange(self.delete_range(w, d)),
                ),
                Some(request_op::Request::RequestTxn(t)) => {
                    let succeeded = t.compare.iter().all(|c| self.compare(c));
                    let branch = if succeeded { &t.success } else { &t.failure };
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

    fn push_version(&mut self, w: &mut Writer<'_>, key: &[u8], kv: Option<KeyValue>) {
        let sub = w.sub;
        w.sub += 1;
        let versions = self.keys.entry(key.to_vec()).or_default();
        let prev = versions.last().and_then(|v| v.kv.clone());
        self.size += version_weight(&kv, key);
        let (ty, ev_kv) = match &kv {
            Some(kv) => (EventType::Put, kv.clone()),
            None => (EventType::Delete, tombstone(key, w.rev)),
        };
        versions.push(Version {
            rev: w.rev,
            sub,
            kv,
        });
        self.history.entry(w.rev).or_default().push(key.to_vec());
        let event = Event {
            r#type: ty as i32,
            kv: Some(ev_kv),
            prev_kv: None,
        };
        w.out.changes.push(Change::Record {
            rev: w.rev,
            sub,
            event: event.clone(),
        });
        w.events.push(Event {
            prev_kv: prev,
            ..event
        });
    }

    fn put(&mut self, w: &mut Writer<'_>, r: &PutRequest) -> pb::PutResponse {
        let existing = self.latest(&r.key).cloned();
        let lease = if r.ignore_lease {
            existing.as_ref().map_or(0, |kv| kv.lease)
        } else {
            r.lease
        };
        let value = if r.ignore_value {
            existing
                .as_ref()
                .map(|kv| kv.value.clone())
                .unwrap_or_default()
        } else {
            r.value.clone()
        };
        let kv = KeyValue {
            key: r.key.clone(),
            create_revision: existing.as_ref().map_or(w.rev, |kv| kv.create_revision),
            mod_revision: w.rev,
            version: existing.as_ref().map_or(1, |kv| kv.version + 1),
            value,
            lease,
        };
        if let Some(old) = &existing
            && old.lease != 0
            && old.lease != lease
            && let Some(l) = self.leases.get_mut(&old.lease)
        {
            l.keys.remove(&r.key);
        }
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.insert(r.key.clone());
        }
        self.push_version(w, &r.key, Some(kv));
        pb::PutResponse {
            header: None,
            prev_kv: if r.prev_kv { existing } else { None },
        }
    }

    fn delete_key(&mut self, w: &mut Writer<'_>, key: &[u8]) -> Option<KeyValue> {
        let old = self.latest(key).cloned()?;
        if old.lease != 0
            && let Some(l) = self.leases.get_mut(&old.lease)
        {
            l.keys.remove(key);
        }
        self.push_version(w, key, None);
        Some(old)
    }

    fn delete_range(
        &mut self,
        w: &mut Writer<'_>,
        r: &DeleteRangeRequest,
    ) -> pb::DeleteRangeResponse {
        let keys: Vec<Vec<u8>> = self
            .live_range(&r.key, &r.range_end)
            .map(|kv| kv.key.clone())
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

    /// Drops history below `rev`: per key, versions older than the newest one at or below
    /// `rev` go; that newest one goes too when it is a tombstone.
    fn compact(&mut self, rev: i64, out: &mut ApplyOutput) -> Result<(), EtcdError> {
        if rev <= self.compact_revision {
            return Err(EtcdError::Compacted);
        }
        if rev > self.revision {
            return Err(EtcdError::FutureRev);
        }
        let mut emptied = Vec::new();
        for (key, versions) in self.keys.iter_mut() {
            let Some(i) = versions.iter().rposition(|v| v.rev <= rev) else {
                continue;
            };
            let drop_to = if versions[i].kv.is_none() { i + 1 } else { i };
            for v in versions.drain(..drop_to) {
                self.size = self.size.saturating_sub(version_weight(&v.kv, key));
                out.changes.push(Change::RemoveRecord {
                    rev: v.rev,
                    sub: v.sub,
                });
            }
            if versions.is_empty() {
                emptied.push(key.clone());
            }
        }
        for k in emptied {
            self.keys.remove(&k);
        }
        self.history = self.history.split_off(&rev);
        self.compact_revision = rev;
        Ok(())
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
            for v in versions.iter().filter(|v| v.rev <= upto) {
                h.update(&(key.len() as u64).to_be_bytes());
                h.update(key);
                h.update(&v.rev.to_be_bytes());
                h.update(&v.sub.to_be_bytes());
                match &v.kv {
                    Some(kv) => {
                        h.update(&[1]);
                        h.update(&kv.create_revision.to_be_bytes());
                        h.update(&kv.version.to_be_bytes());
                        h.update(&kv.lease.to_be_bytes());
                        h.update(&(kv.value.len() as u64).to_be_bytes());
                        h.update(&kv.value);
                    }
                    None => h.update(&[0]),
                }
            }
        }
        Ok(h.finalize())
    }

    // ----- persistence support -----

    /// Rebuilds the model from persisted records (ordered by `(rev, sub)`).
    pub(crate) fn from_records(
        revision: i64,
        compact_revision: i64,
        records: impl IntoIterator<Item = (i64, u32, Event)>,
        leases: impl IntoIterator<Item = (i64, i64)>,
    ) -> Self {
        let mut m = Mvcc {
            revision: revision.max(1),
            compact_revision,
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
        for (rev, sub, ev) in records {
            let Some(kv) = ev.kv else { continue };
            let key = kv.key.clone();
            let kv = (ev.r#type == EventType::Put as i32).then_some(kv);
            m.size += version_weight(&kv, &key);
            m.keys
                .entry(key.clone())
                .or_default()
                .push(Version { rev, sub, kv });
            if rev >= compact_revision {
                m.history.entry(rev).or_default().push(key);
            }
        }
        for (key, versions) in &m.keys {
            if let Some(kv) = versions.last().and_then(|v| v.kv.as_ref())
                && kv.lease != 0
                && let Some(l) = m.leases.get_mut(&kv.lease)
            {
                l.keys.insert(key.clone());
            }
        }
        m
    }

    /// Every retained version as a persistable record, in `(rev, sub)` order.
    pub(crate) fn records(&self) -> Vec<(i64, u32, Event)> {
        let mut out: Vec<(i64, u32, Event)> = Vec::new();
        for (key, versions) in &self.keys {
            for v in versions {
                let (ty, kv) = match &v.kv {
                    Some(kv) => (EventType::Put, kv.clone()),
                    None => (EventType::Delete, tombstone(key, v.rev)),
                };
                out.push((
                    v.rev,
                    v.sub,
                    Event {
                        r#type: ty as i32,
                        kv: Some(kv),
                        prev_kv: None,
                    },
                ));
            }
        }
        out.sort_by_key(|(rev, sub, _)| (*rev, *sub));
        out
    }
}

fn sort_kvs(kvs: &mut [KeyValue], r: &RangeRequest) {
    use range_request::{SortOrder, SortTarget};
    let mut order = r.sort_order();
    let target = r.sort_target();
    if order == SortOrder::None && target != SortTarget::Key {
        order = SortOrder::Ascend;
    }
    if order == SortOrder::None || (order == SortOrder::Ascend && target == SortTarget::Key) {
        return; // already in key order
    }
    kvs.sort_by(|a, b| {
        let o = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            o.reverse()
        } else {
            o
        }
    });
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
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
        CompareTarget::Version => kv.version.cmp(&want_int),
        CompareTarget::Create => kv.create_revision.cmp(&want_int),
        CompareTarget::Mod => kv.mod_revision.cmp(&want_int),
        CompareTarget::Lease => kv.lease.cmp(&want_int),
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
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
