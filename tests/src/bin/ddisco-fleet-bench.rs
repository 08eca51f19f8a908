//! The fleet benchmark (issue 27, item 3): the real controller drives a
//! thousand-instance EC2 cluster through the fault proxy in front of moto,
//! with EC2's latencies at that size (`DescribeInstances` 8 s,
//! `TerminateInstances` 30 s by default), and every instance's agent
//! simulated in this process: after the modelled boot time it enrolls with
//! its bootstrap token and a signed identity document (real TLS, real
//! gRPC), reports its plan's steps done and heartbeats; terminated
//! instances' agents stop. It prints (and with `--json` writes):
//!
//! - time from `serve` to every node ready, and that less the modelled
//!   boot time (what the controller and EC2's API add);
//! - EC2 API calls per instance launched, per action;
//! - loss detection: `--freeze` ready slaves stop heartbeating; the time
//!   from each one's last heartbeat to its "lost" event, against the
//!   heartbeat timeout + 2 s.
//!
//! It lives in the tests crate, beside the EC2 doubles it drives (moto,
//! the proxy, the identity signing key); `ddisco-bench` measures the
//! controller alone. Run: `cargo run -p ddisco-tests --bin
//! ddisco-fleet-bench -- --instances 1000` (needs `.venv-moto`, as the
//! EC2 tests do). **Test double:** the agents are simulated (no thousand
//! machines here); EC2 is moto plus the proxy's model.

use ddisco_proto::v1 as api;
use ddisco_tests::ec2::*;
use ddisco_tests::peer::{Boot, Session};
use ddisco_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Args {
    instances: usize,
    describe_latency: f64,
    terminate_latency: f64,
    boot: f64,
    freeze: usize,
    heartbeat: f64,
    json: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        instances: 1000,
        describe_latency: 8.0,
        terminate_latency: 30.0,
        boot: 20.0,
        freeze: 10,
        heartbeat: 2.0,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--instances" => a.instances = v().parse().expect("--instances N"),
            "--describe-latency" => a.describe_latency = v().parse().expect("--describe-latency SECS"),
            "--terminate-latency" => a.terminate_latency = v().parse().expect("--terminate-latency SECS"),
            "--boot" => a.boot = v().parse().expect("--boot SECS"),
            "--freeze" => a.freeze = v().parse().expect("--freeze N"),
            "--heartbeat" => a.heartbeat = v().parse().expect("--heartbeat SECS"),
            "--json" => a.json = Some(v()),
            other => panic!(
                "unknown argument {other}: --instances N --describe-latency S --terminate-latency S --boot S \
                 --freeze N --heartbeat S --json PATH"
            ),
        }
    }
    assert!(a.instances >= 2 && a.freeze < a.instances, "--instances must exceed --freeze and be at least 2");
    a
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// One simulated node's shared state.
#[derive(Default)]
struct Agent {
    frozen: AtomicBool,
    /// Unix ms of the last heartbeat sent.
    last_hb: AtomicU64,
    ready: AtomicBool,
}

/// Instance id -> (node id, its agent, its task).
type Fleet = BTreeMap<String, (String, Arc<Agent>, tokio::task::JoinHandle<()>)>;

/// The instance's facts from moto: (launch index, zone, private ip, image, type).
async fn described(
    c: &aws_sdk_ec2::Client,
    ids: &[String],
) -> HashMap<String, (usize, String, String, String, String)> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(200) {
        let Ok(d) = c.describe_instances().set_instance_ids(Some(chunk.to_vec())).send().await else {
            continue;
        };
        for i in d.reservations().iter().flat_map(|r| r.instances()) {
            out.insert(
                i.instance_id().unwrap_or_default().to_string(),
                (
                    i.ami_launch_index().unwrap_or(0) as usize,
                    i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
                    i.private_ip_address().unwrap_or_default().to_string(),
                    i.image_id().unwrap_or_default().to_string(),
                    i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                ),
            );
        }
    }
    out
}

/// One node: boots (the modelled time), enrolls with its token and identity
/// document, says hello, reports its steps done, heartbeats until frozen
/// or its task is aborted (its instance terminated).
async fn node(
    boot: Boot,
    token: String,
    inst: Inst,
    ip: String,
    (delay, every): (Duration, Duration),
    st: Arc<Agent>,
) {
    tokio::time::sleep(delay).await;
    let identity = identity_of(&inst, &ip, &inst.zone);
    let host = format!("ip-{}", ip.replace('.', "-"));
    let facts = api::NodeFacts {
        instance_id: inst.id.clone(),
        hostname: host,
        addresses: vec![ip.clone()],
        logical_cores: 2,
        memory_bytes: 4 << 30,
        arch: "x86_64".into(),
        started_unix_ms: unix_ms(),
        ..Default::default()
    };
    let enrolled = loop {
        match ddisco_tests::peer::enroll_as(&boot, &token, facts.clone(), Some(identity.clone())).await {
            Ok(r) => break r,
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(s) => {
                eprintln!("{}: enrollment refused: {s}", inst.id);
                return;
            }
        }
    };
    let (reply, key) = enrolled;
    let session = loop {
        match Session::open(&boot, Some((&reply.certificate_pem, &key)), facts.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                eprintln!("{}: session: {e}; again", inst.id);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    session.finish_plan().await;
    st.ready.store(true, Ordering::Relaxed);
    let Session { inbound: mut rx, tx, .. } = session;
    tokio::spawn(async move { while let Ok(Some(_)) = rx.message().await {} });
    let mut tick = tokio::time::interval(every);
    let mut seq = 0;
    loop {
        tick.tick().await;
        if st.frozen.load(Ordering::Relaxed) {
            continue;
        }
        seq += 1;
        let hb = api::AgentMessage {
            msg: Some(api::agent_message::Msg::Heartbeat(api::Heartbeat { seq, load_milli: Some(100) })),
        };
        if tx.send(hb).await.is_err() {
            return;
        }
        st.last_hb.store(unix_ms(), Ordering::Relaxed);
    }
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let proxy = Arc::new(FaultProxy::start(&rt));
    proxy.set_model(Model {
        describe_latency: Duration::from_secs_f64(a.describe_latency),
        terminate_latency: Duration::from_secs_f64(a.terminate_latency),
        ..Model::default()
    });
    let moto_client = rt.block_on(client(moto()));
    let sg = rt.block_on(default_sg(&moto_client));
    let tag = format!("fleet-{:08x}", std::process::id());
    let timeout = a.heartbeat * 3.0;
    let config = format!(
        r#"
provider = "ec2"
engine = "none"
region = "us-east-1"
endpoint_url = "{url}"
tag_key = "{tag}"
ami = "ami-1e749f67"
security_groups = ["{sg}"]
instance_type = "c5.large"
advertise = "127.0.0.1"
ec2_max_attempts = 1
num_slaves = {slaves}
base_packages = []
additional_packages = []
pip_requirements = []
heartbeat_interval_secs = {hb}
heartbeat_timeout_secs = {timeout}
boot_timeout_secs = {boot_timeout}
identity_certificate = "{cert}"
listen = "127.0.0.1:0"
download_listen = "127.0.0.1:0"
dashboard_listen = "127.0.0.1:0"
"#,
        url = proxy.url,
        slaves = a.instances - 1,
        hb = a.heartbeat,
        boot_timeout = (a.boot * 3.0 + 600.0).round(),
        cert = identity_certificate().display()
    );
    let t0 = Instant::now();
    let mut cluster = Cluster::start_with_env(&config, aws_env());
    let agents: Arc<std::sync::Mutex<Fleet>> = Arc::default();
    let every = Duration::from_secs_f64(a.heartbeat);
    let boot_time = Duration::from_secs_f64(a.boot);
    // The hypervisor: boots what the proxy launched, ends what it terminated.
    let hv = {
        let (agents, proxy) = (agents.clone(), proxy.clone());
        let mut seen = 0usize;
        let mut terminated_seen = 0usize;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let c = moto_client.clone();
        let h = rt.spawn(async move {
            while !stop2.load(Ordering::Relaxed) {
                let new = proxy.launches(seen);
                seen += new.len();
                for (userdata, ids) in new {
                    let boot = Boot::of(&userdata);
                    let facts = described(&c, &ids).await;
                    for id in ids {
                        let Some((idx, zone, ip, image, itype)) = facts.get(&id).cloned() else { continue };
                        let Some((node_id, token)) = boot.slots.get(idx).cloned() else { continue };
                        let inst = Inst {
                            id: id.clone(),
                            state: "running".into(),
                            instance_type: itype,
                            zone: zone.clone(),
                            lifecycle: "spot".into(),
                            image_id: image,
                            iam_profile: String::new(),
                            tags: HashMap::new(),
                            launch_index: idx as i32,
                            launch_time: 0,
                        };
                        let st = Arc::new(Agent::default());
                        let task =
                            tokio::spawn(node(boot.clone(), token, inst, ip, (boot_time, every), st.clone()));
                        agents.lock().unwrap().insert(id, (node_id, st, task));
                    }
                }
                let terms = proxy.requests("TerminateInstances");
                for (_, p) in terms.iter().skip(terminated_seen) {
                    for (k, v) in p {
                        if k.starts_with("InstanceId.")
                            && let Some((_, _, task)) = agents.lock().unwrap().get(v)
                        {
                            task.abort();
                        }
                    }
                }
                terminated_seen = terms.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        (stop, h)
    };
    let ready = |s: &Value| ready_count(s, "master") + ready_count(s, "slave");
    let all = a.instances;
    cluster.wait_until("every node ready", Duration::from_secs(1800), |s| {
        ready(s) == all && nodes(s).len() == all
    });
    let to_ready = t0.elapsed().as_secs_f64();
    let counts = proxy.counts();
    let launched = rt.block_on(instances(&moto_client, &tag)).len();
    eprintln!("all {all} ready after {to_ready:.1}s; freezing {} slaves", a.freeze);

    // Loss detection: freeze slaves, each at a random moment of one interval.
    let victims: Vec<(String, Arc<Agent>)> = {
        let map = agents.lock().unwrap();
        let mut slaves: Vec<(String, Arc<Agent>)> = map
            .values()
            .filter(|(n, st, _)| n.starts_with("slave") && st.ready.load(Ordering::Relaxed))
            .map(|(n, st, _)| (n.clone(), st.clone()))
            .collect();
        slaves.sort_by_key(|(n, _)| n.clone());
        let step = (slaves.len() / a.freeze.max(1)).max(1);
        slaves.into_iter().step_by(step).take(a.freeze).collect()
    };
    for (i, (_, st)) in victims.iter().enumerate() {
        let st = st.clone();
        let delay = Duration::from_millis((i as u64 * 997) % (a.heartbeat * 1000.0) as u64);
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            st.frozen.store(true, Ordering::Relaxed);
        });
    }
    let names: HashSet<&str> = victims.iter().map(|(n, _)| n.as_str()).collect();
    let s =
        cluster.wait_until("every frozen slave lost", Duration::from_secs_f64(timeout * 4.0 + 120.0), |s| {
            let lost: HashSet<&str> = s["timed_events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["message"].as_str())
                .filter_map(|m| names.iter().find(|n| m.starts_with(&format!("{n} lost"))).copied())
                .collect();
            lost.len() == names.len()
        });
    // How far behind the controller is with heartbeats: the oldest last
    // heartbeat it has of a node still heartbeating (a loaded controller
    // reads them late, and then declares losses late too).
    let healthy_age = nodes(&s)
        .iter()
        .filter(|n| n["state"] == "ready" && !names.contains(n["node_id"].as_str().unwrap_or("")))
        .filter_map(|n| n["last_heartbeat_ms"].as_u64())
        .max()
        .unwrap_or(0) as f64
        / 1000.0;
    let mut to_lost: Vec<f64> = Vec::new();
    for (n, st) in &victims {
        let at = s["timed_events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["message"].as_str().is_some_and(|m| m.starts_with(&format!("{n} lost"))))
            .and_then(|e| e["unix_ms"].as_u64())
            .unwrap_or(0);
        to_lost.push(at.saturating_sub(st.last_hb.load(Ordering::Relaxed)) as f64 / 1000.0);
    }
    to_lost.sort_by(f64::total_cmp);
    let lost_events: Vec<String> = s["timed_events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| names.iter().any(|n| m.starts_with(&format!("{n} lost"))))
        .take(3)
        .map(String::from)
        .collect();
    if let Some(p) = &a.json {
        let _ = std::fs::write(format!("{p}.serve.log"), cluster.serve_log());
    }
    let bound = timeout + 2.0;
    let within = to_lost.iter().filter(|d| **d <= bound).count();
    let calls: u32 = counts.values().sum();
    let per_action: BTreeMap<String, f64> =
        counts.iter().map(|(k, v)| (k.clone(), *v as f64 / launched.max(1) as f64)).collect();
    let out = json!({
        "instances": all,
        "describe_latency_s": a.describe_latency,
        "terminate_latency_s": a.terminate_latency,
        "modelled_boot_s": a.boot,
        "serve_to_all_ready_s": to_ready,
        "beyond_boot_s": to_ready - a.boot,
        "instances_launched": launched,
        "api_calls_to_ready": calls,
        "api_calls_per_instance": calls as f64 / launched.max(1) as f64,
        "api_calls_per_instance_by_action": per_action,
        "frozen_slaves": victims.len(),
        "heartbeat_timeout_s": timeout,
        "last_heartbeat_to_lost_s": to_lost,
        "lost_within_timeout_plus_2s": within,
        "oldest_heartbeat_of_a_live_node_s": healthy_age,
        "lost_events": lost_events,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    if let Some(p) = &a.json {
        std::fs::write(p, out.to_string()).expect("write --json");
    }
    // Tear down: the controller destroys what it launched.
    let (stop, h) = hv;
    proxy.with_model(|m| m.terminate_latency = Duration::ZERO);
    let _ = cluster.ctl(&["destroy", "--yes"]);
    stop.store(true, Ordering::Relaxed);
    let _ = rt.block_on(h);
    drop(cluster);
}
