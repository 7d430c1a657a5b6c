//! `flotilla`: one binary with subcommands, like k3s.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "A Kubernetes-shaped orchestrator with a Raft store and wasm pods")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
