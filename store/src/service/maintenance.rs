//! `etcdserverpb.Maintenance`: Status, Alarm, Hash/HashKV (state hash for cross-member
//! comparison), Snapshot (a backup in the shape `etcdctl snapshot save` checks, see
//! `backup.rs`), MoveLeader (see `Inner::move_leader`) and a no-op Defragment.
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::node::Inner;
use crate::pb::etcdserverpb::maintenance_server::Maintenance;
use crate::pb::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    alarm_request::AlarmAction,
};
use crate::types::{OpReply, WriteOp};

/// The etcd API version this store speaks (clients gate features on it).
const VERSION: &str = "3.4.0";

pub(crate) struct MaintenanceService {
    inner: Arc<Inner>,
}

impl MaintenanceService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// The active alarms of the given type (all for `None`), as this member has applied them.
    fn alarms(&self, of: i32) -> Vec<AlarmMember> {
        self.inner
            .sm
            .read()
            .mvcc
            .alarms()
            .filter(|(_, alarm)| of == AlarmType::None as i32 || *alarm == of)
            .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }
}

/// Bytes per `SnapshotResponse`: well under the 4 MiB a gRPC client accepts by default.
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let r = request.into_inner();
        // Alarms are replicated state: a change goes through the log (etcd proposes it too),
        // a read sees every change committed before it.
        let alarms = match r.action() {
            AlarmAction::Get => {
                self.inner.linearizable_barrier().await?;
                self.alarms(r.alarm)
            }
            action => {
                let op = WriteOp::Alarm {
                    activate: action == AlarmAction::Activate,
                    member: r.member_id,
                    alarm: r.alarm,
                };
                match self.inner.write(op).await?.result? {
                    OpReply::Alarm(changed) => changed
                        .into_iter()
                        .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                        .collect(),
                    other => {
                        return Err(
                            EtcdError::Internal(format!("alarm answered with {other:?}")).into(),
                        );
                    }
                }
            }
        };
        Ok(Response::new(AlarmResponse {
            header: self.inner.header(self.inner.current_revision()),
            alarms,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let m = self.inner.raft.metrics().borrow().clone();
        let is_learner = !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.inner.id);
        let (revision, in_use) = {
            let st = self.inner.sm.read();
            (st.mvcc.revision(), st.mvcc.size())
        };
        // etcd lists each active alarm in its protobuf text form.
        let errors = self
            .alarms(AlarmType::None as i32)
            .iter()
            .map(|a| {
                format!(
                    "memberID:{} alarm:{} ",
                    a.member_id,
                    super::alarm_name(a.alarm)
                )
            })
            .collect();
        Ok(Response::new(StatusResponse {
            header: self.inner.header(revision),
            version: VERSION.to_owned(),
            db_size: self.inner.sm.db_size() as i64,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            errors,
            db_size_in_use: in_use as i64,
            is_learner,
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        // sled compacts its own segments; nothing to do, as etcd answers for an idle backend.
        Ok(Response::new(DefragmentResponse {
            header: self.inner.header(self.inner.current_revision()),
        }))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let st = self.inner.sm.read();
        let hash = st.mvcc.hash_kv(0)?;
        Ok(Response::new(HashResponse {
            header: self.inner.header(st.mvcc.revision()),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let rev = request.into_inner().revision;
        let st = self.inner.sm.read();
        let hash = st.mvcc.hash_kv(rev)?;
        Ok(Response::new(HashKvResponse {
            header: self.inner.header(st.mvcc.revision()),
            hash,
            compact_revision: st.mvcc.compact_revision(),
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// The whole model and its SHA-256 (see [`crate::backup`]), in chunks; what `etcdctl
    /// snapshot save` writes to its file.
    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let shared = self.inner.sm.clone();
        let data = tokio::task::spawn_blocking(move || crate::backup::encode(&shared))
            .await
            .map_err(|e| Status::internal(format!("etcdserver: snapshot task failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("etcdserver: snapshot failed: {e}")))?;
        let header = self.inner.header(self.inner.current_revision());
        let data = bytes::Bytes::from(data);
        let total = data.len();
        let chunks = (0..total).step_by(SNAPSHOT_CHUNK_BYTES).map(move |at| {
            let end = (at + SNAPSHOT_CHUNK_BYTES).min(total);
            Ok(SnapshotResponse {
                header,
                remaining_bytes: (total - end) as u64,
                blob: data.slice(at..end).to_vec(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    /// Sent to the leader, as etcd requires (`etcdctl move-leader` finds it first).
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = request.into_inner().target_id;
        self.inner.move_leader(target).await?;
        Ok(Response::new(MoveLeaderResponse {
            header: self.inner.header(self.inner.current_revision()),
        }))
    }
}
