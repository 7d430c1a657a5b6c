//! `flotilla` subcommand wiring (placeholder until its crate lands).

/// Arguments (placeholder).
#[derive(clap::Args)]
pub(crate) struct BenchRuntimeArgs {}

/// Entry point (placeholder).
pub(crate) fn run_bench(_args: BenchRuntimeArgs) -> anyhow::Result<()> {
    anyhow::bail!("this subcommand is not implemented yet")
}
