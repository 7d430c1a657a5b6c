//! Backups, as etcd operators make them: `Maintenance.Snapshot` (what `etcdctl snapshot save`
//! calls) streams the whole model, and [`restore`] builds a fresh member data dir from such a
//! file (`flotilla snapshot restore`, like `etcdctl snapshot restore`).
//!
//! File: `BACKUP_MAGIC`, the body's length (u64 LE), a snapshot body (see [`crate::snapshot`]:
//! every retained version, the revision, the compaction point and the leases), zeros up to a
//! multiple of 512 bytes, then the SHA-256 of all that. This is the shape of what etcd streams
//! (a database of 512-byte multiples plus its SHA-256), which `etcdctl snapshot save` checks. Restoring checks the hash, decodes the body, and writes it as the
//! member's snapshot at log index 1 of a new cluster whose membership is `--initial-cluster`:
//! every member restored from one file with the same flags starts from the same state and
//! elects a leader as a restarted cluster would. Like etcd's restore, it keeps the data and the
//! revision and starts a new cluster (new member ids under the token given).
use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership};
use sha2::{Digest, Sha256};

use crate::config::StoreConfig;
use crate::error::StoreError;
use crate::log_store::SledLogStore;
use crate::state_machine::{Shared, SledStateMachine};

/// Bytes of the SHA-256 trailer.
const HASH_BYTES: usize = 32;
/// The file's first bytes.
const BACKUP_MAGIC: &[u8; 8] = b"FLBACKUP";
/// What comes before the body: the magic and the body's length.
const PREFIX_BYTES: usize = 16;
/// `etcdctl snapshot save` refuses a stream whose length is not a multiple of this plus the
/// hash (etcd's database is made of pages).
const ALIGN: usize = 512;

/// The backup stream of the model `shared` holds (see the module docs).
pub(crate) fn encode(shared: &Shared) -> std::io::Result<Vec<u8>> {
    let body = shared.backup_body()?;
    let unpadded = PREFIX_BYTES + body.len();
    let mut out = Vec::with_capacity(unpadded.next_multiple_of(ALIGN) + HASH_BYTES);
    out.extend_from_slice(BACKUP_MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(unpadded.next_multiple_of(ALIGN), 0);
    let hash = Sha256::digest(&out);
    out.extend_from_slice(&hash);
    Ok(out)
}

/// The snapshot body inside a backup file's bytes, after checking them.
fn body_of(data: &[u8]) -> Result<&[u8], String> {
    if data.len() < PREFIX_BYTES + HASH_BYTES || data.len() % ALIGN != HASH_BYTES {
        return Err("not a Flotilla snapshot (wrong length; truncated?)".into());
    }
    let (content, hash) = data.split_at(data.len() - HASH_BYTES);
    if Sha256::digest(content).as_slice() != hash {
        return Err("SHA-256 mismatch: the file is damaged".into());
    }
    if !content.starts_with(BACKUP_MAGIC) {
        return Err(
            "not a Flotilla snapshot (an etcd snapshot cannot be restored into Flotilla)".into(),
        );
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&content[8..PREFIX_BYTES]);
    let len = usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX);
    content
        .get(PREFIX_BYTES..PREFIX_BYTES.saturating_add(len))
        .ok_or_else(|| "body length past the end of the file".into())
}

/// What [`restore`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The store revision the snapshot was taken at (kept by the restored cluster).
    pub revision: i64,
    /// Keys with a live value at that revision.
    pub keys: usize,
    /// Members of the new cluster.
    pub members: usize,
}

fn bad_file(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Restore(format!("snapshot file {}: {why}", path.display()))
}

/// Writes a new data dir for member `config.name` of the cluster `config.initial_cluster`
/// (token `config.initial_cluster_token`) holding the backup at `file`. The data dir must not
/// exist yet (or be empty). Start the member with the same flags afterwards.
pub async fn restore(file: &Path, config: &StoreConfig) -> Result<Restored, StoreError> {
    config.validate()?;
    let Some(my_url) = config
        .initial_cluster
        .iter()
        .find(|(n, _)| *n == config.name)
        .map(|(_, u)| u.clone())
    else {
        return Err(StoreError::Restore(format!(
            "member {:?} is not in --initial-cluster; list every member of the new cluster, this one included",
            config.name
        )));
    };
    let data = std::fs::read(file).map_err(|e| bad_file(file, e))?;
    let body = body_of(&data).map_err(|e| bad_file(file, e))?;
    let model = crate::snapshot::decode_body(body).map_err(|e| bad_file(file, e))?;
    let revision = model.revision();
    // Every key (etcd's `--from-key ""`): a count-only range.
    let everything = crate::pb::etcdserverpb::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        ..Default::default()
    };
    let keys = model
        .range(&everything)
        .map_or(0, |r| usize::try_from(r.count).unwrap_or(0));

    let dir = &config.data_dir;
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(StoreError::Restore(format!(
            "data dir {} already exists and is not empty; restore into a new one",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
        path: dir.clone(),
        source: sled::Error::Io(e),
    })?;
    let db = crate::node::open_db(dir).await?;
    crate::node::check_identity(&db, config)?;

    let nodes = config.initial_members();
    let voters: BTreeSet<u64> = nodes.keys().copied().collect();
    let members = nodes.len();
    // Index 1 of term 0: before any entry a leader of the new cluster writes.
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), 1);
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes)),
        snapshot_id: format!("restored-{revision}"),
    };
    let raft_err =
        |e: &dyn std::fmt::Display| StoreError::Restore(format!("{}: {e}", dir.display()));
    let mut sm = SledStateMachine::open(&db, dir)?;
    sm.install_snapshot(&meta, Box::new(Cursor::new(body.to_vec())))
        .await
        .map_err(|e| raft_err(&e))?;
    // The log starts after the snapshot, as if everything before it had been purged.
    let mut log = SledLogStore::new(&db, dir).map_err(|source| StoreError::Open {
        path: dir.clone(),
        source,
    })?;
    log.purge(log_id).await.map_err(|e| raft_err(&e))?;
    db.flush_async().await.map_err(|source| StoreError::Open {
        path: dir.clone(),
        source,
    })?;
    tracing::info!(member = %config.name, url = %my_url, revision, keys, members, data_dir = %dir.display(), "restored a snapshot");
    Ok(Restored {
        revision,
        keys,
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let unpadded = PREFIX_BYTES + body.len();
        let mut out = BACKUP_MAGIC.to_vec();
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(body);
        out.resize(unpadded.next_multiple_of(ALIGN), 0);
        let hash = Sha256::digest(&out);
        out.extend_from_slice(&hash);
        out
    }

    #[test]
    fn finds_the_body_and_refuses_damage() {
        let file = framed(b"body bytes");
        assert_eq!(file.len() % ALIGN, HASH_BYTES);
        assert_eq!(body_of(&file), Ok(&b"body bytes"[..]));

        let mut flipped = file.clone();
        flipped[20] ^= 1;
        assert!(body_of(&flipped).unwrap_err().contains("SHA-256"));
        assert!(
            body_of(&file[..file.len() - 1])
                .unwrap_err()
                .contains("length")
        );

        // The shape etcd streams (pages plus a hash), but not ours.
        let mut etcd = vec![0u8; ALIGN];
        let hash = Sha256::digest(&etcd);
        etcd.extend_from_slice(&hash);
        assert!(body_of(&etcd).unwrap_err().contains("etcd snapshot"));

        // A length that points past the end.
        let mut long = BACKUP_MAGIC.to_vec();
        long.extend_from_slice(&u64::MAX.to_le_bytes());
        long.resize(ALIGN, 0);
        let hash = Sha256::digest(&long);
        long.extend_from_slice(&hash);
        assert!(body_of(&long).unwrap_err().contains("past the end"));
    }
}
