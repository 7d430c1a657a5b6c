//! Compiles the etcd v3 subset and the internal peer protocol with protox (no protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(
        [
            "mvccpb/kv.proto",
            "etcdserverpb/rpc.proto",
            "flotilla/raft/v1/raft.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
