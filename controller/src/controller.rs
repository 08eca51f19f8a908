//! `serve`: wires the pieces together and runs the reconcile loop.
//!
//! ```text
//!  agents --TLS gRPC--> grpc.rs (Enrollment, Agent) --\
//!  nodes  --HTTPS-----> download.rs (agent binary)     |--> Shared (registry, pki, provider)
//!  CLI    --Unix sock-> admin.rs (Status/Scale/Destroy)/        ^
//!                       reconcile loop: provider.list -> decide -> act
//! ```
//!
//! Every long-running task takes a shutdown signal (a `watch` channel) and
//! ends when it fires; `serve` returns once all of them have stopped.

use crate::config::Config;
use crate::model::Role;
use crate::pki::{self, Pki};
use crate::provider::{LaunchBatch, Provider, ProviderError, Target};
use crate::reconcile::{Action, Desired, Limits, Reason, decide};
use crate::registry::{NewNode, Registry, unix_ms};
use crate::userdata::{Bootstrap, Slot, Userdata};
use anyhow::Context;
use ddisco_proto::v1 as api;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long a restarted controller waits for adopted nodes to reconnect
/// before their heartbeat timeout starts (the agents' backoff cap).
pub const ADOPTION_GRACE_MS: u64 = 10_000;

/// Monotonic milliseconds since the controller started (never 0).
#[derive(Debug)]
pub struct Clock {
    start: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { start: tokio::time::Instant::now() }
    }
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Addresses and artifacts written into every node's userdata.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub grpc_url: String,
    pub agent_url: String,
    pub agent_sha256: String,
}

/// State shared by the servers and the reconcile loop.
pub struct Shared {
    pub cfg: Config,
    /// The map/reduce engine (plain functions over the membership).
    pub engine: Box<dyn crate::engine::Engine>,
    /// Membership changed since the last `publish`.
    membership_changed: AtomicBool,
    /// Held only for short, synchronous sections; never across `.await`.
    pub registry: Mutex<Registry>,
    pub clock: Clock,
    pub pki: Pki,
    pub provider: Arc<dyn Provider>,
    pub endpoints: Endpoints,
    pub cert_validity: Duration,
    /// Wakes the reconcile loop early (scale, enrollment, loss).
    pub wake: Notify,
    /// Wakes the persister.
    persist: Notify,
    /// Serialises reconcile ticks with `destroy` (a tokio mutex: held across
    /// provider calls).
    pub tick_lock: tokio::sync::Mutex<()>,
    /// Set by `destroy`: no more launches.
    pub destroying: AtomicBool,
    /// When spot prices were last fetched (tokio mutex: held across the call).
    prices_at: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Since when (controller clock, ms) the cluster has been idle while it
    /// had on-demand slaves; `None`: not idle or nothing to replace.
    idle_since: Mutex<Option<u64>>,
    pub metrics: crate::metrics::Metrics,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// The registry changed: save it soon.
    pub fn changed(&self) {
        self.persist.notify_one();
    }

    /// Something engines care about changed (a node became ready or started
    /// leaving, an attribute arrived): recompute directives on the next tick.
    pub fn membership_changed(&self) {
        self.membership_changed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The engine's view of every node.
    pub fn members(&self) -> Vec<crate::engine::Member> {
        let reg = self.registry.lock().expect("registry lock");
        reg.entries()
            .filter(|e| !matches!(e.rec.state, crate::model::NodeState::Terminating))
            .map(|e| {
                let facts = e.rec.facts.clone().unwrap_or_default();
                let address = if e.rec.address.is_empty() {
                    facts.addresses.first().cloned().unwrap_or_default()
                } else {
                    e.rec.address.clone()
                };
                crate::engine::Member {
                    id: e.rec.id.clone(),
                    role: Some(e.rec.role),
                    address,
                    hostname: facts.hostname.split('.').next().unwrap_or("").to_string(),
                    workers: e.rec.workers,
                    ready: e.rec.state == crate::model::NodeState::Ready
                        || e.rec.state == crate::model::NodeState::Draining,
                    leaving: e.rec.state == crate::model::NodeState::Draining || !e.rec.notice.is_empty(),
                    attributes: e.rec.attributes.clone(),
                }
            })
            .collect()
    }

    /// Recomputes every node's directives and pushes those that changed to
    /// connected agents. Runs after membership changes, not per heartbeat.
    pub fn publish(&self) {
        if !self.membership_changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let members = self.members();
        let lives: Vec<(String, Arc<crate::registry::Liveness>)> = {
            let reg = self.registry.lock().expect("registry lock");
            reg.entries().map(|e| (e.rec.id.clone(), e.live.clone())).collect()
        };
        for (id, live) in lives {
            let Some(me) = members.iter().find(|m| m.id == id) else { continue };
            if !me.ready {
                continue;
            }
            let layout = self.provider.layout(&id);
            let d = crate::engine::to_api(&self.engine.directives(me, &members, &layout));
            live.push_directives(&d);
        }
    }

    pub fn metrics_refusal(&self) {
        crate::metrics::Metrics::inc(&self.metrics.refusals);
    }

    /// Fires when the controller stops.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks `serve` to stop.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    fn limits(&self) -> Limits {
        Limits {
            boot_timeout_ms: self.cfg.boot_timeout.as_millis() as u64,
            heartbeat_timeout_ms: self.cfg.heartbeat_timeout.as_millis() as u64,
            drain_ms: if self.engine.name() == "none" {
                0
            } else {
                self.cfg.drain_timeout.as_millis() as u64
            },
        }
    }

    fn cluster_file(&self) -> PathBuf {
        self.cfg.state_dir.join("cluster.json")
    }

    /// Writes `cluster.json` if anything changed since the last save.
    pub fn save(&self) -> anyhow::Result<()> {
        let json = {
            let mut reg = self.registry.lock().expect("registry lock");
            if !reg.dirty {
                return Ok(());
            }
            reg.dirty = false;
            reg.to_json()
        };
        pki::write_private(&self.cluster_file(), &json)?;
        Ok(())
    }
}

/// Creates the state directory (mode 0700).
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on state_dir {}", cfg.state_dir.display()))?;
    Ok(())
}

/// The provider named by the configuration.
pub async fn make_provider(cfg: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    match cfg.provider {
        crate::config::ProviderKind::Local => Ok(Arc::new(
            crate::provider::local::LocalProvider::new(&cfg.state_dir, cfg.local_install_packages)
                .with_context(|| format!("cannot prepare local nodes under {}", cfg.state_dir.display()))?,
        )),
        crate::config::ProviderKind::Record => Ok(Arc::new(
            crate::provider::record::RecordProvider::new(&cfg.state_dir)
                .with_context(|| format!("cannot prepare {}", cfg.state_dir.display()))?,
        )),
        crate::config::ProviderKind::Ec2 => {
            Ok(Arc::new(crate::provider::ec2::Ec2Provider::new(cfg).await.map_err(preflight_error)?))
        }
    }
}

/// Finds the agent binary to serve: the configured path, or `ddisco-agent`
/// next to this program.
pub fn agent_binary_path(cfg: &Config) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cfg.agent_binary {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("cannot locate this program")?;
    Ok(exe.with_file_name("ddisco-agent"))
}

/// Runs the control plane until Ctrl-C, SIGTERM, or `destroy`.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    prepare_state_dir(&cfg)?;

    let agent_path = agent_binary_path(&cfg)?;
    let agent_bytes = std::fs::read(&agent_path).with_context(|| {
        format!(
            "cannot read the agent binary {} (set agent_binary in the config, or build it: \
             cargo build -p ddisco-agent)",
            agent_path.display()
        )
    })?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent_bytes));

    // Port 0 means "pick one", once: nodes know the address from their
    // userdata, so a restarted controller must come back on the same ports.
    let ports_file = cfg.state_dir.join("ports.json");
    let saved: Option<(u16, u16)> =
        std::fs::read_to_string(&ports_file).ok().and_then(|t| serde_json::from_str(&t).ok());
    let grpc_std = bind_keeping_port(cfg.listen, saved.map(|p| p.0), "listen")?;
    let dl_listener = bind_keeping_port(cfg.download_listen, saved.map(|p| p.1), "download_listen")?;
    let grpc_addr = grpc_std.local_addr()?;
    let dl_addr = dl_listener.local_addr()?;
    let dash_listener = tokio::net::TcpListener::bind(cfg.dashboard_listen)
        .await
        .with_context(|| format!("cannot listen on {} (key `dashboard_listen`)", cfg.dashboard_listen))?;
    let dash_addr = dash_listener.local_addr()?;
    pki::write_private(&cfg.state_dir.join("dashboard.addr"), &dash_addr.to_string())?;
    pki::write_private(&ports_file, &serde_json::to_string(&(grpc_addr.port(), dl_addr.port()))?)?;
    grpc_std.set_nonblocking(true)?;
    let grpc_listener = tokio::net::TcpListener::from_std(grpc_std)?;

    let host = advertise_host(&cfg, grpc_addr);
    let pki = Pki::load_or_create(&cfg.state_dir, &cfg.tag_key, std::slice::from_ref(&host))
        .context("cannot prepare the cluster CA in state_dir")?;
    let endpoints = Endpoints {
        grpc_url: format!("https://{}", join_host_port(&host, grpc_addr.port())),
        agent_url: format!("https://{}/agent/ddisco-agent", join_host_port(&host, dl_addr.port())),
        agent_sha256,
    };

    let clock = Clock::new();
    let cluster_file = cfg.state_dir.join("cluster.json");
    let registry = match std::fs::read_to_string(&cluster_file) {
        Ok(text) => {
            // Agents reconnect with a backoff capped at 10 s: count every
            // adopted node as heard from until then.
            let reg = Registry::from_json(&text, clock.now_ms() + ADOPTION_GRACE_MS).with_context(|| {
                format!("{} is damaged; move it away to start afresh", cluster_file.display())
            })?;
            tracing::info!(
                nodes = reg.len(),
                desired_slaves = reg.desired_slaves(),
                "re-adopting the cluster from {}",
                cluster_file.display()
            );
            reg
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Registry::new(cfg.pools().into_iter().map(|p| (p.name, p.count)).collect())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", cluster_file.display())),
    };

    let provider = make_provider(&cfg).await?;
    provider.preflight().await.map_err(preflight_error)?;
    let admin_path = cfg.admin_socket();
    let admin_listener = crate::admin::bind(&admin_path).await?;

    let cookie = cluster_cookie(&cfg)?;
    let engine = crate::engine::from_config(&cfg, cookie);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        engine,
        membership_changed: AtomicBool::new(true),
        cert_validity: Duration::from_secs(30 * 86_400),
        registry: Mutex::new(registry),
        clock,
        pki,
        provider,
        endpoints: endpoints.clone(),
        wake: Notify::new(),
        persist: Notify::new(),
        tick_lock: tokio::sync::Mutex::new(()),
        destroying: AtomicBool::new(false),
        prices_at: tokio::sync::Mutex::new(None),
        idle_since: Mutex::new(None),
        metrics: Default::default(),
        shutdown: shutdown_tx,
        cfg,
    });

    tracing::info!(
        grpc = %endpoints.grpc_url,
        agent = %endpoints.agent_url,
        admin = %admin_path.display(),
        metrics = %format!("http://{dash_addr}/metrics"),
        provider = shared.provider.name(),
        cluster = %shared.cfg.tag_key,
        ca_sha256 = %shared.pki.ca_fingerprint(),
        "controller started"
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(grpc_server(shared.clone(), grpc_listener, shutdown_rx.clone()));
    tasks.spawn(crate::download::serve(shared.clone(), dl_listener, agent_bytes, shutdown_rx.clone()));
    tasks.spawn(crate::admin::serve(shared.clone(), admin_listener, shutdown_rx.clone()));
    tasks.spawn(crate::dashboard::serve(shared.clone(), dash_listener, shutdown_rx.clone()));
    tasks.spawn(reconcile_loop(shared.clone(), shutdown_rx.clone()));
    tasks.spawn(persist_loop(shared.clone(), shutdown_rx.clone()));

    let mut stop_rx = shutdown_rx.clone();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping the controller (nodes keep running; `destroy` removes them)"),
        _ = sigterm.recv() => tracing::info!("SIGTERM; stopping the controller (nodes keep running; `destroy` removes them)"),
        _ = stop_rx.changed() => {}
        Some(res) = tasks.join_next() => {
            shared.stop();
            res??;
        }
    }
    shared.stop();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res? {
            tracing::error!("{e:#}");
        }
    }
    shared.save()?;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// Binds `addr`; when its port is 0 and an earlier run picked `saved`, tries
/// that port first so existing nodes can reconnect.
fn bind_keeping_port(
    addr: SocketAddr,
    saved: Option<u16>,
    key: &str,
) -> anyhow::Result<std::net::TcpListener> {
    if addr.port() == 0
        && let Some(port) = saved
    {
        match std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(l) => return Ok(l),
            Err(e) => tracing::warn!(
                "cannot reuse port {port} of the previous run ({e}); nodes launched before will not \
                 find this controller and will be replaced"
            ),
        }
    }
    std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (key `{key}`)"))
}

/// The cluster's Erlang cookie: created once (0600 in the state directory),
/// delivered to nodes only over their mutual-TLS sessions.
fn cluster_cookie(cfg: &Config) -> anyhow::Result<String> {
    let path = cfg.state_dir.join("erlang.cookie");
    if let Ok(c) = std::fs::read_to_string(&path) {
        return Ok(c.trim().to_string());
    }
    let cookie: String = hex::encode(rand::random::<[u8; 20]>()).to_uppercase();
    pki::write_private(&path, &cookie)?;
    Ok(cookie)
}

/// A preflight failure that names a config key is a configuration error.
pub fn preflight_error(e: ProviderError) -> anyhow::Error {
    match e {
        ProviderError::Config { key, message } => anyhow::Error::new(crate::config::ConfigError {
            path: "configuration".into(),
            key: Some(key),
            message,
        }),
        other => anyhow::anyhow!("the provider is not usable: {other}"),
    }
}

fn advertise_host(cfg: &Config, grpc: SocketAddr) -> String {
    if let Some(a) = &cfg.advertise {
        return a.clone();
    }
    match grpc.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        ip => ip.to_string(),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

async fn grpc_server(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&shared.pki.server_cert_pem, &shared.pki.server_key_pem))
        .client_ca_root(Certificate::from_pem(shared.pki.ca_pem()))
        // Enrollment is reached without a certificate (it takes a token);
        // the Agent service refuses sessions that present none.
        .client_auth_optional(true);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(api::enrollment_server::EnrollmentServer::new(crate::grpc::EnrollmentService {
            shared: shared.clone(),
        }))
        .add_service(api::agent_server::AgentServer::new(crate::grpc::AgentService { shared }))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn persist_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shared.persist.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        // Coalesce bursts (many enrollments) into one write.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = shared.save() {
            tracing::error!("cannot save the cluster state: {e:#}");
        }
    }
}

async fn reconcile_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        if !shared.destroying.load(Ordering::Relaxed) {
            let _guard = shared.tick_lock.lock().await;
            let t0 = std::time::Instant::now();
            let res = tick(&shared).await;
            crate::metrics::Metrics::inc(&shared.metrics.reconcile_ticks);
            shared.metrics.reconcile_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            if let Err(e) = res {
                tracing::warn!("reconcile: {e:#}; trying again next tick");
            }
            shared.publish();
            refresh_prices(&shared).await;
            shared.registry.lock().expect("registry lock").account(unix_ms());
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.cfg.reconcile_interval) => {}
            _ = shared.wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// Fetches spot prices every 10 minutes, or sooner (at most every 10 s)
/// while a node has none yet. Failures only delay the next try.
async fn refresh_prices(sh: &Arc<Shared>) {
    let mut at = sh.prices_at.lock().await;
    let (ids, unpriced) = {
        let reg = sh.registry.lock().expect("registry lock");
        let live: Vec<&crate::registry::Entry> = reg
            .entries()
            .filter(|e| e.rec.state != crate::model::NodeState::Terminating && e.rec.instance_id.is_some())
            .collect();
        let unpriced = live.iter().any(|e| e.rec.price_per_hour == 0.0);
        (live.iter().filter_map(|e| e.rec.instance_id.clone()).collect::<Vec<_>>(), unpriced)
    };
    let now = tokio::time::Instant::now();
    let due = match *at {
        None => true,
        Some(t) => now - t >= Duration::from_secs(600) || (unpriced && now - t >= Duration::from_secs(10)),
    };
    if ids.is_empty() || !due {
        return;
    }
    *at = Some(now);
    match sh.provider.prices(&ids).await {
        Ok(prices) if !prices.is_empty() => {
            let mut reg = sh.registry.lock().expect("registry lock");
            // Count the time so far at the old prices first.
            reg.account(unix_ms());
            let nodes: Vec<(String, String)> =
                reg.entries().filter_map(|e| Some((e.rec.id.clone(), e.rec.instance_id.clone()?))).collect();
            for (node, instance) in nodes {
                if let (Some(p), Some(e)) = (prices.get(&instance), reg.get_mut(&node)) {
                    e.rec.price_per_hour = *p;
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot refresh spot prices: {e}"),
    }
}

/// One reconcile pass: observe, decide, act.
pub async fn tick(sh: &Arc<Shared>) -> anyhow::Result<()> {
    // Without a fresh listing nothing is decided: stale data could kill
    // healthy nodes or launch duplicates.
    let observed = sh.provider.list().await.context("listing the cluster's instances")?;
    let (actions, orphans) = {
        let mut reg = sh.registry.lock().expect("registry lock");
        supersede_when_idle(sh, &mut reg);
        let (alive, orphans) = reg.match_observed(&observed);
        let views = reg.views(&alive, sh.clock.now_ms(), unix_ms());
        (decide(&Desired { pools: reg.desired.clone() }, &views, sh.limits()), orphans)
    };
    if actions.is_empty() && orphans.is_empty() {
        return Ok(());
    }
    // Only removals change what engines see (new nodes join when ready).
    // Launches must not wake the loop: a launch that fails would otherwise
    // be retried at once, in a hot loop, instead of next tick.
    if actions
        .iter()
        .any(|a| matches!(a, Action::Terminate { .. } | Action::Drain { .. } | Action::Forget { .. }))
    {
        sh.membership_changed();
    }
    let mut to_terminate: Vec<Target> = orphans
        .iter()
        .map(|o| Target { node_id: o.node_id.clone(), instance_id: Some(o.instance_id.clone()) })
        .collect();
    let mut launches = Vec::new();
    {
        let mut reg = sh.registry.lock().expect("registry lock");
        for o in &orphans {
            reg.event(format!(
                "terminating orphan instance {}: tagged for this cluster but unknown to it",
                o.instance_id
            ));
        }
        for action in actions {
            match action {
                Action::MarkBooting { id } => {
                    if let Some(e) = reg.get_mut(&id) {
                        e.rec.state = crate::model::NodeState::Booting;
                        e.rec.phase("running");
                    }
                }
                Action::Forget { id } => {
                    reg.remove(&id);
                }
                Action::Drain { id } => {
                    let mut why = "scale down";
                    if let Some(e) = reg.get_mut(&id) {
                        e.rec.state = crate::model::NodeState::Draining;
                        e.rec.drain_started_unix_ms = Some(unix_ms());
                        if e.rec.superseded {
                            why = "on-demand, its spot replacement is ready";
                        }
                    }
                    reg.event(format!(
                        "{id} draining before removal ({why}; up to {:.0}s)",
                        sh.cfg.drain_timeout.as_secs_f64()
                    ));
                }
                Action::Terminate { id, reason } => {
                    let Some(e) = reg.get_mut(&id) else { continue };
                    let role = e.rec.role;
                    e.rec.state = crate::model::NodeState::Terminating;
                    e.rec.phase("terminating");
                    e.rec.detail = reason.describe();
                    e.live.revoke();
                    to_terminate
                        .push(Target { node_id: Some(id.clone()), instance_id: e.rec.instance_id.clone() });
                    let msg = match (&reason, role) {
                        (r, Role::Master) if r.is_loss() => format!(
                            "MASTER {id} LOST ({}): the cluster cannot run jobs until a new master is ready; \
                             launching one now; slaves keep running and will be pointed at it",
                            r.describe()
                        ),
                        (r, _) if r.is_loss() => format!("{id} lost ({}); replacing it", r.describe()),
                        (Reason::ScaleDown, _) => format!("{id} removed (scale down)"),
                        (r, _) => format!("{id} terminated ({})", r.describe()),
                    };
                    if reason.is_loss() {
                        tracing::warn!("{msg}");
                        crate::metrics::Metrics::inc(&sh.metrics.replacements);
                    }
                    reg.event(msg);
                }
                Action::Launch { role, pool, count } => launches.push((role, pool, count)),
            }
        }
    }
    if !to_terminate.is_empty() {
        sh.provider.terminate(&to_terminate).await.context("terminating nodes")?;
        // Look again right away: terminated instances can then be forgotten.
        sh.wake.notify_one();
    }
    for (role, pool, count) in launches {
        if let Err(e) = sh.provider.can_launch() {
            let mut reg = sh.registry.lock().expect("registry lock");
            reg.event_once(format!("launches held back: {e}"));
            break;
        }
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(sh.provider.max_batch().max(1));
            left -= n;
            launch_batch(sh, role, &pool, n).await?;
        }
    }
    sh.changed();
    Ok(())
}

/// On-demand slaves of pools back on spot are replaced by spot ones once
/// the cluster has been idle for `on_demand_idle_replace` (the other
/// occasion is a scale change, in `admin.rs`).
fn supersede_when_idle(sh: &Shared, reg: &mut crate::registry::Registry) {
    use crate::model::NodeState;
    let wait = sh.cfg.on_demand_idle_replace;
    let mut since = sh.idle_since.lock().expect("idle lock");
    let candidates = reg.entries().any(|e| {
        e.rec.role == Role::Slave
            && e.rec.instance_type.ends_with(" on-demand")
            && !e.rec.superseded
            && e.rec.notice.is_empty()
            && !matches!(e.rec.state, NodeState::Terminating | NodeState::Draining | NodeState::Lost)
    });
    let loads: Vec<(Option<u32>, u32)> = reg
        .entries()
        .filter(|e| e.rec.state == NodeState::Ready)
        .map(|e| (e.live.load_milli(), e.rec.facts.as_ref().map_or(1, |f| f.logical_cores)))
        .collect();
    if wait.is_zero() || !candidates || !crate::reconcile::idle(&loads) {
        *since = None;
        return;
    }
    let now = sh.clock.now_ms();
    let start = *since.get_or_insert(now);
    if now.saturating_sub(start) < wait.as_millis() as u64 {
        return;
    }
    let desired = Desired { pools: reg.desired.clone() };
    let idle_for = format!("cluster idle for {:.0}s: ", now.saturating_sub(start) as f64 / 1000.0);
    if supersede_on_demand(sh, reg, &desired, &idle_for) > 0 {
        *since = None;
    }
}

/// Marks the on-demand slaves that `reconcile::supersede` picks (pools back
/// on spot, kept by `desired`) for replacement by spot; returns how many.
/// Called at a scale change and when the cluster is idle.
pub fn supersede_on_demand(
    sh: &Shared,
    reg: &mut crate::registry::Registry,
    desired: &Desired,
    why: &str,
) -> usize {
    let views = reg.views(&Default::default(), 0, 0);
    let ids = crate::reconcile::supersede(desired, &views, |pool| sh.provider.spot_again(Role::Slave, pool));
    for id in &ids {
        if let Some(e) = reg.get_mut(id) {
            e.rec.superseded = true;
        }
        reg.event(format!("{why}{id} runs on-demand but spot works again: replacing it with a spot node"));
    }
    if !ids.is_empty() {
        reg.dirty = true;
    }
    ids.len()
}

/// Records `n` new nodes (persisted before the call, so that a crash cannot
/// leak what the call starts), mints their tokens, and launches them in one
/// provider call.
async fn launch_batch(sh: &Arc<Shared>, role: Role, pool: &str, n: usize) -> anyhow::Result<()> {
    let batch_id = format!("b{}", hex::encode(rand::random::<[u8; 8]>()));
    let expires = unix_ms() + sh.cfg.token_ttl.as_millis() as u64;
    let mut secrets = Vec::with_capacity(n);
    let mut nodes = Vec::with_capacity(n);
    let mut addresses = Vec::with_capacity(n);
    {
        let mut reg = sh.registry.lock().expect("registry lock");
        for i in 0..n {
            let (secret, token_hash) = pki::mint_token();
            let new = NewNode {
                role,
                pool: pool.to_string(),
                batch: Some((batch_id.clone(), i as u32)),
                token_hash,
                token_expires_unix_ms: expires,
            };
            let id = reg.add_node(new, |seq| sh.provider.address_for(seq));
            addresses.push(reg.get(&id).map(|e| e.rec.address.clone()).unwrap_or_default());
            nodes.push(id);
            secrets.push(secret);
        }
        reg.event(format!("launching {} ({role}, pool {pool})", nodes.join(", ")));
    }
    sh.save()?;
    let ca_sha = sh.pki.ca_fingerprint();
    let userdata = Userdata {
        bootstrap: Bootstrap {
            controller: &sh.endpoints.grpc_url,
            server_name: pki::SERVER_NAME,
            ca_sha256: &ca_sha,
            imds: (sh.provider.name() == "ec2").then_some("http://169.254.169.254"),
            slots: nodes.iter().zip(&secrets).map(|(node_id, token)| Slot { node_id, token }).collect(),
        },
        ca_pem: sh.pki.ca_pem(),
        agent_url: &sh.endpoints.agent_url,
        agent_sha256: &sh.endpoints.agent_sha256,
        default_home: "/var/lib/ddisco",
    }
    .render();
    drop(secrets);
    let batch =
        LaunchBatch { batch_id, role, pool: pool.to_string(), nodes: nodes.clone(), addresses, userdata };
    let result = sh.provider.launch(batch).await;
    let mut reg = sh.registry.lock().expect("registry lock");
    match result {
        Ok(launched) => {
            sh.metrics.launches.fetch_add(launched.len() as u64, Ordering::Relaxed);
            for l in &launched {
                if let Some(e) = reg.get_mut(&l.node_id) {
                    e.rec.instance_id = Some(l.instance_id.clone());
                    e.rec.instance_type = l.instance_type.clone();
                }
            }
            let on_demand: Vec<&str> =
                launched.iter().filter(|l| l.on_demand_why.is_some()).map(|l| l.node_id.as_str()).collect();
            if let Some(why) = launched.iter().find_map(|l| l.on_demand_why.as_deref()) {
                let msg = format!("{} launched on-demand, not spot: {why}", on_demand.join(", "));
                tracing::warn!("{msg}");
                reg.event(msg);
            }
            for id in nodes.iter().filter(|id| !launched.iter().any(|l| &l.node_id == *id)) {
                reg.remove(id);
            }
        }
        Err(e) => {
            crate::metrics::Metrics::inc(&sh.metrics.launch_failures);
            for id in &nodes {
                reg.remove(id);
            }
            match &e {
                ProviderError::Config { .. } => tracing::error!("launch blocked: {e}"),
                _ => tracing::warn!("launch of {} failed: {e}", nodes.join(", ")),
            }
            reg.event_once(format!("launch in pool {pool} failed: {e}; will retry"));
        }
    }
    Ok(())
}

/// Terminates every node of the cluster; returns their ids (and the
/// instance ids of orphans).
pub async fn destroy_all(sh: &Arc<Shared>) -> anyhow::Result<Vec<String>> {
    sh.destroying.store(true, Ordering::Relaxed);
    let _guard = sh.tick_lock.lock().await;
    let observed = sh.provider.list().await?;
    let (mut targets, mut names) = {
        let mut reg = sh.registry.lock().expect("registry lock");
        let (_, orphans) = reg.match_observed(&observed);
        let ids: Vec<String> = reg.entries().map(|e| e.rec.id.clone()).collect();
        let mut targets = Vec::new();
        for id in &ids {
            if let Some(e) = reg.get_mut(id) {
                e.live.revoke();
                e.rec.state = crate::model::NodeState::Terminating;
                targets.push(Target { node_id: Some(id.clone()), instance_id: e.rec.instance_id.clone() });
            }
        }
        let mut names = ids;
        for o in orphans {
            names.push(o.node_id.clone().unwrap_or_else(|| o.instance_id.clone()));
            targets.push(Target { node_id: o.node_id, instance_id: Some(o.instance_id) });
        }
        (targets, names)
    };
    sh.provider.terminate(&targets).await?;
    let cancelled = sh.provider.cleanup().await?;
    let still: Vec<String> =
        sh.provider.list().await?.into_iter().filter(|o| o.alive).map(|o| o.instance_id).collect();
    anyhow::ensure!(still.is_empty(), "still running after terminate: {}", still.join(", "));
    {
        let mut reg = sh.registry.lock().expect("registry lock");
        let ids: Vec<String> = reg.entries().map(|e| e.rec.id.clone()).collect();
        for id in &ids {
            reg.remove(id);
        }
        reg.event(format!("cluster destroyed: {} nodes terminated", names.len()));
        if !cancelled.is_empty() {
            reg.event(format!("cancelled open spot requests: {}", cancelled.join(", ")));
        }
    }
    targets.clear();
    sh.save()?;
    names.sort();
    Ok(names)
}
