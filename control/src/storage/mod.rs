//! The API server's port to its key-value store, shaped around Kubernetes semantics.
//!
//! Keys are strings like `/registry/core/pods/default/web`; values are the JSON objects with
//! `metadata.resourceVersion` removed (it is the key's mod revision, filled in on read).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

pub mod compactor;
pub mod embedded;
mod mem;
mod remote;

pub use mem::MemStore;
pub use remote::RemoteStore;

/// A store revision (etcd's `mod_revision`), the source of `metadata.resourceVersion`.
pub type Revision = i64;

/// One stored value with the revisions the API server needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// Full key.
    pub key: String,
    /// Stored bytes (JSON).
    pub value: Bytes,
    /// Revision of the last change to this key.
    pub mod_revision: Revision,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Key created or changed; `prev` is the value before (absent on create).
    Put {
        /// New value.
        kv: Versioned,
        /// Value before the change, if the key existed.
        prev: Option<Versioned>,
    },
    /// Key deleted at `revision`; `prev` is the deleted value.
    Delete {
        /// Deleted key.
        key: String,
        /// Revision of the deletion.
        revision: Revision,
        /// Value before the deletion, if the store knows it.
        prev: Option<Versioned>,
    },
}

impl WatchEvent {
    /// Revision at which the event happened.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A condition of [`Store::txn`]: the key's mod revision equals `mod_revision` (0: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// Full key.
    pub key: String,
    /// Expected mod revision; 0 means the key must not exist.
    pub mod_revision: Revision,
}

/// One write of [`Store::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Sets a key.
    Put {
        /// Full key.
        key: String,
        /// New value.
        value: Bytes,
    },
    /// Removes a key (nothing happens if it is absent).
    Delete {
        /// Full key.
        key: String,
    },
}

/// What [`Store::probe`] saw under a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixProbe {
    /// Keys under the prefix now.
    pub count: usize,
    /// Whether any of them was written after the probed revision.
    pub written_after: bool,
    /// The store revision of the read.
    pub revision: Revision,
}

/// Stream of watch events in revision order.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Failures of a [`Store`] call; variants say what the caller can do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The key does not exist.
    #[error("key not found")]
    NotFound,
    /// `create` found the key already present.
    #[error("key already exists")]
    AlreadyExists,
    /// `update`/`delete` expected another revision; `current` is the value now stored.
    #[error("revision conflict")]
    Conflict {
        /// The current value, if the key still exists.
        current: Option<Versioned>,
    },
    /// A watch asked for a revision older than the store keeps.
    #[error("revision {requested} compacted (oldest kept {oldest})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        oldest: Revision,
    },
    /// The store cannot be reached or has no quorum: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else (corrupt data, protocol errors).
    #[error("store failure: {0}")]
    Internal(String),
}

/// The API server's storage port (house style §7.1). Implementations: [`MemStore`] and
/// `RemoteStore` (etcd v3).
pub trait Store: Clone + Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, StoreError>> + Send;
    /// Reads every key under `prefix` (sorted by key) and the store revision of the read.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<Versioned>, Revision), StoreError>> + Send;
    /// Creates a key that must not exist; returns its revision.
    fn create(
        &self,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;
    /// Replaces a key whose mod revision must equal `expected`.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;
    /// Deletes a key, if `expected` is set only at that mod revision; returns the deletion revision.
    fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;
    /// Applies every op at one new revision if every guard holds (an etcd `Txn`); when a
    /// guard fails nothing is written and the answer is `Conflict { current: None }`.
    /// Used where one API write must change several keys together: a Service and its
    /// address allocations, an object and the ResourceQuota usage charged for it.
    fn txn(
        &self,
        guards: Vec<Guard>,
        ops: Vec<TxnOp>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;
    /// Counts the keys under `prefix` and tells whether any was written after `after`, without
    /// reading values. Equal counts and no later write mean nothing under `prefix` changed
    /// since `after` (every create or update after it would show, and deletions alone would
    /// lower the count): the API server's watch cache uses it to serve consistent lists.
    fn probe(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<PrefixProbe, StoreError>> + Send;
    /// Streams changes under `prefix` with revision > `after`.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;
    /// Drops the history up to `revision` (an etcd `Compact`): watches can no longer start
    /// at or before it; current values are kept. Compacting to a revision already compacted
    /// is not an error.
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Whether the store answers (for `/readyz`).
    fn ready(&self) -> impl Future<Output = bool> + Send;
}

#[cfg(test)]
pub(crate) mod conformance;
