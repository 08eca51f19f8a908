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
    /// Destroy the cluster this long after its first launch, and stop
    /// (90s, 45m, 2h...); overrides max_runtime_mins (`run --max-runtime`
    /// passes it, so the limit holds even if `run` itself dies).
    #[arg(long, value_parser = crate::model::parse_duration)]
    pub max_runtime: Option<std::time::Duration>,
}

pub async fn exec(args: ServeArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(&args.log_format);
    let mut cfg = args.config.load()?;
    if let Some(limit) = args.max_runtime {
        cfg.max_runtime = limit;
    }
    crate::serve::serve(cfg).await?;
    Ok(ExitCode::SUCCESS)
}
