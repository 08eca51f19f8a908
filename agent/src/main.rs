use clap::{Parser, Subcommand};
use ddisco_agent::orphan::Orphan;
use ddisco_agent::{identity, session, steps};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// The ddisco node agent. Started by the node's userdata; enrolls with the
/// controller, runs its plan, and heartbeats until the node is terminated.
#[derive(Debug, Parser)]
#[command(name = "ddisco-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll (first start) or resume (later starts), then serve the node.
    Run {
        /// The agent's folder: bootstrap.json, ca.pem, identity/, progress.json.
        #[arg(long, env = "DDISCO_HOME", default_value = "/var/lib/ddisco")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ddisco_agent::facts::started_unix_ms();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Two worker threads are plenty for one session and one plan.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let Command::Run { dir } = cli.command;
    let res = rt.block_on(async move {
        // The dead man's switch runs from the start (a controller may die
        // before this node enrolls) to the end: an agent that stops (told
        // to, or refused) leaves its node to the switch, never running on.
        let boot = identity::read_bootstrap(&dir)?;
        let orphan = Arc::new(Orphan::new(boot.orphan_timeout_secs, boot.orphan_action));
        let switch = orphan.clone();
        tokio::spawn(async move { switch.watch().await });
        let res = async {
            let creds = identity::load_or_enroll(&dir).await?;
            orphan.touch();
            let executor = Arc::new(steps::Executor::new(&dir));
            session::Agent { creds: std::sync::Mutex::new(creds), dir, executor, orphan: orphan.clone() }
                .run()
                .await
        }
        .await;
        if orphan.enabled() {
            match &res {
                Ok(()) => {
                    tracing::info!("the agent is done; the node shuts down if no controller takes it back")
                }
                Err(e) => tracing::error!("{e}; the node shuts down once orphan_timeout_secs pass"),
            }
            orphan.watch().await;
        }
        res
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ddisco-agent: {e}");
            ExitCode::from(1)
        }
    }
}
