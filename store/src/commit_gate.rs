//! The leader's commit index as its followers learn it: never past what the leader's own log
//! has synced.
//!
//! The leader reports its appends to openraft before syncing them (so that replication
//! overlaps the sync; see `SledLogStore::append`), which lets openraft count the leader's
//! copy towards a majority early. That is safe as long as nothing acts on such a commit before
//! the leader's copy is synced: the leader's state machine waits for the sync, and this
//! wrapper, around whichever transport the member uses, lowers the `leader_commit` of every
//! AppendEntries to the leader's synced entry (one that carries only the commit waits for the
//! sync instead). So any entry applied anywhere is synced on a majority: on the followers that
//! acknowledged it, and on the leader.
use std::future::Future;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, RPCError, RaftError, ReplicationClosed, StreamingError,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};

use crate::log_store::SledLogStore;
use crate::types::{Member, TypeConfig};

/// How long a commit-only AppendEntries waits for the leader's sync (a sync takes well under
/// a millisecond; heartbeats go every 100 ms by default).
const COMMIT_WAIT: Duration = Duration::from_millis(20);

/// Wraps a transport factory so that its connections gate `leader_commit`.
pub(crate) struct CommitGate<N> {
    inner: N,
    log: SledLogStore,
    /// Off for the planted bug, which must be able to lose acknowledged writes.
    enabled: bool,
}

impl<N> CommitGate<N> {
    pub(crate) fn new(inner: N, log: SledLogStore, enabled: bool) -> Self {
        Self {
            inner,
            log,
            enabled,
        }
    }
}

impl<N: RaftNetworkFactory<TypeConfig>> RaftNetworkFactory<TypeConfig> for CommitGate<N> {
    type Network = GatedConnection<N::Network>;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        GatedConnection {
            inner: self.inner.new_client(target, node).await,
            log: self.log.clone(),
            enabled: self.enabled,
        }
    }
}

/// One connection of a [`CommitGate`].
pub(crate) struct GatedConnection<C> {
    inner: C,
    log: SledLogStore,
    enabled: bool,
}

impl<C: RaftNetwork<TypeConfig>> RaftNetwork<TypeConfig> for GatedConnection<C> {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        if self.enabled {
            if let Some(commit) = rpc.leader_commit
                && rpc.entries.is_empty()
            {
                // Only news of a commit (openraft sends one whenever its commit advances): wait
                // for the leader's sync it depends on, which is already under way, rather than
                // send a lowered commit and leave the followers to learn the rest from the next
                // heartbeat. Bounded, so that a stalled disk does not hold back heartbeats.
                let durability = self.log.durability();
                let _ =
                    tokio::time::timeout(COMMIT_WAIT, durability.wait_synced(commit.index)).await;
            }
            rpc.leader_commit = self.log.durable_commit(rpc.leader_commit);
        }
        self.inner.append_entries(rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>,
    > {
        self.inner.install_snapshot(rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.inner.vote(rpc, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        self.inner
            .full_snapshot(vote, snapshot, cancel, option)
            .await
    }

    fn backoff(&self) -> Backoff {
        self.inner.backoff()
    }
}
