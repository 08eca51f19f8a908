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

mod agents;
mod harness;
mod scenarios;

use agents::*;
use harness::*;
use scenarios::*;

#[derive(Debug, Parser)]
#[command(
    name = "ddisco-bench",
    about = "Benchmarks of the ddisco control plane (prints a table, writes JSON)"
)]
struct Args {
    /// Scenarios to run: enroll (also measures scale 0->N), scaling (enroll
    /// at each of --scaling-agents), hold, detect, agent, floor; setup
    /// (--setup-nodes real local nodes, on request).
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
    /// Real local nodes set up at once (setup scenario; not in the default
    /// list: it runs as many agent processes).
    #[arg(long, default_value_t = 200)]
    setup_nodes: usize,
    /// The requirement the setup scenario's nodes install (served by the
    /// controller).
    #[arg(long, default_value = "iso8601")]
    setup_requirement: String,
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
        a.setup_nodes = a.setup_nodes.min(3);
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
                "setup" => scenario_setup(a.setup_nodes, &a.setup_requirement, a.agent.as_deref()).await,
                other => {
                    anyhow::bail!(
                        "unknown scenario {other:?}: use floor, enroll, scaling, hold, detect, agent, setup"
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
