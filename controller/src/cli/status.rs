//! `status`: what the running controller sees.

use super::ConfigArgs;
use super::client::AdminClient;
use crate::model::{Role, StateKind};
use crate::status::{NodeStatus, StatusView};
use clap::Args;
use std::process::ExitCode;

/// Show the cluster: every node with role, state, address, cores, workers,
/// heartbeat age and current step, then recent events. --json for scripts.
/// `status NODE` shows one node's boot phases with their times and its steps.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One node's boot diagnostics instead of the table.
    pub node: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Redraw the table every second until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let mut client = AdminClient::connect(&cfg.admin_socket()).await?;
    if args.watch {
        // Registered once, before the first draw: a Ctrl-C that arrives
        // while a table is being fetched or drawn is not lost.
        let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        loop {
            let view = client.status().await?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // Clear the screen, home the cursor, draw. A reader that went
            // away (a closed pipe) ends the watch quietly.
            if write!(out, "\x1b[2J\x1b[H{}", render(&view)).and_then(|_| out.flush()).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
            drop(out);
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
            }
        }
    }
    let view = client.status().await?;
    if let Some(id) = &args.node {
        // A failed node already terminated is found too (its last reports).
        let Some(n) = view.nodes.iter().chain(view.failed_nodes.iter().rev()).find(|n| &n.node_id == id)
        else {
            let known: Vec<&str> = view.nodes.iter().map(|n| n.node_id.as_str()).collect();
            return Err(anyhow::Error::new(super::UsageError(format!(
                "no node {id:?} in cluster {:?} (nodes: {})",
                view.cluster,
                known.join(", ")
            ))));
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(n)?);
        } else {
            print!("{}", render_node(n));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(ExitCode::SUCCESS)
}

/// Dollars with enough digits for cheap spot prices.
pub fn usd(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.2}")
    } else {
        let s = format!("{v:.8}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One node's boot diagnostics.
pub fn render_node(n: &NodeStatus) -> String {
    let mut out = format!(
        "{} ({}, pool {}): {}\n  instance {}  type {}  address {}  cores {}  workers {}\n",
        n.node_id,
        n.role,
        if n.pool.is_empty() { "-" } else { &n.pool },
        n.label(),
        if n.instance_id.is_empty() { "-" } else { &n.instance_id },
        if n.instance_type.is_empty() { "-" } else { &n.instance_type },
        if n.address.is_empty() { "-" } else { &n.address },
        n.cores,
        n.workers
    );
    if n.price_per_hour > 0.0 {
        out.push_str(&format!("  price ${}/hour\n", usd(n.price_per_hour)));
    }
    if !n.placement.is_empty() {
        out.push_str(&format!("  placed: {}\n", n.placement));
    }
    if !n.stuck.is_empty() {
        out.push_str(&format!("  STUCK: {}\n", n.stuck));
    }
    if !n.detail.is_empty() {
        out.push_str(&format!("  {}\n", n.detail));
    }
    out.push_str("phases:\n");
    let t0 = n.phases.first().map(|(_, t)| *t).unwrap_or(0);
    for (i, (name, t)) in n.phases.iter().enumerate() {
        // Phases come from two clocks (the agent reports when it started):
        // a small disorder shows as 0, never as a panic.
        let took = n
            .phases
            .get(i + 1)
            .map(|(_, next)| format!("  ({:.1}s)", next.saturating_sub(*t) as f64 / 1000.0));
        out.push_str(&format!(
            "  +{:>7.1}s  {name}{}\n",
            t.saturating_sub(t0) as f64 / 1000.0,
            took.unwrap_or_default()
        ));
    }
    if !n.steps.is_empty() {
        out.push_str("steps:\n");
        for s in &n.steps {
            out.push_str(&format!(
                "  {:<20} {:<10} exit {:<4} {:.1}s\n",
                s.name,
                s.status,
                s.exit_code,
                s.duration_ms as f64 / 1000.0
            ));
        }
        out.push_str(&format!("(output: ddisco-controller logs {} [STEP])\n", n.node_id));
    }
    out
}

/// The human table.
pub fn render(v: &StatusView) -> String {
    let slaves = v.nodes.iter().filter(|n| n.role == Role::Slave).count();
    let ready_slaves =
        v.nodes.iter().filter(|n| n.role == Role::Slave && n.state == StateKind::Ready).count();
    let master = v
        .nodes
        .iter()
        .find(|n| n.role == Role::Master && n.state != StateKind::Terminating)
        .map_or("none".to_string(), NodeStatus::label);
    let mut out = format!(
        "cluster {} [{}] ({} provider, {} engine): master {master}, {ready_slaves}/{} slaves ready ({slaves} present)\n\n",
        v.cluster, v.cluster_id, v.provider, v.engine, v.desired_slaves
    );
    if v.cost_per_hour > 0.0 || v.spent_usd > 0.0 {
        out.push_str(&format!(
            "cost: ${}/hour now, ${} spent since the cluster was created\n\n",
            usd(v.cost_per_hour),
            usd(v.spent_usd)
        ));
    }
    if v.desired_pools.len() > 1 {
        let pools: Vec<String> = v.desired_pools.iter().map(|(k, n)| format!("{k}={n}")).collect();
        out.push_str(&format!("pools: {}\n\n", pools.join(" ")));
    }
    let mut rows = vec![
        ["NODE", "ROLE", "STATE", "ADDRESS", "TYPE", "CORES", "WORKERS", "HEARTBEAT", "STEP"]
            .map(String::from),
    ];
    for n in &v.nodes {
        rows.push([
            n.node_id.clone(),
            n.role.to_string(),
            n.label(),
            if n.address.is_empty() { "-".into() } else { n.address.clone() },
            if n.instance_type.is_empty() { "-".into() } else { n.instance_type.clone() },
            if n.cores == 0 { "-".into() } else { n.cores.to_string() },
            if n.workers == 0 { "-".into() } else { n.workers.to_string() },
            n.last_heartbeat_ms
                .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            if !n.notice.is_empty() {
                n.notice.clone()
            } else if n.current_step.is_empty() {
                "-".into()
            } else {
                n.current_step.clone()
            },
        ]);
    }
    let widths: Vec<usize> = (0..9).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let problems: Vec<&NodeStatus> =
        v.nodes.iter().filter(|n| !n.detail.is_empty() || !n.stuck.is_empty()).collect();
    if !problems.is_empty() {
        out.push('\n');
        for n in problems {
            for text in [&n.stuck, &n.detail] {
                if !text.is_empty() {
                    out.push_str(&format!("{}: {}\n", n.node_id, text));
                }
            }
        }
    }
    if !v.failed_nodes.is_empty() {
        out.push_str("\nfailed and terminated (their reports; `ddisco-controller logs NODE`):\n");
        for n in v.failed_nodes.iter().rev().take(5) {
            let first = n.detail.lines().next().unwrap_or("");
            out.push_str(&format!("  {} ({}): {}\n", n.node_id, n.role, crate::text::prefix(first, 160)));
        }
    }
    if !v.engine_lines.is_empty() {
        out.push('\n');
        for l in &v.engine_lines {
            out.push_str(&format!("{l}\n"));
        }
    }
    for fact in &v.provider_facts {
        out.push_str(&format!("{fact}\n"));
    }
    for note in &v.provider_notes {
        out.push_str(&format!("provider: {note}\n"));
    }
    for note in &v.controller_notes {
        out.push_str(&format!("controller: {note}\n"));
    }
    if !v.events.is_empty() {
        out.push_str("\nrecent events:\n");
        for e in &v.events {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}
