//! Errors: [`StoreError`] for starting and running a member, [`EtcdError`] for the etcd wire.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Failure to start or keep running a store member.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be opened (locked by another process, corrupt, unreadable).
    #[error("failed to open data dir {path}")]
    Open {
        /// The data directory.
        path: PathBuf,
        /// What sled reported.
        #[source]
        source: sled::Error,
    },
    /// Another process (or a member not yet shut down) holds the data directory.
    #[error("data dir {path} is in use by another process (is another member running on it?)")]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The data directory was written by a different member or cluster.
    #[error(
        "data dir {path} belongs to member {found_member:?} of cluster {found_cluster:?}, \
         but this is member {want_member:?} of cluster {want_cluster:?}; \
         use another --data-dir or the matching --name/--initial-cluster-token"
    )]
    IdentityMismatch {
        /// The data directory.
        path: PathBuf,
        /// Member name stored in the data dir.
        found_member: String,
        /// Cluster token stored in the data dir.
        found_cluster: String,
        /// Configured member name.
        want_member: String,
        /// Configured cluster token.
        want_cluster: String,
    },
    /// A listen address could not be bound.
    #[error("failed to listen on {addr} ({what})")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Client or peer.
        what: &'static str,
        /// The OS error (for example "address in use").
        #[source]
        source: std::io::Error,
    },
    /// Raft could not be created or initialized.
    #[error("raft: {0}")]
    Raft(String),
    /// A backup could not be restored (see [`crate::restore`]).
    #[error("cannot restore: {0}")]
    Restore(String),
    /// Persisted data could not be decoded.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
}

/// An error with an exact etcd gRPC code and message (clients match on the text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: request timed out, possibly due to connection lost")]
    TimeoutDueToConnectionLost,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    #[error("{0}")]
    Internal(String),
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
}

impl From<EtcdError> for tonic::Status {
    fn from(e: EtcdError) -> Self {
        use tonic::Code;
        let code = match &e {
            EtcdError::EmptyKey
            | EtcdError::KeyNotFound
            | EtcdError::ValueProvided
            | EtcdError::LeaseProvided
            | EtcdError::TooManyOps
            | EtcdError::DuplicateKey
            | EtcdError::RequestTooLarge => Code::InvalidArgument,
            EtcdError::Compacted | EtcdError::FutureRev | EtcdError::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            EtcdError::NoSpace => Code::ResourceExhausted,
            EtcdError::LeaseNotFound | EtcdError::MemberNotFound => Code::NotFound,
            EtcdError::LeaseExist
            | EtcdError::NotLeader
            | EtcdError::PeerUrlExist
            | EtcdError::LearnerNotReady
            | EtcdError::MemberNotLearner
            | EtcdError::BadLeaderTransferee => Code::FailedPrecondition,
            EtcdError::NoLeader
            | EtcdError::LeaderChanged
            | EtcdError::Timeout
            | EtcdError::TimeoutDueToConnectionLost
            | EtcdError::Stopped
            | EtcdError::NotEnoughStartedMembers
            | EtcdError::Unhealthy
            | EtcdError::LeaderTransferTimeout => Code::Unavailable,
            EtcdError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_and_messages_match_etcd() {
        let s = tonic::Status::from(EtcdError::Compacted);
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s = tonic::Status::from(EtcdError::LeaseNotFound);
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "etcdserver: requested lease not found");
        let s = tonic::Status::from(EtcdError::RequestTooLarge);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = tonic::Status::from(EtcdError::BadLeaderTransferee);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "etcdserver: bad leader transferee");
        let s = tonic::Status::from(EtcdError::LeaderTransferTimeout);
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
