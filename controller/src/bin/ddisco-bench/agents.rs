//! Simulated agents: real TLS and gRPC, one connection each, in this
//! process.

use super::*;

/// One launch batch read back from the recording provider.
pub(super) struct Launch {
    pub(super) launched_unix_ms: u64,
    pub(super) boot: Arc<Boot>,
    pub(super) slots: Vec<(String, String)>,
}

pub(super) struct Boot {
    pub(super) controller: String,
    pub(super) server_name: String,
    pub(super) ca_pem: String,
}

impl Launch {
    pub(super) fn parse(text: &str) -> Option<Launch> {
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
pub(super) struct AgentState {
    /// Stop sending heartbeats (the process is "frozen"; its connection stays).
    pub(super) frozen: AtomicBool,
    /// Unix ms of the last heartbeat sent.
    pub(super) last_hb: AtomicU64,
    pub(super) ready: AtomicBool,
}

pub(super) async fn endpoint(
    boot: &Boot,
    identity: Option<(&str, &str)>,
) -> Result<tonic::transport::Channel, String> {
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
pub(super) async fn enroll(boot: &Boot, token: &str) -> Result<(Duration, String, String), String> {
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
pub(super) async fn session(
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
pub(super) async fn fleet(
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

pub(super) async fn wait_ready(
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
