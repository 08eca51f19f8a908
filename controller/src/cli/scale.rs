//! `scale N`: change the number of slaves of the running controller.

use super::ConfigArgs;
use super::client::AdminClient;
use crate::status::StatusView;
use clap::Args;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Set the number of slaves of the running controller: `scale 20` spreads
/// 20 slaves over the configured pools in proportion to their counts;
/// `scale c5=10 m5=5` sets pools by name; `scale 2..10` lets the engine's
/// backlog decide between 2 and 10. With --wait, show progress until one
/// master and exactly that many slaves are ready.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Total slaves (N), MIN..MAX (adaptive), or POOL=N for one or more pools.
    #[arg(required = true, num_args = 1..)]
    pub target: Vec<String>,
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
    let (total, pools, max) = parse_target(&args.target)?;
    let mut client = AdminClient::connect(&cfg.admin_socket()).await?;
    let reply = client.scale(total, pools, max).await?;
    if let Some(max) = max {
        eprintln!("adaptive size: {total}..{max} slaves, the engine's backlog deciding");
    }
    let mut by_pool: Vec<String> = reply.pools.iter().map(|(k, v)| format!("{k}={v}")).collect();
    by_pool.sort();
    eprintln!("desired slaves: {} -> {} ({})", reply.previous, reply.desired, by_pool.join(" "));
    let slaves = reply.desired;
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    if wait_ready(&mut client, slaves, deadline).await? {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(4))
    }
}

/// Shows progress until one master and `slaves` slaves are ready (true),
/// or `deadline` passes (false, said on stderr).
pub async fn wait_ready(client: &mut AdminClient, slaves: u32, deadline: Instant) -> anyhow::Result<bool> {
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(u64::from(slaves) + 1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ready  {msg}",
        )
        .expect("template"),
    );
    loop {
        let st = client.brief_status().await?;
        let p = progress(&st, slaves);
        bar.set_position(p.ready);
        bar.set_message(p.summary.clone());
        if p.done {
            bar.finish_and_clear();
            let plural = if slaves == 1 { "" } else { "s" };
            eprintln!(
                "cluster ready: 1 master + {} slave{plural} in {:.1}s",
                slaves,
                start.elapsed().as_secs_f64()
            );
            return Ok(true);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            eprintln!("timed out after {:.0}s: {}", start.elapsed().as_secs_f64(), p.summary);
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `["20"]` -> total 20; `["2..10"]` -> adaptive 2..10; `["a=3", "b=2"]`
/// -> per pool.
pub fn parse_target(
    args: &[String],
) -> anyhow::Result<(u32, std::collections::HashMap<String, u32>, Option<u32>)> {
    let usage = |a: &str| {
        anyhow::Error::new(super::UsageError(format!(
            "{a:?}: give a number of slaves (scale 20), a range (scale 2..10) or POOL=N (scale c5=10 m5=5)"
        )))
    };
    if let [one] = args {
        if let Ok(n) = one.parse::<u32>() {
            return Ok((n, Default::default(), None));
        }
        if let Some((min, max)) = parse_range(one) {
            return Ok((min, Default::default(), Some(max)));
        }
    }
    let mut pools = std::collections::HashMap::new();
    for a in args {
        let (name, n) = a.split_once('=').ok_or_else(|| usage(a))?;
        let n: u32 = n.parse().map_err(|_| usage(a))?;
        pools.insert(name.to_string(), n);
    }
    Ok((0, pools, None))
}

/// `"2..10"` -> (2, 10), MIN <= MAX.
pub fn parse_range(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once("..")?;
    let (min, max) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (min <= max).then_some((min, max))
}

pub struct Progress {
    pub ready: u64,
    pub done: bool,
    pub summary: String,
}

/// Done when exactly one master and `slaves` slaves exist and all are ready.
pub fn progress(st: &StatusView, slaves: u32) -> Progress {
    let c = &st.counts;
    let done = c.masters == 1 && u64::from(c.nodes) == u64::from(slaves) + 1 && c.ready == c.nodes;
    let mut summary = format!("{} nodes, {} ready", c.nodes, c.ready);
    if !c.failed.is_empty() {
        summary.push_str(&format!(", FAILED: {}", c.failed.join(" ")));
    }
    Progress { ready: u64::from(c.ready), done, summary }
}
