//! `flotilla` subcommand wiring (placeholder until its crate lands).

/// Arguments (placeholder).
#[derive(clap::Args)]
pub(crate) struct ServerArgs {}

/// Entry point (placeholder).
pub(crate) fn run(_args: ServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("this subcommand is not implemented yet")
}
