//! `run -- COMMAND...`: one job on a cluster that exists only for it.
//!
//! Starts `serve` in the background when none runs for this state
//! directory, scales, waits until the cluster is ready, runs COMMAND here
//! with the cluster's endpoints in its environment, and when it ends (or on
//! Ctrl-C / SIGTERM) destroys the cluster it started (unless `--keep`),
//! then prints a summary. A controller `run` did not start is only scaled.

use super::ConfigArgs;
use super::client::AdminClient;
use crate::status::StatusView;
use clap::Args;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Run COMMAND on a cluster made for it: start the controller if none runs
/// (here, in the background; its log goes to <state_dir>/serve.log), scale
/// to --slaves, wait until ready, run COMMAND on this machine with the
/// cluster's endpoints in its environment (DDISCO_ENGINE, DDISCO_NODES;
/// Dask: DASK_SCHEDULER_ADDRESS and Dask's TLS settings; Disco:
/// DISCO_MASTER, DISCO_PROXY), then destroy the cluster (unless --keep, or
/// the controller was already running) and print a summary. The exit code
/// is COMMAND's; 4 if the cluster never became ready; 5 if the spend cap
/// (max_spend_usd) was reached; 6 if --max-runtime (or max_runtime_mins)
/// ran out; 7 if the destroy at the end did not finish (instances may
/// still run: see the message).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Slaves for the job: N, or MIN..MAX to let the engine's backlog
    /// decide (the job starts once MIN are ready).
    #[arg(long, default_value = "2", value_parser = parse_slaves)]
    pub slaves: (u32, Option<u32>),
    /// Leave the cluster (and the controller run started) running.
    #[arg(long)]
    pub keep: bool,
    /// Give up waiting for the cluster after this many seconds (exit code 4).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// A hard wall-clock limit on the whole run (90s, 45m, 2h...): when it
    /// passes, the job is stopped and the cluster destroyed, --keep or not
    /// (exit code 6). The controller run starts enforces it too, should
    /// `run` itself die.
    #[arg(long, value_parser = crate::model::parse_duration)]
    pub max_runtime: Option<Duration>,
    /// The job: a program and its arguments, after `--`.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Long by design: `run`'s steps in the order a user reads them in its
/// help (start or find the controller, scale, wait, run the job, destroy),
/// each a few lines; the plain parts are functions (`job_env`, the summary).
pub async fn exec(args: RunArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let socket = cfg.admin_socket();
    let started_at = Instant::now();
    let (mut client, serve) = match AdminClient::connect(&socket).await {
        Ok(c) => {
            eprintln!(
                "run: a controller is already running for {}: scaling it, leaving it running",
                socket.display()
            );
            (c, None)
        }
        Err(_) => {
            let (client, child) =
                start_serve(&args.config, &cfg.state_dir, &socket, args.max_runtime).await?;
            (client, Some(child))
        }
    };
    let owned = serve.is_some() && !args.keep;
    let mut signals = Signals::new()?;
    // The hard limit on the whole run (far away when none is given).
    let hard =
        tokio::time::Instant::now() + args.max_runtime.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    // A limit that ran out destroys what run started, --keep or not.
    let limited = serve.is_some();

    // Scale and wait, Ctrl-C aborting.
    // Exactly MIN first (a state directory keeps the last size); the
    // range, if any, once the cluster is ready: the job's backlog decides.
    let (slaves, max) = args.slaves;
    client.scale(slaves, Default::default(), None).await?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let ready = tokio::select! {
        r = super::scale::wait_ready(&mut client, slaves, deadline) => r?,
        sig = signals.next() => {
            eprintln!("run: {sig} while waiting for the cluster");
            let (_, ended) = finish(&mut client, serve, owned).await;
            return Ok(ExitCode::from(if ended { 130 } else { EXIT_DESTROY_FAILED }));
        }
        _ = tokio::time::sleep_until(hard) => {
            eprintln!("run: --max-runtime passed while waiting for the cluster");
            let (_, ended) = finish(&mut client, serve, limited).await;
            return Ok(ExitCode::from(if ended { EXIT_MAX_RUNTIME } else { EXIT_DESTROY_FAILED }));
        }
    };
    let to_ready = started_at.elapsed();
    if !ready {
        let (_, ended) = finish(&mut client, serve, owned).await;
        return Ok(ExitCode::from(if ended { 4 } else { EXIT_DESTROY_FAILED }));
    }
    if let Some(max) = max {
        client.scale(slaves, Default::default(), Some(max)).await?;
        eprintln!("run: adaptive size {slaves}..{max} slaves from now on");
    }

    // The job's environment.
    let st = client.status().await?;
    let creds =
        if st.engine == "dask" { Some(write_credentials(&mut client, &cfg.state_dir).await?) } else { None };
    let env = job_env(&st, creds.as_deref());
    let mut seen = Seen::default();
    seen.add(&st);

    eprintln!("run: cluster ready in {:.1}s; running {}", to_ready.as_secs_f64(), args.command.join(" "));
    let job_start = Instant::now();
    let mut child = tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .envs(&env)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {:?}: {e}", args.command[0]))?;
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            sig = signals.next() => {
                // The job is told too (a terminal's Ctrl-C reaches it
                // already; SIGTERM does not), then waited for.
                eprintln!("run: {sig}: stopping the job");
                break stop_job(&mut child).await?;
            }
            _ = tokio::time::sleep_until(hard) => {
                eprintln!("run: --max-runtime passed: stopping the job and destroying the cluster");
                seen.max_runtime = true;
                break stop_job(&mut child).await?;
            }
            _ = poll.tick() => {
                match client.status().await {
                    Ok(st) => seen.add(&st),
                    Err(_) => {
                        // The controller is gone: did it destroy the
                        // cluster by itself (spend cap, autostop)?
                        if let Ok(why) = std::fs::read_to_string(cfg.state_dir.join(crate::cluster::tick::STOP_REASON)) {
                            seen.cap_reached |= why.starts_with("SPEND CAP REACHED");
                            seen.max_runtime |= why.starts_with(crate::cluster::tick::MAX_RUNTIME_REACHED);
                            // It stops only once its destroy is verified.
                            seen.destroyed_by_controller = true;
                            eprintln!("run: the controller stopped: {}; stopping the job", why.trim());
                            break stop_job(&mut child).await?;
                        }
                        if seen.cap_reached {
                            eprintln!("run: the cluster was destroyed by the spend cap: stopping the job");
                            break stop_job(&mut child).await?;
                        }
                    }
                }
            }
        }
    };
    let job_time = job_start.elapsed();
    if let Ok(st) = client.status().await {
        seen.add(&st);
    }
    let code = exit_code(&status);
    // A cluster the spend cap destroyed is gone already (its controller
    // stops by itself).
    let destroy =
        (owned || (seen.max_runtime && limited)) && !seen.cap_reached && !seen.destroyed_by_controller;
    let (spent, ended) = finish(&mut client, serve, destroy).await;
    let spent = spent.or(Some(seen.spent));
    eprintln!("{}", summary(to_ready, job_time, &seen, spent, code, destroy || seen.cap_reached));
    if !ended {
        return Ok(ExitCode::from(EXIT_DESTROY_FAILED));
    }
    if seen.cap_reached {
        eprintln!("run: the spend cap (max_spend_usd) was reached; see the controller's events");
        return Ok(ExitCode::from(EXIT_SPEND_CAP));
    }
    if seen.max_runtime {
        eprintln!("run: the max runtime passed; the job was stopped");
        return Ok(ExitCode::from(EXIT_MAX_RUNTIME));
    }
    Ok(ExitCode::from(code))
}

/// `--slaves`: `N` or `MIN..MAX`.
fn parse_slaves(s: &str) -> Result<(u32, Option<u32>), String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok((n, None));
    }
    super::scale::parse_range(s)
        .map(|(min, max)| (min, Some(max)))
        .ok_or_else(|| format!("{s:?}: give a number of slaves (4) or a range (1..4, MIN <= MAX)"))
}

/// SIGTERM to the job, then (after 10 s) SIGKILL; its exit status.
async fn stop_job(child: &mut tokio::process::Child) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            let _ = child.kill().await;
            child.wait().await
        }
    }
}

/// Starts `serve` for this configuration in the background (its own
/// process group: a terminal's Ctrl-C goes to `run`, which destroys the
/// cluster in order) and waits (bounded) for its admin socket.
async fn start_serve(
    config: &ConfigArgs,
    state_dir: &Path,
    socket: &Path,
    max_runtime: Option<Duration>,
) -> anyhow::Result<(AdminClient, tokio::process::Child)> {
    std::fs::create_dir_all(state_dir)?;
    let log_path = state_dir.join("serve.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve");
    if let Some(c) = &config.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(d) = &config.state_dir {
        cmd.arg("--state-dir").arg(d);
    }
    if let Some(limit) = max_runtime {
        cmd.arg("--max-runtime").arg(format!("{}s", limit.as_secs_f64()));
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = cmd.spawn()?;
    eprintln!("run: started a controller (log: {})", log_path.display());
    // It answers once the nodes' Python packages are prepared (a cold cache
    // downloads them first).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(c) = AdminClient::connect(socket).await {
            return Ok((c, child));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the controller exited ({status}) before answering; see {}", log_path.display());
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            anyhow::bail!("the controller did not answer within 600 s; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Destroys the cluster when `run` owns it (and waits for its controller to
/// exit); the spend reported by the controller, and false when the destroy
/// did not finish (instances may still run).
async fn finish(
    client: &mut AdminClient,
    serve: Option<tokio::process::Child>,
    owned: bool,
) -> (Option<f64>, bool) {
    let (spent, ended) = if owned {
        match client.destroy().await {
            Ok(d) => {
                eprintln!("run: cluster destroyed ({} nodes terminated)", d.terminated.len());
                (Some(d.spent_usd), true)
            }
            Err(e) => {
                eprintln!(
                    "run: DESTROY DID NOT FINISH: {}; instances may still run: run `ddisco-controller destroy \
                     --yes` again",
                    e.message()
                );
                return (None, false);
            }
        }
    } else {
        (client.brief_status().await.ok().map(|s| s.spent_usd), true)
    };
    if let (true, Some(mut child)) = (owned, serve)
        && tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err()
    {
        let _ = child.kill().await;
    }
    (spent, ended)
}

async fn write_credentials(client: &mut AdminClient, state_dir: &Path) -> anyhow::Result<PathBuf> {
    let c = client.credentials("run", 1).await?;
    let dir = state_dir.join("run-client");
    super::credentials::write_private_dir(&dir)?;
    crate::pki::write_private(&dir.join("ca.pem"), &c.ca_pem)?;
    crate::pki::write_private(&dir.join("client.pem"), &c.cert_pem)?;
    crate::pki::write_private(&dir.join("client.key"), &c.key_pem)?;
    Ok(dir)
}

/// The job's environment, from the cluster's status (and the Dask client
/// credential's folder).
pub fn job_env(st: &StatusView, dask_tls: Option<&Path>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("DDISCO_ENGINE".into(), st.engine.clone());
    env.insert("DDISCO_NODES".into(), st.nodes.len().to_string());
    let ep = &st.engine_endpoints;
    match st.engine.as_str() {
        "dask" => {
            if let Some(s) = ep.get("scheduler") {
                env.insert("DASK_SCHEDULER_ADDRESS".into(), s.clone());
            }
            if let Some(dir) = dask_tls {
                // Dask's own configuration, so a plain `Client()` connects.
                let f = |name: &str| dir.join(name).display().to_string();
                env.insert("DASK_DISTRIBUTED__COMM__TLS__CA_FILE".into(), f("ca.pem"));
                env.insert("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT".into(), f("client.pem"));
                env.insert("DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY".into(), f("client.key"));
                env.insert("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION".into(), "True".into());
                env.insert("DDISCO_DASK_TLS".into(), dir.display().to_string());
            }
        }
        "disco" => {
            if let Some(m) = ep.get("master") {
                env.insert("DISCO_MASTER".into(), m.clone());
            }
            if let Some(p) = ep.get("proxy") {
                env.insert("DISCO_PROXY".into(), p.clone());
            }
        }
        _ => {}
    }
    env
}

/// `run`'s exit code when the spend cap was reached while it ran.
pub const EXIT_SPEND_CAP: u8 = 5;
/// `run`'s exit code when `--max-runtime` (or `max_runtime_mins`) passed.
pub const EXIT_MAX_RUNTIME: u8 = 6;
/// `run`'s exit code when the destroy at its end did not finish.
pub const EXIT_DESTROY_FAILED: u8 = 7;

/// Nodes and replacements seen while the job ran, and the spend cap.
#[derive(Debug, Default)]
pub struct Seen {
    nodes: BTreeSet<String>,
    replaced: BTreeSet<(u64, String)>,
    cap_reached: bool,
    max_runtime: bool,
    /// The controller stopped by itself after destroying the cluster.
    destroyed_by_controller: bool,
    spent: f64,
}

impl Seen {
    pub fn add(&mut self, st: &StatusView) {
        self.spent = self.spent.max(st.spent_usd);
        self.cap_reached |= st.controller_notes.iter().any(|n| n.starts_with("SPEND CAP REACHED"))
            || st.timed_events.iter().any(|e| e.message.starts_with("SPEND CAP REACHED"));
        self.max_runtime |=
            st.timed_events.iter().any(|e| e.message.starts_with(crate::cluster::tick::MAX_RUNTIME_REACHED));
        self.nodes.extend(st.nodes.iter().map(|n| n.node_id.clone()));
        for e in &st.timed_events {
            if e.message.contains("replacing it") {
                self.replaced.insert((e.unix_ms, e.message.clone()));
            }
        }
    }
}

fn exit_code(status: &std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        (None, None) => 1,
    }
}

/// The closing summary.
pub fn summary(
    to_ready: Duration,
    job: Duration,
    seen: &Seen,
    spent: Option<f64>,
    code: u8,
    destroyed: bool,
) -> String {
    let cost = spent.map_or("unknown".to_string(), |s| format!("${s:.4} (estimate)"));
    format!(
        "run: ready in {:.1}s, job {:.1}s (exit {code}); {} nodes used, {} replaced; cost {cost}; cluster {}",
        to_ready.as_secs_f64(),
        job.as_secs_f64(),
        seen.nodes.len(),
        seen.replaced.len(),
        if destroyed { "destroyed" } else { "left running" },
    )
}

/// SIGINT and SIGTERM, as one stream.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "interrupted",
            _ = self.term.recv() => "terminated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(engine: &str, endpoints: &[(&str, &str)]) -> StatusView {
        StatusView {
            engine: engine.into(),
            engine_endpoints: endpoints.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_job_gets_the_engines_endpoints() {
        let dask = job_env(&status("dask", &[("scheduler", "tls://10.0.0.1:8786")]), Some(Path::new("/s/c")));
        assert_eq!(dask["DDISCO_ENGINE"], "dask");
        assert_eq!(dask["DASK_SCHEDULER_ADDRESS"], "tls://10.0.0.1:8786");
        assert_eq!(dask["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"], "/s/c/client.key");
        assert_eq!(dask["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"], "True");
        let disco = job_env(
            &status("disco", &[("master", "http://10.0.0.1:8989"), ("proxy", "http://10.0.0.1:8999")]),
            None,
        );
        assert_eq!(disco["DISCO_MASTER"], "http://10.0.0.1:8989");
        assert_eq!(disco["DISCO_PROXY"], "http://10.0.0.1:8999");
        assert!(!disco.keys().any(|k| k.starts_with("DASK")));
    }

    #[test]
    fn slaves_are_a_number_or_a_range() {
        assert_eq!(parse_slaves("3"), Ok((3, None)));
        assert_eq!(parse_slaves("1..4"), Ok((1, Some(4))));
        assert!(parse_slaves("4..1").is_err());
        assert!(parse_slaves("many").is_err());
    }

    #[test]
    fn the_summary_says_what_happened() {
        let mut seen = Seen::default();
        seen.nodes.extend(["m".to_string(), "s1".into(), "s2".into()]);
        seen.replaced.insert((1, "s1 lost; replacing it".into()));
        let s = summary(Duration::from_millis(12_300), Duration::from_secs(4), &seen, Some(0.0123), 7, true);
        assert_eq!(
            s,
            "run: ready in 12.3s, job 4.0s (exit 7); 3 nodes used, 1 replaced; cost $0.0123 (estimate); cluster destroyed"
        );
    }
}
