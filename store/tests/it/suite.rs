use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageError, StorageIOError};
use store::{SledLogStore, SledStateMachine, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, SledStateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLogStore, SledStateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        // As a member opens it: no background flusher.
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let log = SledLogStore::new(&db, dir.path()).expect("log store");
        let sm = SledStateMachine::open(&db, dir.path())
            .map_err(|e| StorageError::from(StorageIOError::read(AnyError::error(e))))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_on_sled() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}
