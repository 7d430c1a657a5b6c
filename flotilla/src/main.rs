//! `flotilla`: the one binary, with a subcommand per role, like k3s.
//!
//! Each subcommand lives in its own `cmd_*.rs` file and is a thin call into one library crate;
//! this file only parses the command line and installs logging.
use clap::{Parser, Subcommand};

mod cmd_agent;
mod cmd_bench_cluster;
mod cmd_bench_store;
mod cmd_chaos;
mod cmd_dev;
mod cmd_runtime;
mod cmd_server;
mod cmd_store;

/// mimalloc: cheaper small allocations than glibc malloc for gRPC and Raft message buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A Kubernetes-shaped orchestrator: Raft store, Kubernetes API, wasm pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a member of the Raft-replicated store (etcd v3 API; flags named like etcd's).
    Store(cmd_store::StoreArgs),
    /// Run a control-plane server: store member, Kubernetes API server, scheduler, controllers
    /// (`--join URL --token-file F` adds it to another server's cluster: an HA control plane).
    Server(cmd_server::ServerArgs),
    /// Run a node agent: join a cluster with the server's node token and run its pods.
    Agent(cmd_agent::AgentArgs),
    /// Start a whole single-node cluster in this process, with a demo Deployment of wasm pods.
    Dev(cmd_dev::DevArgs),
    /// Benchmarks that print a table of measured figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a recorded workload with faults against a store cluster and check its invariants.
    Chaos(cmd_chaos::ChaosArgs),
    /// Store backups: `etcdctl snapshot save` writes one, this restores it.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Writes a new store member data dir from a snapshot file (like `etcdctl snapshot
    /// restore`); run it for every member of the new cluster, then start them.
    Restore(cmd_store::RestoreArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Wasm pod runtime: start latency, density, CPU-limit accuracy, stop latency.
    Runtime(cmd_runtime::BenchRuntimeArgs),
    /// API server: mutating latency at 1/100 clients, LIST of 10k pods, watch fan-out.
    Api(cmd_server::BenchApiArgs),
    /// Scheduler throughput with many registered nodes, basic and constrained pods.
    Scheduler(cmd_bench_cluster::BenchSchedulerArgs),
    /// End-to-end wasm pod start-up on a one-node cluster (create → Running seen by a watch).
    Startup(cmd_bench_cluster::BenchStartupArgs),
    /// Whole cluster on hollow nodes: 100k pods placed + Running, node failure, control-plane and agent RSS.
    Cluster(cmd_bench_cluster::BenchClusterArgs),
    /// Store vs etcd 3.4, side by side: puts, txns, ranges, watches, failover, CPU, RSS.
    Store(cmd_bench_store::BenchStoreArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Store(args) => cmd_store::run(args),
        Command::Server(args) => cmd_server::run(args),
        Command::Agent(args) => cmd_agent::run(args),
        Command::Dev(args) => cmd_dev::run(args),
        Command::Bench(bench) => {
            let _machine = cmd_bench_store::exclusive_machine()?;
            match bench {
                BenchCommand::Runtime(args) => cmd_runtime::run_bench(args),
                BenchCommand::Api(args) => cmd_server::run_bench(args),
                BenchCommand::Scheduler(args) => cmd_bench_cluster::run(args),
                BenchCommand::Startup(args) => cmd_bench_cluster::run_startup(args),
                BenchCommand::Cluster(args) => cmd_bench_cluster::run_cluster(args),
                BenchCommand::Store(args) => cmd_bench_store::run(args),
            }
        }
        Command::Chaos(args) => cmd_chaos::run(args),
        Command::Snapshot(SnapshotCommand::Restore(args)) => cmd_store::restore(args),
    }
}
