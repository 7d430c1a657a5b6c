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

/// Starts an in-process `n`-member Flotilla store cluster on loopback ports chosen by the OS,
/// member `i` keeping its data under `dir/m<i>` (benchmarks, tests).
pub async fn start_cluster(dir: &Path, n: usize) -> Result<Vec<NodeHandle>, store::StoreError> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        let bind = |what: &'static str| async move {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|source| store::StoreError::Bind {
                    addr: ([127, 0, 0, 1], 0).into(),
                    what,
                    source,
                })
        };
        listeners.push((bind("client").await?, bind("peer").await?));
    }
    let addr = |l: &tokio::net::TcpListener, what: &'static str| {
        l.local_addr().map_err(|source| store::StoreError::Bind {
            addr: ([127, 0, 0, 1], 0).into(),
            what,
            source,
        })
    };
    let mut initial = Vec::new();
    for (i, (_, peer)) in listeners.iter().enumerate() {
        initial.push((format!("m{i}"), format!("http://{}", addr(peer, "peer")?)));
    }
    let mut starts = Vec::new();
    for (i, (client, peer)) in listeners.into_iter().enumerate() {
        let config = StoreConfig {
            name: format!("m{i}"),
            data_dir: dir.join(format!("m{i}")),
            listen_client_addr: addr(&client, "client")?,
            listen_peer_addr: addr(&peer, "peer")?,
            initial_cluster: initial.clone(),
            ..StoreConfig::default()
        };
        starts.push(Node::start_with_listeners(config, client, peer));
    }
    // Members start together: each waits for the others during the first election.
    futures::future::try_join_all(starts).await
}
