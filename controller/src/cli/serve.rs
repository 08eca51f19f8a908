//! `serve`: run the control plane in the foreground.

use super::ConfigArgs;
use clap::Args;
use std::process::ExitCode;

/// Run the control plane in the foreground: launch and keep the cluster at
/// size, replace dead nodes. Logs go to stderr (RUST_LOG sets the level).
/// Nodes keep running when it stops; `destroy` removes them.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

pub async fn exec(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let cfg = args.config.load()?;
    crate::serve::serve(cfg).await?;
    Ok(ExitCode::SUCCESS)
}
