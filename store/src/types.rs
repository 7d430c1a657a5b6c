//! openraft type configuration and the commands replicated through the log.
use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::error::EtcdError;

/// A cluster member as recorded in the Raft membership (openraft's `Node`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Member name; empty until a member added with `member add` starts and publishes it.
    pub name: String,
    /// URL of the member's peer (Raft) endpoint.
    pub peer_url: String,
    /// URL of the member's client (etcd API) endpoint; empty until published.
    pub client_url: String,
    /// Added as a voter: the leader promotes it from learner once it has caught up.
    pub promote_when_ready: bool,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_url)
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of the store.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// One mutating etcd request. Protobuf bodies stay prost-encoded: the log stores the client's
/// own bytes and the state machine decodes them once, at apply time. They are serde bytes:
/// postcard then copies them whole instead of visiting them byte by byte (a few per cent of
/// a member's CPU under puts), in the same encoding (a length, then the bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// `etcdserverpb.PutRequest`.
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `etcdserverpb.DeleteRangeRequest`.
    DeleteRange(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `etcdserverpb.TxnRequest`.
    Txn(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Compact history below this revision.
    Compact(i64),
    /// Create a lease.
    LeaseGrant {
        /// Lease id (chosen by the proposer when the client asked for 0).
        id: i64,
        /// TTL in seconds.
        ttl: i64,
    },
    /// Revoke a lease (client request or leader-decided expiry) and delete its keys.
    LeaseRevoke {
        /// Lease id.
        id: i64,
    },
    /// Raise or clear an alarm (etcd's `AlarmRequest`; the NOSPACE alarm caps writes on
    /// every member). Last, so log entries written before it existed still decode.
    Alarm {
        /// Raise (`true`) or clear.
        activate: bool,
        /// The member the alarm is about.
        member: u64,
        /// etcd's `AlarmType` number.
        alarm: i32,
    },
}

/// The application data of one Raft entry: a group-committed batch of write requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Applied in order, each with its own revision.
    pub ops: Vec<WriteOp>,
}

/// Result of one [`WriteOp`]: responses are prost-encoded without header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum OpReply {
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    DeleteRange(#[serde(with = "serde_bytes")] Vec<u8>),
    Txn(#[serde(with = "serde_bytes")] Vec<u8>),
    Compact,
    LeaseGrant,
    LeaseRevoke,
    /// The alarms that changed, `(member id, AlarmType)`.
    Alarm(Vec<(u64, i32)>),
}

/// Outcome of one op, with the store revision right after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub(crate) revision: i64,
    pub(crate) result: Result<OpReply, EtcdError>,
}

/// The state machine's answer to one Raft entry: one [`Reply`] per op of the [`Request`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// In op order.
    pub replies: Vec<Reply>,
}

/// Compact binary encoding used for log entries, records, snapshots and peer messages.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(v)
}

/// Inverse of [`encode`].
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

/// The log id of an encoded Raft entry, without decoding its payload (a batch of writes):
/// openraft's `Entry` serializes `log_id` first, and postcard writes fields in order.
pub(crate) fn entry_log_id(b: &[u8]) -> Result<openraft::LogId<u64>, postcard::Error> {
    postcard::take_from_bytes(b).map(|(id, _rest)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entrys_log_id_reads_without_its_payload() {
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
        let log_id = LogId::new(CommittedLeaderId::new(7, 3), 42);
        let entries: [Entry<TypeConfig>; 2] = [
            Entry {
                log_id,
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id,
                payload: EntryPayload::Normal(Request {
                    ops: vec![WriteOp::Put(vec![9; 300]), WriteOp::Txn(vec![1; 20])],
                }),
            },
        ];
        for entry in entries {
            let bytes = encode(&entry).expect("encode");
            assert_eq!(entry_log_id(&bytes).expect("log id"), log_id);
            assert_eq!(
                entry_log_id(&bytes).expect("log id"),
                decode::<Entry<TypeConfig>>(&bytes).expect("decode").log_id
            );
        }
    }

    /// `WriteOp` as logs, snapshots and peers encoded it before its bodies were serde bytes.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum WriteOpAsSequence {
        Put(Vec<u8>),
        DeleteRange(Vec<u8>),
        Txn(Vec<u8>),
    }

    #[test]
    fn serde_bytes_bodies_keep_the_encoding_of_byte_sequences() {
        let body: Vec<u8> = (0..=255).chain(0..40).collect();
        let cases = [
            (
                WriteOp::Put(body.clone()),
                WriteOpAsSequence::Put(body.clone()),
            ),
            (
                WriteOp::DeleteRange(vec![]),
                WriteOpAsSequence::DeleteRange(vec![]),
            ),
            (
                WriteOp::Txn(vec![7; 200]),
                WriteOpAsSequence::Txn(vec![7; 200]),
            ),
        ];
        for (op, old) in cases {
            let new_bytes = encode(&op).expect("encode");
            let old_bytes = encode(&old).expect("encode");
            assert_eq!(new_bytes, old_bytes, "{op:?}");
            assert_eq!(decode::<WriteOp>(&old_bytes).expect("decode"), op);
            assert_eq!(
                decode::<WriteOpAsSequence>(&new_bytes).expect("decode"),
                old
            );
        }
    }
}
