//! `etcdserverpb.Cluster`: MemberList, MemberAdd (learner first), MemberRemove, MemberPromote,
//! MemberUpdate (a new peer URL; the member keeps its id).
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::node::{ForwardRequest, ForwardResponse, Inner};
use crate::pb::etcdserverpb::cluster_server::Cluster;
use crate::pb::etcdserverpb::{
    Member as PbMember, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};

pub(crate) struct ClusterService {
    inner: Arc<Inner>,
}

impl ClusterService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    fn members(&self) -> Vec<PbMember> {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| PbMember {
                id: *id,
                name: n.name.clone(),
                peer_ur_ls: vec![n.peer_url.clone()],
                client_ur_ls: if n.client_url.is_empty() {
                    Vec::new()
                } else {
                    vec![n.client_url.clone()]
                },
                is_learner: !voters.contains(id),
            })
            .collect()
    }

    /// Waits (briefly) until this member has applied a membership change made on the leader.
    async fn await_local(&self, pred: impl Fn(&[PbMember]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline && !pred(&self.members()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn header(&self) -> Option<crate::pb::etcdserverpb::ResponseHeader> {
        self.inner.header(self.inner.current_revision())
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let r = request.into_inner();
        let Some(url) = r.peer_ur_ls.first().cloned() else {
            return Err(Status::invalid_argument(
                "etcdserver: member peer URLs not provided",
            ));
        };
        if !url.starts_with("http://") {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid peer URL {url:?}"
            )));
        }
        let res = self
            .inner
            .leader_call(ForwardRequest::MemberAdd {
                peer_url: url.clone(),
                learner: r.is_learner,
            })
            .await?;
        let ForwardResponse::MemberAdded(id) = res else {
            return Err(Status::internal("unexpected reply"));
        };
        self.await_local(|ms| ms.iter().any(|m| m.id == id)).await;
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: Some(PbMember {
                id,
                name: String::new(),
                peer_ur_ls: vec![url],
                client_ur_ls: Vec::new(),
                is_learner: r.is_learner,
            }),
            members: self.members(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        self.inner
            .leader_call(ForwardRequest::MemberRemove(id))
            .await?;
        self.await_local(|ms| ms.iter().all(|m| m.id != id)).await;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let r = request.into_inner();
        let url = match r.peer_ur_ls.as_slice() {
            [url] => url.clone(),
            [] => {
                return Err(Status::invalid_argument(
                    "etcdserver: member peer URLs not provided",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "etcdserver: a flotilla member has exactly one peer URL",
                ));
            }
        };
        if !url.starts_with("http://") {
            return Err(Status::invalid_argument(format!(
                "etcdserver: invalid peer URL {url:?}"
            )));
        }
        self.inner
            .leader_call(ForwardRequest::MemberUpdate {
                id: r.id,
                peer_url: url.clone(),
            })
            .await?;
        self.await_local(|ms| {
            ms.iter()
                .any(|m| m.id == r.id && m.peer_ur_ls == [url.clone()])
        })
        .await;
        Ok(Response::new(MemberUpdateResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        self.inner
            .leader_call(ForwardRequest::MemberPromote(id))
            .await?;
        self.await_local(|ms| ms.iter().any(|m| m.id == id && !m.is_learner))
            .await;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members: self.members(),
        }))
    }
}
