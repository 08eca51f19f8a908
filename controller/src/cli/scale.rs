//! `scale N`: change the number of slaves of the running controller.

use super::ConfigArgs;
use crate::admin::AdminClient;
use clap::Args;
use ddisco_proto::v1 as api;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Set the number of slaves of the running controller. With --wait, show
/// progress until one master and exactly N slaves are ready.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Number of slaves wanted.
    pub slaves: u32,
    /// Wait until the cluster is at size and ready.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit code 4).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: ScaleArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let mut client = AdminClient::connect(&cfg.admin_socket()).await?;
    let reply = client.scale(args.slaves).await?;
    eprintln!("desired slaves: {} -> {}", reply.previous, reply.desired);
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout);
    let bar = indicatif::ProgressBar::new(u64::from(args.slaves) + 1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ready  {msg}",
        )
        .expect("template"),
    );
    loop {
        let st = client.status().await?;
        let p = progress(&st, args.slaves);
        bar.set_position(p.ready);
        bar.set_message(p.summary.clone());
        if p.done {
            bar.finish_and_clear();
            let plural = if args.slaves == 1 { "" } else { "s" };
            eprintln!(
                "cluster ready: 1 master + {} slave{plural} in {:.1}s",
                args.slaves,
                start.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            eprintln!("timed out after {}s: {}", args.timeout, p.summary);
            return Ok(ExitCode::from(4));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub struct Progress {
    pub ready: u64,
    pub done: bool,
    pub summary: String,
}

/// Done when exactly one master and `slaves` slaves exist and all are ready.
pub fn progress(st: &api::StatusReply, slaves: u32) -> Progress {
    let ready = st.nodes.iter().filter(|n| n.state == "ready").count() as u64;
    let masters = st.nodes.iter().filter(|n| n.role == api::Role::Master as i32).count();
    let failed: Vec<&str> =
        st.nodes.iter().filter(|n| n.state == "failed").map(|n| n.node_id.as_str()).collect();
    let done =
        masters == 1 && st.nodes.len() as u64 == u64::from(slaves) + 1 && ready == st.nodes.len() as u64;
    let mut summary = format!("{} nodes, {} ready", st.nodes.len(), ready);
    if !failed.is_empty() {
        summary.push_str(&format!(", FAILED: {}", failed.join(" ")));
    }
    Progress { ready, done, summary }
}
