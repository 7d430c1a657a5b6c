//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::check_size;
use crate::error::EtcdError;
use crate::mvcc::check_txn;
use crate::node::Inner;
use crate::pb::etcdserverpb::kv_server::Kv;
use crate::pb::etcdserverpb::{
    AlarmType, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
    request_op,
};
use crate::types::{OpReply, Reply, WriteOp};

pub(crate) struct KvService {
    inner: Arc<Inner>,
}

impl KvService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// Space quota: a write that would exceed it raises the NOSPACE alarm through the log, as
    /// etcd does, and while the alarm is active every member refuses writes that add data
    /// (checked here, and again when the entry is applied).
    async fn check_quota(&self, add: usize) -> Result<(), EtcdError> {
        let (size, nospace) = {
            let st = self.inner.sm.read();
            (st.mvcc.size(), st.mvcc.nospace())
        };
        if nospace {
            return Err(EtcdError::NoSpace);
        }
        if size + add as u64 > self.inner.tunables.quota_backend_bytes {
            tracing::warn!(
                size,
                quota = self.inner.tunables.quota_backend_bytes,
                "space quota exceeded; raising NOSPACE alarm"
            );
            let raise = WriteOp::Alarm {
                activate: true,
                member: self.inner.id,
                alarm: AlarmType::Nospace as i32,
            };
            if let Err(e) = self.inner.write(raise).await {
                tracing::warn!(error = %e, "could not raise the NOSPACE alarm");
            }
            return Err(EtcdError::NoSpace);
        }
        Ok(())
    }
}

fn txn_has_write(ops: &[RequestOp]) -> bool {
    ops.iter().any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_) | request_op::Request::RequestDeleteRange(_)) => {
            true
        }
        Some(request_op::Request::RequestTxn(t)) => {
            txn_has_write(&t.success) || txn_has_write(&t.failure)
        }
        _ => false,
    })
}

fn txn_all_serializable(ops: &[RequestOp]) -> bool {
    ops.iter().all(|op| match &op.request {
        Some(request_op::Request::RequestRange(r)) => r.serializable,
        Some(request_op::Request::RequestTxn(t)) => {
            txn_all_serializable(&t.success) && txn_all_serializable(&t.failure)
        }
        _ => true,
    })
}

fn txn_has_put(ops: &[RequestOp]) -> bool {
    ops.iter().any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => {
            txn_has_put(&t.success) || txn_has_put(&t.failure)
        }
        _ => false,
    })
}

/// Decodes an applied op's reply body and stamps the header.
pub(crate) fn unpack<T: Message + Default>(
    inner: &Inner,
    reply: Reply,
    pick: impl FnOnce(OpReply) -> Option<Vec<u8>>,
    set_header: impl FnOnce(&mut T, Option<crate::pb::etcdserverpb::ResponseHeader>),
) -> Result<T, Status> {
    let body = reply.result.map_err(Status::from)?;
    let bytes = pick(body).ok_or_else(|| Status::internal("mismatched reply"))?;
    let mut msg = T::decode(bytes.as_slice()).map_err(|e| Status::internal(e.to_string()))?;
    set_header(&mut msg, inner.header(reply.revision));
    Ok(msg)
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        if r.serializable {
            self.inner.local_read_barrier().await?;
        } else {
            self.inner.linearizable_barrier().await?;
        }
        let st = self.inner.sm.read();
        let mut resp = st.mvcc.range(&r)?;
        resp.header = self.inner.header(st.mvcc.revision());
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = request.into_inner();
        check_size(&self.inner, r.encoded_len())?;
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_quota(r.key.len() + r.value.len()).await?;
        let reply = self.inner.write(WriteOp::Put(r.encode_to_vec())).await?;
        let resp = unpack(
            &self.inner,
            reply,
            |b| match b {
                OpReply::Put(b) => Some(b),
                _ => None,
            },
            |m: &mut PutResponse, h| m.header = h,
        )?;
        Ok(Response::new(resp))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = request.into_inner();
        check_size(&self.inner, r.encoded_len())?;
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        let reply = self
            .inner
            .write(WriteOp::DeleteRange(r.encode_to_vec()))
            .await?;
        let resp = unpack(
            &self.inner,
            reply,
            |b| match b {
                OpReply::DeleteRange(b) => Some(b),
                _ => None,
            },
            |m: &mut DeleteRangeResponse, h| m.header = h,
        )?;
        Ok(Response::new(resp))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = request.into_inner();
        let len = r.encoded_len();
        check_size(&self.inner, len)?;
        check_txn(&r, self.inner.tunables.max_txn_ops)?;
        if !txn_has_write(&r.success) && !txn_has_write(&r.failure) {
            // Read-only: served like a Range (no Raft entry, no revision), as etcd does.
            let serializable = txn_all_serializable(&r.success)
                && txn_all_serializable(&r.failure)
                && (!r.success.is_empty() || !r.failure.is_empty());
            if serializable {
                self.inner.local_read_barrier().await?;
            } else {
                self.inner.linearizable_barrier().await?;
            }
            let st = self.inner.sm.read();
            let mut resp = st.mvcc.read_txn(&r)?;
            resp.header = self.inner.header(st.mvcc.revision());
            return Ok(Response::new(resp));
        }
        if txn_has_put(&r.success) || txn_has_put(&r.failure) {
            self.check_quota(len).await?;
        }
        let reply = self.inner.write(WriteOp::Txn(r.encode_to_vec())).await?;
        let resp = unpack(
            &self.inner,
            reply,
            |b| match b {
                OpReply::Txn(b) => Some(b),
                _ => None,
            },
            |m: &mut TxnResponse, h| m.header = h,
        )?;
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let r = request.into_inner();
        let reply = self.inner.write(WriteOp::Compact(r.revision)).await?;
        reply.result.map_err(Status::from)?;
        Ok(Response::new(CompactionResponse {
            header: self.inner.header(reply.revision),
        }))
    }
}
