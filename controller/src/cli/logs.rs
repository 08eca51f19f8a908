//! `logs NODE [STEP]`: print the output of a node's plan steps.

use super::ConfigArgs;
use super::client::AdminClient;
use clap::Args;
use std::process::ExitCode;

/// Print the output (the last 4 KiB the agent reported) of a node's steps,
/// or of one step. The full output stays on the node, in
/// `<agent dir>/steps/<step>.log`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The node, e.g. slave-0003.
    pub node: String,
    /// One step (default: every step, in plan order of their reports).
    pub step: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let mut client = AdminClient::connect(&cfg.admin_socket()).await?;
    let view = client.status().await?;
    let usage = |m: String| anyhow::Error::new(super::UsageError(m));
    // A failed node already terminated is found too (its last reports).
    let Some(n) = view.nodes.iter().chain(view.failed_nodes.iter().rev()).find(|n| n.node_id == args.node)
    else {
        let known: Vec<&str> =
            view.nodes.iter().chain(view.failed_nodes.iter()).map(|n| n.node_id.as_str()).collect();
        return Err(usage(format!("no node {:?} (nodes: {})", args.node, known.join(", "))));
    };
    let steps: Vec<_> =
        n.steps.iter().filter(|s| args.step.as_ref().is_none_or(|want| &s.name == want)).collect();
    if steps.is_empty() {
        let known: Vec<&str> = n.steps.iter().map(|s| s.name.as_str()).collect();
        return Err(usage(match &args.step {
            Some(s) => format!(
                "node {} has no report for step {s:?} (steps reported: {})",
                n.node_id,
                known.join(", ")
            ),
            None => format!("node {} has reported no step yet ({})", n.node_id, n.state),
        }));
    }
    for s in steps {
        println!(
            "==> {} {} (exit {}, {:.1}s, {})",
            n.node_id,
            s.name,
            s.exit_code,
            s.duration_ms as f64 / 1000.0,
            s.status
        );
        print!("{}", s.output_tail);
        if !s.output_tail.ends_with('\n') {
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}
