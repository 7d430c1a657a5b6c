use prost::Message;

use super::*;
use crate::types::{OpReply, WriteOp};

fn put(m: &mut Mvcc, k: &str, v: &str) -> i64 {
    let mut out = ApplyOutput::default();
    let op = WriteOp::Put(
        PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    m.apply(&op, &mut out).expect("put");
    m.revision()
}

fn del(m: &mut Mvcc, k: &str, end: &str) -> (i64, ApplyOutput) {
    let mut out = ApplyOutput::default();
    let op = WriteOp::DeleteRange(
        DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    m.apply(&op, &mut out).expect("delete");
    (m.revision(), out)
}

/// Every version a snapshot of `m` would hold, in key order.
fn versions(m: &Mvcc) -> Vec<(Vec<u8>, Version)> {
    let point = SnapshotPoint {
        revision: m.revision(),
        compact_revision: m.compact_revision(),
        leases: Vec::new(),
        alarms: Vec::new(),
    };
    let mut out = Vec::new();
    m.visit_versions(&point, None, usize::MAX, |k, v| {
        out.push((k.to_vec(), v.clone()))
    });
    out
}

fn get_at(m: &Mvcc, k: &str, rev: i64) -> Result<Option<KeyValue>, EtcdError> {
    Ok(m.range(&RangeRequest {
        key: k.into(),
        revision: rev,
        ..Default::default()
    })?
    .kvs
    .into_iter()
    .next())
}

#[test]
fn versions_and_revisions() {
    let mut m = Mvcc::default();
    assert_eq!(put(&mut m, "a", "1"), 2);
    assert_eq!(put(&mut m, "a", "2"), 3);
    let kv = get_at(&m, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    let (rev, out) = del(&mut m, "a", "");
    assert_eq!(rev, 4);
    assert_eq!(
        out.events[0].events[0].prev_kv.as_ref().unwrap().value,
        b"2"
    );
    assert_eq!(get_at(&m, "a", 0).unwrap(), None);
    // Re-creation starts a new generation.
    assert_eq!(put(&mut m, "a", "3"), 5);
    let kv = get_at(&m, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (5, 1));
    assert_eq!(get_at(&m, "a", 3).unwrap().unwrap().value, b"2");
    // Deleting nothing consumes no revision.
    assert_eq!(del(&mut m, "zzz", "").0, 5);
}

#[test]
fn txn_is_one_revision_and_sees_its_own_writes() {
    let mut m = Mvcc::default();
    put(&mut m, "a", "1");
    let t = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: "a".into(),
            target_union: Some(compare::TargetUnion::Value(b"1".to_vec())),
            ..Default::default()
        }],
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: "b".into(),
                    value: "x".into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "b".into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: "a".into(),
                        ..Default::default()
                    },
                )),
            },
        ],
        failure: vec![],
    };
    let mut out = ApplyOutput::default();
    let reply = m.apply(&WriteOp::Txn(t.encode_to_vec()), &mut out).unwrap();
    let OpReply::Txn(b) = reply else {
        panic!("txn reply")
    };
    let resp = pb::TxnResponse::decode(b.as_slice()).unwrap();
    assert!(resp.succeeded);
    assert_eq!(m.revision(), 3);
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].events.len(), 2);
    let Some(response_op::Response::ResponseRange(r)) = &resp.responses[1].response else {
        panic!("range response")
    };
    assert_eq!(r.kvs[0].value, b"x");
}

#[test]
fn compaction_keeps_latest_and_drops_tombstones() {
    let mut m = Mvcc::default();
    put(&mut m, "a", "1"); // 2
    put(&mut m, "a", "2"); // 3
    put(&mut m, "b", "1"); // 4
    del(&mut m, "b", ""); // 5
    put(&mut m, "c", "1"); // 6
    let mut out = ApplyOutput::default();
    m.apply(&WriteOp::Compact(5), &mut out).unwrap();
    assert_eq!(get_at(&m, "a", 4), Err(EtcdError::Compacted));
    assert_eq!(get_at(&m, "a", 5).unwrap().unwrap().value, b"2");
    assert_eq!(get_at(&m, "b", 5).unwrap(), None);
    // a@2, b@4 and b's tombstone@5 were removed.
    let revs: Vec<i64> = versions(&m).iter().map(|(_, v)| v.rev).collect();
    assert_eq!(revs, vec![3, 6]);
    assert_eq!(
        m.apply(&WriteOp::Compact(5), &mut out),
        Err(EtcdError::Compacted)
    );
    assert_eq!(
        m.apply(&WriteOp::Compact(99), &mut out),
        Err(EtcdError::FutureRev)
    );
}

#[test]
fn events_replay_with_prev_kv_and_rebuild_from_records() {
    let mut m = Mvcc::default();
    put(&mut m, "p/a", "1");
    put(&mut m, "p/a", "2");
    put(&mut m, "q", "x");
    del(&mut m, "p/", "p0");
    let evs = m.events_between(3, 5, b"p/", b"p0");
    assert_eq!(
        evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![3, 5]
    );
    let put_ev = &evs[0].events[0];
    assert_eq!(put_ev.prev_kv.as_ref().unwrap().value, b"1");
    let del_ev = &evs[1].events[0];
    assert_eq!(del_ev.r#type, EventType::Delete as i32);
    assert_eq!(del_ev.kv.as_ref().unwrap().mod_revision, 5);

    let rebuilt = Mvcc::from_versions(m.revision(), m.compact_revision(), versions(&m), m.leases());
    assert_eq!(rebuilt.revision(), m.revision());
    assert_eq!(versions(&rebuilt), versions(&m));
    assert_eq!(rebuilt.hash_kv(0), m.hash_kv(0));
    assert_eq!(
        rebuilt.events_between(1, 5, b"p/", b"p0"),
        m.events_between(1, 5, b"p/", b"p0")
    );
}

#[test]
fn lease_revoke_deletes_attached_keys_in_one_revision() {
    let mut m = Mvcc::default();
    let mut out = ApplyOutput::default();
    m.apply(&WriteOp::LeaseGrant { id: 7, ttl: 10 }, &mut out)
        .unwrap();
    assert_eq!(
        m.apply(&WriteOp::LeaseGrant { id: 7, ttl: 10 }, &mut out),
        Err(EtcdError::LeaseExist)
    );
    for k in ["x", "y"] {
        let op = WriteOp::Put(
            PutRequest {
                key: k.into(),
                value: "v".into(),
                lease: 7,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        m.apply(&op, &mut out).unwrap();
    }
    assert_eq!(m.lease(7).unwrap().keys.len(), 2);
    let before = m.revision();
    let mut out = ApplyOutput::default();
    m.apply(&WriteOp::LeaseRevoke { id: 7 }, &mut out).unwrap();
    assert_eq!(m.revision(), before + 1);
    assert_eq!(out.events[0].events.len(), 2);
    assert!(m.lease(7).is_none());
    assert_eq!(
        m.apply(&WriteOp::LeaseRevoke { id: 7 }, &mut out),
        Err(EtcdError::LeaseNotFound)
    );
}

#[test]
fn txn_static_checks() {
    let p = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            ..Default::default()
        })),
    };
    let d = |k: &str, e: &str| RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: k.into(),
                range_end: e.into(),
                ..Default::default()
            },
        )),
    };
    let ok = TxnRequest {
        success: vec![p("a"), p("b")],
        failure: vec![p("a")],
        ..Default::default()
    };
    assert_eq!(check_txn(&ok, 128), Ok(()));
    let dup = TxnRequest {
        success: vec![p("a"), p("a")],
        ..Default::default()
    };
    assert_eq!(check_txn(&dup, 128), Err(EtcdError::DuplicateKey));
    let put_in_del = TxnRequest {
        success: vec![d("a", "c"), p("b")],
        ..Default::default()
    };
    assert_eq!(check_txn(&put_in_del, 128), Err(EtcdError::DuplicateKey));
    let nested = TxnRequest {
        success: vec![
            p("a"),
            RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![p("a")],
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    assert_eq!(check_txn(&nested, 128), Err(EtcdError::DuplicateKey));
    let many = TxnRequest {
        success: (0..3).map(|i| p(&i.to_string())).collect(),
        ..Default::default()
    };
    assert_eq!(check_txn(&many, 2), Err(EtcdError::TooManyOps));
}

#[test]
fn compaction_waits_for_snapshot_builds_but_reads_see_it_at_once() {
    let mut m = Mvcc::default();
    put(&mut m, "a", "1"); // 2
    put(&mut m, "a", "2"); // 3
    put(&mut m, "b", "1"); // 4
    del(&mut m, "b", ""); // 5
    let hash_before = m.hash_kv(0).unwrap();
    let point = m.hold_compaction();
    let mut out = ApplyOutput::default();
    m.apply(&WriteOp::Compact(5), &mut out).unwrap();
    put(&mut m, "c", "1"); // 6
    // Readers see the compaction already ...
    assert_eq!(get_at(&m, "a", 4), Err(EtcdError::Compacted));
    assert_eq!(get_at(&m, "a", 5).unwrap().unwrap().value, b"2");
    // ... while the snapshot still sees the state at its point, in chunks.
    let mut seen = Vec::new();
    let mut after = None;
    while let Some(last) = m.visit_versions(&point, after.as_ref(), 1, |k, v| {
        seen.push((k.to_vec(), v.rev));
    }) {
        after = Some(last);
    }
    assert_eq!(
        seen,
        vec![
            (b"a".to_vec(), 2),
            (b"a".to_vec(), 3),
            (b"b".to_vec(), 4),
            (b"b".to_vec(), 5)
        ]
    );
    let held = m.hash_kv(0).unwrap();
    m.release_compaction();
    assert_eq!(
        versions(&m).iter().map(|(_, v)| v.rev).collect::<Vec<_>>(),
        vec![3, 6]
    );
    // The hash counts what is retained, dropped or not.
    assert_eq!(m.hash_kv(0).unwrap(), held);
    assert_ne!(held, hash_before);
    // A member that never held compaction agrees.
    let mut n = Mvcc::default();
    put(&mut n, "a", "1");
    put(&mut n, "a", "2");
    put(&mut n, "b", "1");
    del(&mut n, "b", "");
    n.apply(&WriteOp::Compact(5), &mut out).unwrap();
    put(&mut n, "c", "1");
    assert_eq!(n.hash_kv(0).unwrap(), held);
}

#[test]
fn nospace_alarm_caps_writes_that_add_data() {
    const NOSPACE: i32 = pb::AlarmType::Nospace as i32;
    let mut m = Mvcc::default();
    put(&mut m, "a", "1");
    let alarm = |activate, alarm| WriteOp::Alarm {
        activate,
        member: 5,
        alarm,
    };
    let mut out = ApplyOutput::default();
    // Raising the alarm "NONE" changes nothing (as in etcd).
    assert_eq!(
        m.apply(&alarm(true, pb::AlarmType::None as i32), &mut out),
        Ok(OpReply::Alarm(Vec::new()))
    );
    assert!(!m.nospace());
    assert_eq!(
        m.apply(&alarm(true, NOSPACE), &mut out),
        Ok(OpReply::Alarm(vec![(5, NOSPACE)]))
    );
    assert!(m.nospace());
    let rev = m.revision();
    let put_op = WriteOp::Put(
        PutRequest {
            key: "b".into(),
            value: "2".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    assert_eq!(m.apply(&put_op, &mut out), Err(EtcdError::NoSpace));
    let txn = |success: Vec<RequestOp>| {
        WriteOp::Txn(
            TxnRequest {
                success,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    let put_req = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: "c".into(),
            value: "3".into(),
            ..Default::default()
        })),
    };
    assert_eq!(
        m.apply(&txn(vec![put_req.clone()]), &mut out),
        Err(EtcdError::NoSpace)
    );
    assert_eq!(
        m.apply(&WriteOp::LeaseGrant { id: 1, ttl: 10 }, &mut out),
        Err(EtcdError::NoSpace)
    );
    assert_eq!(m.revision(), rev, "refused writes leave the model alone");
    // Deleting (also in a transaction) frees space and stays allowed.
    let delete = RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: "a".into(),
                ..Default::default()
            },
        )),
    };
    assert!(m.apply(&txn(vec![delete]), &mut out).is_ok());
    assert_eq!(m.revision(), rev + 1);
    // Clearing it twice reports the change once.
    assert_eq!(
        m.apply(&alarm(false, NOSPACE), &mut out),
        Ok(OpReply::Alarm(vec![(5, NOSPACE)]))
    );
    assert_eq!(
        m.apply(&alarm(false, NOSPACE), &mut out),
        Ok(OpReply::Alarm(Vec::new()))
    );
    assert!(m.apply(&put_op, &mut out).is_ok());
}
