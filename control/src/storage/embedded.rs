//! An embedded one-member Flotilla store for `flotilla server --store=embedded` and tests.

use std::path::Path;

use store::{Node, NodeHandle, StoreConfig};

/// Starts a one-member store with its data under `dir`, on loopback ports chosen by the OS.
pub async fn start(dir: &Path) -> Result<NodeHandle, store::StoreError> {
    start_on(dir, "127.0.0.1:0", "127.0.0.1:0").await
}

/// Like [`start`] with explicit client and peer listen addresses.
pub async fn start_on(
    dir: &Path,
    client: &str,
    peer: &str,
) -> Result<NodeHandle, store::StoreError> {
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            let parsed: std::net::SocketAddr =
                addr.parse().map_err(|e| store::StoreError::Bind {
                    addr: ([127, 0, 0, 1], 0).into(),
                    what: "client",
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{addr}: {e}"),
                    ),
                })?;
            tokio::net::TcpListener::bind(parsed)
                .await
                .map_err(|source| store::StoreError::Bind {
                    addr: parsed,
                    what: "client",
                    source,
                })
        }
    };
    let client = bind(client).await?;
    let peer = bind(peer).await?;
    let peer_addr = peer
        .local_addr()
        .map_err(|source| store::StoreError::Bind {
            addr: ([127, 0, 0, 1], 0).into(),
            what: "peer",
            source,
        })?;
    let client_addr = client
        .local_addr()
        .map_err(|source| store::StoreError::Bind {
            addr: ([127, 0, 0, 1], 0).into(),
            what: "client",
            source,
        })?;
    let config = StoreConfig {
        name: "embedded".into(),
        data_dir: dir.to_path_buf(),
        listen_client_addr: client_addr,
        listen_peer_addr: peer_addr,
        initial_cluster: vec![("embedded".into(), format!("http://{peer_addr}"))],
        ..StoreConfig::default()
    };
    Node::start_with_listeners(config, client, peer).await
}
