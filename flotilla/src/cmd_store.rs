//! `flotilla` subcommand wiring (placeholder until its crate lands).

/// Arguments (placeholder).
#[derive(clap::Args)]
pub(crate) struct StoreArgs {}

/// Entry point (placeholder).
pub(crate) fn run(_args: StoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("this subcommand is not implemented yet")
}
