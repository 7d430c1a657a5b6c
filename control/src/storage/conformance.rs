//! Behaviour every [`Store`] implementation must show (run by each implementation's tests).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::{Guard, Store, StoreError, TxnOp, WatchEvent};

/// Runs every check against a fresh, empty store.
pub(crate) async fn run_all<S: Store>(s: S) {
    let p = "/registry/conf/";
    let r1 = s
        .create(&format!("{p}a"), Bytes::from_static(b"1"))
        .await
        .expect("create a");
    assert_eq!(
        s.create(&format!("{p}a"), Bytes::from_static(b"x")).await,
        Err(StoreError::AlreadyExists)
    );
    let got = s
        .get(&format!("{p}a"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.mod_revision, r1);
    assert_eq!(&got.value[..], b"1");
    assert!(s.get(&format!("{p}zz")).await.expect("get").is_none());

    let r2 = s
        .update(&format!("{p}a"), Bytes::from_static(b"2"), r1)
        .await
        .expect("update");
    assert!(r2 > r1);
    match s
        .update(&format!("{p}a"), Bytes::from_static(b"3"), r1)
        .await
    {
        Err(StoreError::Conflict { current: Some(cur) }) => assert_eq!(cur.mod_revision, r2),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(
        s.update(&format!("{p}nope"), Bytes::from_static(b"3"), r1)
            .await,
        Err(StoreError::NotFound)
    );
    s.create(&format!("{p}b"), Bytes::from_static(b"b"))
        .await
        .expect("create b");
    s.create("/registry/conf0", Bytes::from_static(b"outside"))
        .await
        .expect("create outside");
    let (items, rev) = s.list(p).await.expect("list");
    assert_eq!(items.len(), 2, "prefix must not match siblings");
    assert_eq!(items[0].key, format!("{p}a"));
    assert!(rev >= items[1].mod_revision);

    let mut w = s.watch(p, rev).await.expect("watch");
    assert!(matches!(
        s.delete(&format!("{p}b"), Some(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    let rd = s.delete(&format!("{p}b"), None).await.expect("delete");
    assert_eq!(
        s.delete(&format!("{p}b"), None).await,
        Err(StoreError::NotFound)
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("event");
    match ev {
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!(key, format!("{p}b"));
            assert_eq!(revision, rd);
            assert_eq!(prev.map(|p| p.value), Some(Bytes::from_static(b"b")));
        }
        other => panic!("expected delete, got {other:?}"),
    }
    // A watch from an old revision replays history.
    let mut w = s.watch(p, r1).await.expect("watch from r1");
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("replayed event in time")
        .expect("stream open")
        .expect("event");
    assert_eq!(ev.revision(), r2);
    assert!(s.ready().await);
    txn(&s).await;
    probe(&s).await;
}

/// `probe` sees writes and deletions after a revision, and nothing else.
async fn probe<S: Store>(s: &S) {
    let p = "/registry/probe/";
    let (_, r0) = s.list(p).await.expect("list");
    let empty = s.probe(p, r0).await.expect("probe");
    assert_eq!((empty.count, empty.written_after), (0, false));
    let r1 = s
        .create(&format!("{p}a"), Bytes::from_static(b"1"))
        .await
        .expect("create");
    s.create(&format!("{p}b"), Bytes::from_static(b"1"))
        .await
        .expect("create");
    let (_, now) = s.list(p).await.expect("list");
    let quiet = s.probe(p, now).await.expect("probe");
    assert_eq!((quiet.count, quiet.written_after), (2, false));
    assert!(quiet.revision >= now);
    assert!(
        s.probe(p, r1).await.expect("probe").written_after,
        "b came after a"
    );
    // Writes elsewhere do not count; deletions lower the count.
    s.create("/registry/probe0", Bytes::from_static(b"x"))
        .await
        .expect("create");
    s.delete(&format!("{p}a"), None).await.expect("delete");
    let after = s.probe(p, now).await.expect("probe");
    assert_eq!((after.count, after.written_after), (1, false));
}

/// Guarded multi-key transactions: all ops at one revision, or nothing.
async fn txn<S: Store>(s: &S) {
    let k = |n: &str| format!("/registry/txn/{n}");
    let put = |n: &str, v: &'static [u8]| TxnOp::Put {
        key: k(n),
        value: Bytes::from_static(v),
    };
    let absent = |n: &str| Guard {
        key: k(n),
        mod_revision: 0,
    };
    let r = s
        .txn(
            vec![absent("x"), absent("y")],
            vec![put("x", b"1"), put("y", b"1")],
        )
        .await
        .expect("txn");
    for n in ["x", "y"] {
        let got = s.get(&k(n)).await.expect("get").expect("written");
        assert_eq!(got.mod_revision, r, "both writes at one revision");
    }
    // One failing guard: nothing is written.
    assert_eq!(
        s.txn(vec![absent("z"), absent("x")], vec![put("z", b"1")])
            .await,
        Err(StoreError::Conflict { current: None })
    );
    assert!(s.get(&k("z")).await.expect("get").is_none());
    // Guard on a revision, delete another key.
    let r2 = s
        .txn(
            vec![Guard {
                key: k("x"),
                mod_revision: r,
            }],
            vec![put("x", b"2"), TxnOp::Delete { key: k("y") }],
        )
        .await
        .expect("guarded txn");
    assert!(r2 > r);
    assert!(s.get(&k("y")).await.expect("get").is_none());
    assert_eq!(
        s.txn(
            vec![Guard {
                key: k("x"),
                mod_revision: r,
            }],
            vec![put("x", b"3")],
        )
        .await,
        Err(StoreError::Conflict { current: None }),
        "stale revision"
    );
}
