//! ddisco-bench: how many agents one controller holds, how fast nodes enroll,
//! how fast a dead slave is noticed, how light the agent is.
//!
//! It runs a real `ddisco-controller serve` (real TLS, real gRPC, real
//! enrollment) with the `record` provider, which writes each launch's
//! userdata to a file and starts nothing; this program reads the bootstrap
//! tokens from those files and plays the agents in one process, each with its
//! own TCP + TLS connection. The `agent` scenario runs the real agent binary
//! on the local provider. Prints a table and writes JSON.
//!
//! `cargo run --release -p ddisco-controller --bin ddisco-bench -- --help`

use clap::Parser;
use ddisco_controller::cli::client::AdminClient;
use ddisco_proto::v1 as api;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Parser)]
#[command(
    name = "ddisco-bench",
    about = "Benchmarks of the ddisco control plane (prints a table, writes JSON)"
)]
struct Args {
    /// Scenarios to run: enroll (also measures scale 0->N), scaling (enroll
    /// at each of --scaling-agents), hold, detect, agent, floor.
    #[arg(long, value_delimiter = ',', default_value = "floor,enroll,scaling,hold,detect,agent")]
    scenarios: Vec<String>,
    /// Cluster sizes of the scaling curve.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000")]
    scaling_agents: Vec<usize>,
    /// Agents held (heartbeating) besides the frozen ones in the detect
    /// scenario: detection must not degrade with the cluster's size.
    #[arg(long, default_value_t = 10_000)]
    detect_held: usize,
    /// Agents enrolling from cold (enroll/scale scenario).
    #[arg(long, default_value_t = 1000)]
    enroll_agents: usize,
    /// Agents connected and heartbeating (hold scenario).
    #[arg(long, default_value_t = 10_000)]
    hold_agents: usize,
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
    /// Heartbeat interval for enroll/hold (the default config's 5 s).
    #[arg(long, default_value_t = 5.0)]
    heartbeat_secs: f64,
    /// Agents frozen at random moments (detect scenario).
    #[arg(long, default_value_t = 20)]
    detect_agents: usize,
    /// How long the real agent is watched idle (agent scenario).
    #[arg(long, default_value_t = 60)]
    agent_secs: u64,
    /// Agent binary for the agent scenario (e.g. the static one from
    /// scripts/build-agent); default: ddisco-agent next to this program.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Small numbers, for a smoke run (the test suite uses it).
    #[arg(long)]
    quick: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A controller process under test.
struct Ctl {
    child: Child,
    dir: tempfile::TempDir,
}

impl Ctl {
    fn start(extra: &str) -> anyhow::Result<Ctl> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("ddisco.toml");
        // Simulated nodes never download the agent, but serve wants one to
        // offer: any existing file does (this program).
        let base = format!(
            "provider = \"record\"\nengine = \"none\"\nbase_packages = []\nadditional_packages = []\n\
             pip_requirements = []\nlisten = \"127.0.0.1:0\"\ndownload_listen = \"127.0.0.1:0\"\n\
             dashboard_listen = \"127.0.0.1:0\"\nreconcile_interval_secs = 1.0\nagent_binary = \"{}\"",
            std::env::current_exe()?.display()
        );
        // Keys in `extra` replace the same keys of the base.
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        let overridden: Vec<String> = extra.lines().map(key).collect();
        let mut text: String =
            base.lines().filter(|l| !overridden.contains(&key(l))).map(|l| format!("{l}\n")).collect();
        text.push_str(extra);
        text.push('\n');
        std::fs::write(&cfg, text)?;
        let exe = std::env::current_exe()?.with_file_name("ddisco-controller");
        anyhow::ensure!(
            exe.exists(),
            "{} is missing: build it (cargo build --release --bins)",
            exe.display()
        );
        let log = std::fs::File::create(dir.path().join("serve.log"))?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Ctl { child, dir })
    }

    /// A controller with the default timeout ratio (timeout = 3 x interval).
    fn with_heartbeats(interval_secs: f64) -> anyhow::Result<Ctl> {
        Ctl::start(&format!(
            "heartbeat_interval_secs = {interval_secs}\nheartbeat_timeout_secs = {}",
            interval_secs * 3.0
        ))
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join(".ddisco")
    }

    async fn admin(&self) -> anyhow::Result<AdminClient> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = AdminClient::connect(&self.state().join("admin.sock")).await {
                return Ok(c);
            }
            anyhow::ensure!(Instant::now() < end, "the controller did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Launch records not seen yet.
    fn new_launches(&self, seen: &mut HashSet<String>) -> Vec<Launch> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.state().join("launches")) else { return out };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") || seen.contains(&name) {
                continue;
            }
            if let Some(l) = std::fs::read_to_string(e.path()).ok().and_then(|t| Launch::parse(&t)) {
                seen.insert(name);
                out.push(l);
            }
        }
        out
    }
}

impl Drop for Ctl {
    /// SIGTERM first (the controller saves and exits; a profiler wrapping
    /// it writes its report), SIGKILL after 10 s.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let _ = kill(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) and RSS of a process.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn proc_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One launch batch read back from the recording provider.
struct Launch {
    launched_unix_ms: u64,
    boot: Arc<Boot>,
    slots: Vec<(String, String)>,
}

struct Boot {
    controller: String,
    server_name: String,
    ca_pem: String,
}

impl Launch {
    fn parse(text: &str) -> Option<Launch> {
        let v: Value = serde_json::from_str(text).ok()?;
        let ud = v["userdata"].as_str()?;
        let ca = ud.split("<<'DDISCO_CA_EOF'\n").nth(1)?.split("DDISCO_CA_EOF").next()?;
        let boot: Value = serde_json::from_str(
            ud.split("<<'DDISCO_BOOT_EOF'\n").nth(1)?.split("\nDDISCO_BOOT_EOF").next()?,
        )
        .ok()?;
        let slots = boot["slots"]
            .as_array()?
            .iter()
            .map(|s| Some((s["node_id"].as_str()?.to_string(), s["token"].as_str()?.to_string())))
            .collect::<Option<Vec<_>>>()?;
        Some(Launch {
            launched_unix_ms: v["launched_unix_ms"].as_u64()?,
            boot: Arc::new(Boot {
                controller: boot["controller"].as_str()?.into(),
                server_name: boot["server_name"].as_str()?.into(),
                ca_pem: ca.into(),
            }),
            slots,
        })
    }
}

/// What a simulated agent shares with the benchmark.
#[derive(Default)]
struct AgentState {
    /// Stop sending heartbeats (the process is "frozen"; its connection stays).
    frozen: AtomicBool,
    /// Unix ms of the last heartbeat sent.
    last_hb: AtomicU64,
    ready: AtomicBool,
}

async fn endpoint(boot: &Boot, identity: Option<(&str, &str)>) -> Result<tonic::transport::Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&boot.ca_pem))
        .domain_name(boot.server_name.clone());
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(boot.controller.clone())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Enrolls with a token; returns (latency, cert, key).
async fn enroll(boot: &Boot, token: &str) -> Result<(Duration, String, String), String> {
    let t0 = Instant::now();
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    let ch = endpoint(boot, None).await?;
    let req = api::EnrollRequest {
        token: token.into(),
        csr_pem: csr,
        facts: Some(api::NodeFacts {
            logical_cores: 2,
            hostname: "bench-enrolling".into(),
            ..Default::default()
        }),
        identity: None,
    };
    let r = api::enrollment_client::EnrollmentClient::new(ch).enroll(req).await.map_err(|s| s.to_string())?;
    Ok((t0.elapsed(), r.into_inner().certificate_pem, key.serialize_pem()))
}

/// Holds a session: hello, then a heartbeat every `every` (first one at a
/// random offset) unless frozen. Runs until the process ends.
async fn session(
    boot: Arc<Boot>,
    cert: String,
    key: String,
    every: Duration,
    st: Arc<AgentState>,
) -> Result<(), String> {
    let ch = endpoint(&boot, Some((&cert, &key))).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = api::AgentMessage {
        msg: Some(api::agent_message::Msg::Hello(api::Hello {
            facts: Some(api::NodeFacts {
                logical_cores: 2,
                // Host names are unique in a cluster.
                hostname: format!("bench-{:016x}", rand::random::<u64>()),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    tx.send(hello).await.map_err(|e| e.to_string())?;
    let mut inbound = api::agent_client::AgentClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    st.ready.store(true, Ordering::Relaxed);
    // Drain whatever the controller pushes (assignment, directives).
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let offset = Duration::from_millis(rand::random_range(0..every.as_millis().max(1) as u64));
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(every);
    let mut seq = 0;
    loop {
        tick.tick().await;
        if st.frozen.load(Ordering::Relaxed) {
            continue;
        }
        seq += 1;
        let hb = api::AgentMessage {
            msg: Some(api::agent_message::Msg::Heartbeat(api::Heartbeat { seq, load_milli: Some(120) })),
        };
        if tx.send(hb).await.is_err() {
            return Err("session closed".into());
        }
        st.last_hb.store(unix_ms(), Ordering::Relaxed);
    }
}

/// Runs agents for every launch as it appears, until `want` have sessions.
/// Returns enroll latencies (ms) and the agents' shared states by node id.
async fn fleet(
    ctl: &Ctl,
    want: usize,
    every: Duration,
    concurrency: usize,
) -> anyhow::Result<(Vec<f64>, BTreeMap<String, Arc<AgentState>>, Duration)> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut seen = HashSet::new();
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Result<f64, String>>();
    let mut states = BTreeMap::new();
    let mut started = 0usize;
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let mut first_enroll: Option<Instant> = None;
    while latencies.len() + errors.len() < want {
        for l in ctl.new_launches(&mut seen) {
            for (node, token) in l.slots {
                let st = Arc::new(AgentState::default());
                states.insert(node.clone(), st.clone());
                let (boot, sem, lat_tx) = (l.boot.clone(), sem.clone(), lat_tx.clone());
                started += 1;
                first_enroll.get_or_insert_with(Instant::now);
                tokio::spawn(async move {
                    let permit = sem.acquire_owned().await.expect("semaphore");
                    match enroll(&boot, &token).await {
                        Ok((lat, cert, key)) => {
                            drop(permit);
                            let _ = lat_tx.send(Ok(lat.as_secs_f64() * 1000.0));
                            // Ends when its scenario's controller stops.
                            let _ = session(boot, cert, key, every, st).await;
                        }
                        Err(e) => {
                            let _ = lat_tx.send(Err(format!("{node}: {e}")));
                        }
                    }
                });
            }
        }
        while let Ok(r) = lat_rx.try_recv() {
            match r {
                Ok(ms) => latencies.push(ms),
                Err(e) => errors.push(e),
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {want} agents enrolled ({started} started)",
            latencies.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(errors.is_empty(), "{} enrollments failed, first: {}", errors.len(), errors[0]);
    let enroll_wall = first_enroll.map(|t| t.elapsed()).unwrap_or_default();
    let _ = t0;
    Ok((latencies, states, enroll_wall))
}

async fn wait_ready(
    admin: &mut AdminClient,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<ddisco_controller::status::StatusView> {
    let end = Instant::now() + timeout;
    loop {
        let st = admin.brief_status().await?;
        let ready = st.counts.ready as usize;
        if ready >= n {
            return Ok(st);
        }
        anyhow::ensure!(
            Instant::now() < end,
            "gave up after {:.0}s waiting for {n} nodes to be ready: {ready} are",
            timeout.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario_enroll(a: &Args, n: usize) -> anyhow::Result<Value> {
    let ctl = Ctl::with_heartbeats(a.heartbeat_secs)?;
    let mut admin = ctl.admin().await?;
    let cpu0 = proc_cpu(ctl.pid());
    let t_scale = Instant::now();
    admin.scale((n - 1) as u32, Default::default(), None).await?;
    let (mut lat, _states, wall) =
        fleet(&ctl, n, Duration::from_secs_f64(a.heartbeat_secs), a.concurrency).await?;
    let cpu_enroll = proc_cpu(ctl.pid()) - cpu0;
    wait_ready(&mut admin, n, Duration::from_secs(300)).await?;
    let scale_s = t_scale.elapsed().as_secs_f64();
    Ok(json!({
        "agents": n,
        "concurrency": a.concurrency,
        "enroll_wall_s": wall.as_secs_f64(),
        "agents_per_s": n as f64 / wall.as_secs_f64(),
        "latency_ms_p50": pct(&mut lat, 0.5),
        "latency_ms_p99": pct(&mut lat, 0.99),
        "controller_cpu_s": cpu_enroll,
        "controller_cpu_ms_per_enrollment": cpu_enroll * 1000.0 / n as f64,
        // The cryptographic floor, for comparison (see `crypto_floor`).
        "crypto_floor_ms_per_enrollment": crypto_floor()["enrollment_floor_ms"],
        "scale_0_to_n_ready_s": scale_s,
    }))
}

async fn scenario_hold(a: &Args, n: usize, secs: u64) -> anyhow::Result<Value> {
    let every = Duration::from_secs_f64(a.heartbeat_secs);
    let ctl = Ctl::with_heartbeats(a.heartbeat_secs)?;
    let mut admin = ctl.admin().await?;
    admin.scale((n - 1) as u32, Default::default(), None).await?;
    let (_, states, _) = fleet(&ctl, n, every, a.concurrency).await?;
    wait_ready(&mut admin, n, Duration::from_secs(600)).await?;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let open = states.values().filter(|s| s.ready.load(Ordering::Relaxed)).count();
        if open == n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < end,
            "gave up after 120s waiting for every simulated agent's session: {open} of {n} open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events_before = admin.status().await?.timed_events.len();
    let cpu0 = proc_cpu(ctl.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = proc_cpu(ctl.pid()) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    // What `status --json` and the dashboard's API cost at this size.
    let (cpu_s0, t_s) = (proc_cpu(ctl.pid()), Instant::now());
    let st = admin.status().await?;
    let status_ms = t_s.elapsed().as_secs_f64() * 1000.0;
    let status_cpu_ms = (proc_cpu(ctl.pid()) - cpu_s0) * 1000.0;
    let t_b = Instant::now();
    let _ = admin.brief_status().await?;
    let brief_ms = t_b.elapsed().as_secs_f64() * 1000.0;
    let lost = st.timed_events.iter().skip(events_before).filter(|e| e.message.contains(" lost ")).count();
    let mut ages: Vec<f64> = st.nodes.iter().filter_map(|x| x.last_heartbeat_ms).map(|m| m as f64).collect();
    let not_ready = st.nodes.iter().filter(|x| x.state != ddisco_controller::model::StateKind::Ready).count();
    let heartbeats = n as f64 * wall / every.as_secs_f64();
    Ok(json!({
        "agents": n,
        "hold_s": wall,
        "heartbeat_interval_s": every.as_secs_f64(),
        "heartbeats_per_s": heartbeats / wall,
        "controller_rss_mb": proc_kb(ctl.pid(), "VmRSS:") as f64 / 1024.0,
        "controller_peak_rss_mb": proc_kb(ctl.pid(), "VmHWM:") as f64 / 1024.0,
        "controller_cpu_percent_of_one_core": 100.0 * cpu / wall,
        "controller_cpu_us_per_heartbeat": 1e6 * cpu / heartbeats.max(1.0),
        "heartbeat_age_ms_p50": pct(&mut ages, 0.5),
        "heartbeat_age_ms_p99": pct(&mut ages, 0.99),
        "heartbeat_age_ms_max": pct(&mut ages, 1.0),
        "false_alarms": lost,
        "nodes_not_ready": not_ready,
        "full_status_ms": status_ms,
        "full_status_controller_cpu_ms": status_cpu_ms,
        "brief_status_ms": brief_ms,
    }))
}

async fn scenario_detect(
    a: &Args,
    frozen: usize,
    held: usize,
    interval: f64,
    timeout: f64,
) -> anyhow::Result<Value> {
    let n = frozen + held + 1;
    let ctl = Ctl::start(&format!(
        "heartbeat_interval_secs = {interval}\nheartbeat_timeout_secs = {timeout}\nreconcile_interval_secs = {}",
        (interval / 5.0).max(0.1)
    ))?;
    let mut admin = ctl.admin().await?;
    admin.scale((n - 1) as u32, Default::default(), None).await?;
    let (_, states, _) = fleet(&ctl, n, Duration::from_secs_f64(interval), a.concurrency).await?;
    wait_ready(&mut admin, n, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs_f64(interval * 2.0)).await;
    // Freeze `frozen` slaves, chosen at random, each at a random moment
    // within one interval; the others keep heartbeating.
    let mut victims: Vec<(String, Arc<AgentState>)> = states
        .iter()
        .filter(|(id, _)| id.starts_with("slave"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    while victims.len() > frozen {
        victims.swap_remove(rand::random_range(0..victims.len()));
    }
    for (_, st) in &victims {
        let st = st.clone();
        let delay = Duration::from_millis(rand::random_range(0..(interval * 1000.0) as u64));
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            st.frozen.store(true, Ordering::Relaxed);
        });
    }
    let mut seen: HashSet<String> = HashSet::new();
    let _ = ctl.new_launches(&mut seen); // launches so far
    let end = Instant::now() + Duration::from_secs_f64(timeout * 4.0 + 30.0);
    let mut decided: BTreeMap<String, u64> = BTreeMap::new();
    let mut launches: Vec<u64> = Vec::new();
    while decided.len() < victims.len() {
        let st = admin.brief_status().await?;
        for e in &st.timed_events {
            for (id, _) in &victims {
                if e.message.starts_with(&format!("{id} lost")) {
                    decided.entry(id.clone()).or_insert(e.unix_ms);
                }
            }
        }
        launches.extend(ctl.new_launches(&mut seen).iter().map(|l| l.launched_unix_ms));
        anyhow::ensure!(
            Instant::now() < end,
            "only {} of {} frozen agents declared lost",
            decided.len(),
            victims.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    launches.extend(ctl.new_launches(&mut seen).iter().map(|l| l.launched_unix_ms));
    launches.sort();
    let mut to_lost = Vec::new();
    let mut to_launch = Vec::new();
    for (id, st) in &victims {
        let last = st.last_hb.load(Ordering::Relaxed);
        let lost = decided[id];
        to_lost.push((lost.saturating_sub(last)) as f64 / 1000.0);
        if let Some(l) = launches.iter().find(|l| **l >= lost) {
            to_launch.push((l.saturating_sub(last)) as f64 / 1000.0);
        }
    }
    let target = timeout + 1.0;
    let within = to_lost.iter().filter(|d| **d <= target).count();
    let lost_total =
        admin.brief_status().await?.timed_events.iter().filter(|e| e.message.contains(" lost (")).count();
    Ok(json!({
        "agents_held": held + 1,
        "false_alarms": lost_total.saturating_sub(victims.len()),
        "frozen_agents": victims.len(),
        "heartbeat_interval_s": interval,
        "heartbeat_timeout_s": timeout,
        "last_heartbeat_to_lost_s_p50": pct(&mut to_lost.clone(), 0.5),
        "last_heartbeat_to_lost_s_p99": pct(&mut to_lost.clone(), 0.99),
        "last_heartbeat_to_lost_s_max": pct(&mut to_lost, 1.0),
        "last_heartbeat_to_replacement_launch_s_p50": pct(&mut to_launch.clone(), 0.5),
        "last_heartbeat_to_replacement_launch_s_max": pct(&mut to_launch, 1.0),
        "within_timeout_plus_1s": within,
    }))
}

/// The enrollment curve: a fresh controller per size; controller CPU per
/// enrollment at each, and the ratio of the largest to the smallest (1.0:
/// perfectly linear total cost).
async fn scenario_scaling(a: &Args) -> anyhow::Result<Value> {
    let mut points = Vec::new();
    for &n in &a.scaling_agents {
        eprintln!("   scaling: {n} agents");
        let r = scenario_enroll(a, n).await?;
        let per = r["controller_cpu_s"].as_f64().unwrap_or(f64::NAN) * 1000.0 / n as f64;
        points.push(json!({
            "agents": n,
            "agents_per_s": r["agents_per_s"],
            "controller_cpu_s": r["controller_cpu_s"],
            "controller_cpu_ms_per_enrollment": per,
            "crypto_floor_ms_per_enrollment": r["crypto_floor_ms_per_enrollment"],
            "latency_ms_p99": r["latency_ms_p99"],
        }));
    }
    let per: Vec<f64> =
        points.iter().filter_map(|p| p["controller_cpu_ms_per_enrollment"].as_f64()).collect();
    let (lo, hi) = per.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    Ok(json!({
        "points": points,
        "cpu_per_enrollment_ratio_largest_to_smallest": hi / lo,
    }))
}

/// The cryptographic floor of one enrollment, timed in this process with
/// ring (the library the controller's TLS and certificates use): the
/// enrollment's TLS handshake (the server signs once, verifies nothing),
/// the certificate (one signature, the CSR's signature verified), and the
/// session's mutual-TLS handshake (one signature; the client's certificate
/// and its handshake signature verified): 3 P-256 signatures and 3
/// verifications, plus 2 X25519 key agreements.
fn crypto_floor() -> Value {
    use ring::signature::{self, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("key");
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key");
    let msg = [7u8; 256];
    let n = 2000;
    let t0 = Instant::now();
    let mut sig = None;
    for _ in 0..n {
        sig = Some(key.sign(&rng, &msg).expect("sign"));
    }
    let sign = t0.elapsed().as_secs_f64() / n as f64;
    let sig = sig.expect("signed");
    let public =
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    let t0 = Instant::now();
    for _ in 0..n {
        public.verify(&msg, sig.as_ref()).expect("verify");
    }
    let verify = t0.elapsed().as_secs_f64() / n as f64;
    let t0 = Instant::now();
    for _ in 0..n {
        let mine =
            ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng).expect("x25519");
        let theirs = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
            .expect("x25519")
            .compute_public_key()
            .expect("public");
        let peer =
            ring::agreement::UnparsedPublicKey::new(&ring::agreement::X25519, theirs.as_ref().to_vec());
        ring::agreement::agree_ephemeral(mine, &peer, |_| ()).expect("agree");
    }
    // Two key generations and one agreement per loop: count it as one
    // handshake's key exchange (both sides).
    let kx = t0.elapsed().as_secs_f64() / n as f64;
    json!({
        "p256_sign_us": sign * 1e6,
        "p256_verify_us": verify * 1e6,
        "x25519_exchange_us": kx * 1e6,
        "enrollment_floor_ms": (3.0 * sign + 3.0 * verify + 2.0 * kx) * 1000.0,
    })
}

/// The real agent binary: size, and idle RSS/CPU of two real agents (a
/// local cluster of 1 master + 1 slave) over `secs`.
async fn scenario_agent(secs: u64, agent: Option<&Path>) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let agent = agent.map(Path::to_path_buf).unwrap_or_else(|| exe.with_file_name("ddisco-agent"));
    anyhow::ensure!(agent.exists(), "no agent binary at {}", agent.display());
    let agent = agent.canonicalize()?;
    let size = std::fs::metadata(&agent)?.len();
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("ddisco.toml");
    std::fs::write(
        &cfg,
        format!(
            "provider = \"local\"\nengine = \"none\"\nbase_packages = []\nadditional_packages = []\npip_requirements = []\n\
             listen = \"127.0.0.1:0\"\ndownload_listen = \"127.0.0.1:0\"\ndashboard_listen = \"127.0.0.1:0\"\n\
             num_slaves = 1\nagent_binary = \"{}\"\n",
            agent.display()
        ),
    )?;
    let serve = exe.with_file_name("ddisco-controller");
    let mut child =
        Command::new(&serve).args(["serve", "--config"]).arg(&cfg).stderr(Stdio::null()).spawn()?;
    let result = async {
        let sock = dir.path().join(".ddisco/admin.sock");
        let end = Instant::now() + Duration::from_secs(30);
        let mut admin = loop {
            if let Ok(c) = AdminClient::connect(&sock).await {
                break c;
            }
            anyhow::ensure!(Instant::now() < end, "controller did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        wait_ready(&mut admin, 2, Duration::from_secs(120)).await?;
        let pids: Vec<u32> = std::fs::read_dir(dir.path().join(".ddisco/nodes"))?
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok()?.trim().parse().ok())
            .collect();
        let cpu0: f64 = pids.iter().map(|p| proc_cpu(*p)).sum();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let cpu: f64 = pids.iter().map(|p| proc_cpu(*p)).sum::<f64>() - cpu0;
        let rss: Vec<u64> = pids.iter().map(|p| proc_kb(*p, "VmRSS:")).collect();
        let _ = admin.destroy().await;
        Ok(json!({
            "binary": agent.display().to_string(),
            "binary_bytes": size,
            "idle_rss_kb_max": rss.iter().max().copied().unwrap_or(0),
            "idle_cpu_s_per_agent": cpu / pids.len().max(1) as f64,
            "watched_s": secs,
        }))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= need {
        return Ok(());
    }
    anyhow::ensure!(
        hard >= need,
        "this run needs {need} file descriptors but the hard limit is {hard}: raise it (ulimit -Hn, \
         /etc/security/limits.conf) or run fewer agents"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if a.quick {
        a.enroll_agents = a.enroll_agents.min(50);
        a.hold_agents = a.hold_agents.min(100);
        a.hold_secs = a.hold_secs.min(3);
        a.detect_agents = a.detect_agents.min(4);
        a.detect_held = a.detect_held.min(20);
        a.scaling_agents = vec![20, 40];
        a.agent_secs = a.agent_secs.min(3);
        a.heartbeat_secs = a.heartbeat_secs.min(1.0);
    }
    // Each agent is a connection here and one in the controller (a child).
    let biggest = [a.hold_agents, a.enroll_agents, a.detect_agents + a.detect_held + 1]
        .into_iter()
        .chain(a.scaling_agents.iter().copied())
        .max()
        .unwrap_or(0) as u64;
    raise_fd_limit(biggest + 512)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = serde_json::Map::new();
    results.insert(
        "machine".into(),
        json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "memory_kb": proc_meminfo(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        }),
    );
    for s in a.scenarios.clone() {
        eprintln!("== {s}");
        let r = rt.block_on(async {
            match s.as_str() {
                "enroll" | "scale" => scenario_enroll(&a, a.enroll_agents).await,
                "hold" => scenario_hold(&a, a.hold_agents, a.hold_secs).await,
                "detect" => {
                    let (i, t) = if a.quick { (0.5, 1.5) } else { (5.0, 15.0) };
                    scenario_detect(&a, a.detect_agents, a.detect_held, i, t).await
                }
                "scaling" => scenario_scaling(&a).await,
                "floor" => Ok(crypto_floor()),
                "agent" => scenario_agent(a.agent_secs, a.agent.as_deref()).await,
                other => {
                    anyhow::bail!(
                        "unknown scenario {other:?}: use floor, enroll, scaling, hold, detect, agent"
                    )
                }
            }
        })?;
        print_table(&s, &r);
        results.insert(s, r);
    }
    std::fs::write(&a.json, serde_json::to_string_pretty(&Value::Object(results))?)?;
    eprintln!("wrote {}", a.json.display());
    // Simulated agents' tasks die with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn proc_meminfo() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn print_table(name: &str, v: &Value) {
    println!("{name}");
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            let shown = match x {
                Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap()),
                other => other.to_string(),
            };
            println!("  {k:<42} {shown}");
        }
    }
}
