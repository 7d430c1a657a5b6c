//! gRPC services: one file per etcd service, plus the internal peer service.
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::error::EtcdError;
use crate::node::Inner;
use crate::pb::etcdserverpb::cluster_server::ClusterServer;
use crate::pb::etcdserverpb::kv_server::KvServer;
use crate::pb::etcdserverpb::lease_server::LeaseServer;
use crate::pb::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::pb::etcdserverpb::watch_server::WatchServer;
use crate::pb::raftpb::raft_peer_server::RaftPeerServer;

mod authority;
mod cluster;
mod http;
mod kv;
mod lease;
mod maintenance;
mod peer;
mod watch;

/// gRPC framing overhead allowed on top of the request limit (etcd uses the same margin).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Starts the client (etcd API) and peer servers on the member's task tracker.
pub(crate) fn serve(inner: Arc<Inner>, client: TcpListener, peer: TcpListener) {
    let max = inner.tunables.max_request_bytes + GRPC_OVERHEAD_BYTES;
    // The standard gRPC health service, as etcd registers it: the server ("") is SERVING while
    // the member runs (like etcd 3.4, not tied to having a leader, so a liveness probe does
    // not restart members during a partition), NOT_SERVING once it shuts down.
    let (health, health_service) = tonic_health::server::health_reporter();
    let client_router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(
            KvServer::new(kv::KvService::new(inner.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            WatchServer::new(watch::WatchService::new(inner.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            LeaseServer::new(lease::LeaseService::new(inner.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            ClusterServer::new(cluster::ClusterService::new(inner.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            MaintenanceServer::new(maintenance::MaintenanceService::new(inner.clone()))
                .max_decoding_message_size(max),
        );
    let peer_router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            RaftPeerServer::new(peer::PeerService::new(inner.clone()))
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
    let cancel = inner.cancel.clone();
    inner.tracker.spawn(async move {
        cancel.cancelled().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    let cancel = inner.cancel.clone();
    let tracker = inner.tracker.clone();
    let http_inner = inner.clone();
    inner.tracker.spawn(async move {
        let incoming = authority::incoming(client, cancel.clone(), &tracker, move |tcp| {
            http::serve(http_inner.clone(), tcp)
        });
        let res = client_router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled())
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "client server failed");
        }
    });
    let cancel = inner.cancel.clone();
    inner.tracker.spawn(async move {
        // `Server::tcp_nodelay` only covers listeners tonic binds itself, not an incoming
        // stream: without this, Nagle held every AppendEntries answer for the peer's 40 ms
        // delayed ACK about once a second, which was the put p99.
        let incoming = TcpListenerStream::new(peer).map(|conn| {
            conn.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        });
        let res = peer_router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled())
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "peer server failed");
        }
    });
}

/// An alarm type's name as etcd prints it (`NOSPACE`), or its number if unknown.
pub(crate) fn alarm_name(alarm: i32) -> String {
    crate::pb::etcdserverpb::AlarmType::try_from(alarm)
        .map_or_else(|_| alarm.to_string(), |t| t.as_str_name().to_owned())
}

/// Rejects requests above the configured size with etcd's error.
pub(crate) fn check_size(inner: &Inner, len: usize) -> Result<(), EtcdError> {
    if len > inner.tunables.max_request_bytes {
        return Err(EtcdError::RequestTooLarge);
    }
    Ok(())
}
