//! The `ddisco-controller` command line: one module per subcommand, each with
//! its clap arguments and an `exec` that hands off to the library.

pub mod bake;
pub mod client;
pub mod completions;
pub mod credentials;
pub mod destroy;
pub mod init;
pub mod logs;
pub mod run;
pub mod scale;
pub mod security_group;
pub mod serve;
pub mod status;

use crate::config::{Config, ConfigError};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub const EXIT_HELP: &str = "\
Exit codes:
  0  success
  1  failure (the message says what failed)
  2  bad configuration or usage (the message names the file and key)
  3  no controller is running for this state directory
  4  timed out waiting (scale --wait, run)
  5  run: the spend cap (max_spend_usd) was reached
  run otherwise exits with its COMMAND's code";

#[derive(Debug, Parser)]
#[command(
    name = "ddisco-controller",
    version,
    about = "Run disposable Disco/Dask map/reduce clusters on spot capacity (or locally)",
    long_about = "Run disposable map/reduce clusters: one master and N slaves, kept at the size \
                  you ask for, replaced when they die, thrown away when you are done.\n\n\
                  Start with `ddisco-controller init > ddisco.toml`, then `serve`.",
    after_help = EXIT_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Init(init::InitArgs),
    Serve(serve::ServeArgs),
    Bake(bake::BakeArgs),
    Scale(scale::ScaleArgs),
    Run(run::RunArgs),
    Status(status::StatusArgs),
    Destroy(destroy::DestroyArgs),
    Credentials(credentials::CredentialsArgs),
    Logs(logs::LogsArgs),
    SecurityGroup(security_group::SecurityGroupArgs),
    Completions(completions::CompletionsArgs),
}

/// Options every command that touches a cluster takes.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Config file: TOML (see `init`) or the original disposabledisco
    /// config.json. Default: ./ddisco.toml if it exists, else built-in defaults.
    #[arg(long, short = 'c', env = "DDISCO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override the config's state_dir.
    #[arg(long, env = "DDISCO_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl ConfigArgs {
    /// Loads the configuration; prints its notes (warnings) to stderr.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let path = self.config.clone().or_else(|| {
            let p = PathBuf::from("ddisco.toml");
            p.exists().then_some(p)
        });
        let mut cfg = match path {
            Some(p) => {
                let (cfg, notes) = Config::load(&p)?;
                for n in notes {
                    eprintln!("note: {n}");
                }
                cfg
            }
            None => Config::default(),
        };
        if let Some(dir) = &self.state_dir {
            cfg.state_dir = dir.clone();
        }
        Ok(cfg)
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init(a) => init::exec(a),
        Command::Serve(a) => serve::exec(a).await,
        Command::Bake(a) => bake::exec(a).await,
        Command::Scale(a) => scale::exec(a).await,
        Command::Run(a) => run::exec(a).await,
        Command::Status(a) => status::exec(a).await,
        Command::Destroy(a) => destroy::exec(a).await,
        Command::Credentials(a) => credentials::exec(a).await,
        Command::Logs(a) => logs::exec(a).await,
        Command::SecurityGroup(a) => security_group::exec(a).await,
        Command::Completions(a) => completions::exec(a),
    }
}

/// Logs to stderr, `RUST_LOG` setting the level (default info), as text or
/// JSON (`serve` and `bake`).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A command line that cannot be carried out as written (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Maps an error to the documented exit code.
pub fn exit_code_of(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else if e.downcast_ref::<client::NotRunning>().is_some() {
        ExitCode::from(3)
    } else if let Some(s) = e.downcast_ref::<tonic::Status>()
        && s.code() == tonic::Code::InvalidArgument
    {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
