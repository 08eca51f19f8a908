//! The scenarios: enroll, hold, detect, scaling, crypto floor, agent.

use super::*;

pub(super) async fn scenario_enroll(a: &Args, n: usize) -> anyhow::Result<Value> {
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

pub(super) async fn scenario_hold(a: &Args, n: usize, secs: u64) -> anyhow::Result<Value> {
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

pub(super) async fn scenario_detect(
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
pub(super) async fn scenario_scaling(a: &Args) -> anyhow::Result<Value> {
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
pub(super) fn crypto_floor() -> Value {
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
pub(super) async fn scenario_agent(secs: u64, agent: Option<&Path>) -> anyhow::Result<Value> {
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

/// Set-up at size: `nodes` real local nodes (1 master, the rest slaves,
/// engine none) whose plan installs `requirement` from the controller's
/// prepared packages (`pip_source = "controller"`): the time from `serve`
/// to all ready, the controller's CPU over it, and what the download port
/// served (each node fetches the agent and the packages).
pub(super) async fn scenario_setup(
    nodes: usize,
    requirement: &str,
    agent: Option<&Path>,
) -> anyhow::Result<Value> {
    anyhow::ensure!(nodes >= 1, "the setup scenario needs 1 node at least");
    let exe = std::env::current_exe()?;
    let agent = agent.map(Path::to_path_buf).unwrap_or_else(|| exe.with_file_name("ddisco-agent"));
    anyhow::ensure!(agent.exists(), "no agent binary at {}", agent.display());
    let agent = agent.canonicalize()?;
    let agent_bytes = std::fs::metadata(&agent)?.len();
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("ddisco.toml");
    std::fs::write(
        &cfg,
        format!(
            "provider = \"local\"\nengine = \"none\"\nbase_packages = []\nadditional_packages = []\n\
             pip_requirements = [{requirement:?}]\npip_source = \"controller\"\n\
             listen = \"127.0.0.1:0\"\ndownload_listen = \"127.0.0.1:0\"\ndashboard_listen = \"127.0.0.1:0\"\n\
             num_slaves = {}\nagent_binary = \"{}\"\nheartbeat_interval_secs = 5.0\nheartbeat_timeout_secs = 120.0\n",
            nodes - 1,
            agent.display()
        ),
    )?;
    let serve = exe.with_file_name("ddisco-controller");
    let log = dir.path().join("serve.log");
    let t0 = Instant::now();
    let mut child = Command::new(&serve)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = child.id();
    let result = async {
        let sock = dir.path().join(".ddisco/admin.sock");
        let end = Instant::now() + Duration::from_secs(600);
        let mut admin = loop {
            if let Ok(c) = AdminClient::connect(&sock).await {
                break c;
            }
            anyhow::ensure!(Instant::now() < end, "the controller did not start; see its log");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let up = t0.elapsed();
        let cpu0 = proc_cpu(pid);
        wait_ready(&mut admin, nodes, Duration::from_secs(1800)).await?;
        let ready = t0.elapsed();
        let cpu = proc_cpu(pid) - cpu0;
        // The prepared archive's size, from the controller's log line.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let plain: String = text.split('\x1b').map(|p| p.split_once('m').map_or(p, |(_, r)| r)).collect();
        let env_bytes: u64 = plain
            .lines()
            .find(|l| l.contains("Python packages are ready"))
            .and_then(|l| l.split("bytes=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let served = nodes as f64 * (agent_bytes + env_bytes) as f64;
        let window = (ready - up).as_secs_f64();
        let _ = admin.destroy().await;
        Ok(json!({
            "nodes": nodes,
            "requirement": requirement,
            "serve_to_admin_s": up.as_secs_f64(),
            "serve_to_all_ready_s": ready.as_secs_f64(),
            "launch_to_all_ready_s": window,
            "controller_cpu_s": cpu,
            "controller_cpu_pct_of_one_core": 100.0 * cpu / window.max(1e-9),
            "agent_bytes": agent_bytes,
            "python_env_bytes": env_bytes,
            "download_served_mb": served / 1e6,
            "download_mb_per_s": served / 1e6 / window.max(1e-9),
        }))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}
