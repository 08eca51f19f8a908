//! `serve`: prepares the state directory, listeners, PKI, provider and
//! engine, builds the [`Cluster`], and runs the servers and loops until
//! Ctrl-C, SIGTERM or `destroy`.
//!
//! Every long-running task takes the cluster's shutdown signal (a `watch`
//! channel) and ends when it fires; `serve` returns once all of them have
//! stopped.

use crate::cluster::{Clock, Cluster, Endpoints, Parts};
use crate::config::Config;
use crate::pki::{self, Pki};
use crate::provider::{Provider, ProviderError};
use crate::registry::Registry;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::watch;

/// How long a restarted controller waits for adopted nodes to reconnect
/// before their heartbeat timeout starts (the agents' backoff cap).
pub const ADOPTION_GRACE_MS: u64 = 10_000;

/// Creates the state directory (mode 0700).
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on state_dir {}", cfg.state_dir.display()))?;
    Ok(())
}

/// The provider named by the configuration, for the cluster `cluster_id`
/// (`state::cluster_id`: what its launches are tagged with).
pub async fn make_provider(cfg: &Config, cluster_id: &str) -> anyhow::Result<Arc<dyn Provider>> {
    match cfg.provider {
        crate::config::ProviderKind::Local if cfg.local_machines => Ok(Arc::new(
            crate::provider::local::LocalProvider::machines(&cfg.state_dir, cfg.local_install_packages)
                .map_err(preflight_error)?,
        )),
        crate::config::ProviderKind::Local => Ok(Arc::new(
            crate::provider::local::LocalProvider::new(&cfg.state_dir, cfg.local_install_packages)
                .with_context(|| format!("cannot prepare local nodes under {}", cfg.state_dir.display()))?,
        )),
        crate::config::ProviderKind::Record => Ok(Arc::new(
            crate::provider::record::RecordProvider::new(&cfg.state_dir)
                .with_context(|| format!("cannot prepare {}", cfg.state_dir.display()))?,
        )),
        crate::config::ProviderKind::Ec2 => Ok(Arc::new(
            crate::provider::ec2::Ec2Provider::new(&cfg.ec2, &cfg.node_shape(), &cfg.state_dir, cluster_id)
                .await
                .map_err(preflight_error)?,
        )),
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

/// Refuses an agent binary built for another architecture than the one it
/// is served to (an arm64 node cannot run an x86_64 agent, and the other
/// way round). Files that are not ELF (scripts in tests) pass.
fn check_agent_arch(bytes: &[u8], want: &str, key: &str, path: &std::path::Path) -> anyhow::Result<()> {
    match crate::download::elf_arch(bytes) {
        Some(arch) if arch != want => Err(anyhow::Error::new(crate::config::ConfigError {
            path: path.to_path_buf(),
            key: Some(key.to_string()),
            message: format!("this agent binary is built for {arch}, not {want}: give the {want} build here"),
        })),
        _ => Ok(()),
    }
}

/// The address nodes dial, on EC2 when `advertise` is not set: this
/// instance's private IPv4 (from its instance metadata); listeners left on
/// loopback bind it instead. Elsewhere, an error that says what to set.
async fn resolve_advertise(mut cfg: Config) -> anyhow::Result<Config> {
    if cfg.provider == crate::config::ProviderKind::Local && cfg.local_machines {
        // Machine nodes have their own network: they reach this host on
        // their bridge's address, which loopback listeners bind instead.
        let local =
            crate::provider::local::LocalProvider::machines(&cfg.state_dir, cfg.local_install_packages)
                .map_err(preflight_error)?;
        let gateway = local.gateway().expect("machine nodes have a gateway");
        cfg.advertise.get_or_insert_with(|| gateway.to_string());
        for addr in [&mut cfg.listen, &mut cfg.download_listen] {
            if addr.ip().is_loopback() {
                addr.set_ip(gateway.into());
            }
        }
        return Ok(cfg);
    }
    if cfg.provider != crate::config::ProviderKind::Ec2 || cfg.advertise.is_some() {
        return Ok(cfg);
    }
    let Some(ip) = crate::provider::ec2::instance_private_ip().await else {
        return Err(preflight_error(ProviderError::Config {
            key: "advertise".into(),
            message: "not set, and this machine is not an EC2 instance (its instance metadata did not answer). \
                      Nodes dial the controller: set advertise to an address of this machine they can reach, and \
                      listen / download_listen to bind it (e.g. \"0.0.0.0:7443\", \"0.0.0.0:7444\")"
                .into(),
        }));
    };
    tracing::info!(%ip, "advertise: this instance's private address (from its instance metadata)");
    cfg.advertise = Some(ip.to_string());
    for addr in [&mut cfg.listen, &mut cfg.download_listen] {
        if addr.ip().is_loopback() {
            addr.set_ip(ip);
        }
    }
    Ok(cfg)
}

/// Runs the control plane until Ctrl-C, SIGTERM, or `destroy`: the state
/// directory, the artifacts nodes download, the listeners, the cluster,
/// then its tasks.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    prepare_state_dir(&cfg)?;
    // A reason the last controller stopped for is not this one's.
    let _ = std::fs::remove_file(cfg.state_dir.join(crate::cluster::tick::STOP_REASON));
    let cluster_id = crate::state::cluster_id_or_mint(&cfg.state_dir)
        .with_context(|| format!("cannot keep the cluster id in {}", cfg.state_dir.display()))?;
    let cfg = resolve_advertise(cfg).await?;
    // Every node holds a connection: a default soft limit of 1,024 would
    // cap the cluster at a few hundred nodes.
    let fd_limit = match crate::limits::raise_fd_limit() {
        Ok((soft, hard, now)) => {
            tracing::info!(soft_before = soft, hard, now, "open-file limit");
            now
        }
        Err(e) => {
            tracing::warn!("cannot read or raise the open-file limit: {e}");
            u64::MAX
        }
    };
    let artifacts = Artifacts::read(&cfg)?;
    let listeners = Listeners::open(&cfg).await?;
    let host = advertise_host(&cfg, listeners.grpc_addr);
    let pki = Pki::load_or_create(&cfg.state_dir, &cfg.tag_key, std::slice::from_ref(&host))
        .context("cannot prepare the cluster CA in state_dir")?;
    let endpoints = artifacts.endpoints(&host, listeners.grpc_addr.port(), listeners.download_addr.port());
    let clock = Clock::new();
    let registry = load_registry(&cfg, &clock)?;
    let provider = make_provider(&cfg, &cluster_id).await?;
    // Nodes boot from the baked images of this region (`bake`), if any.
    if cfg.bake.is_none()
        && let Some(region) = provider.region()
    {
        let images = crate::bake::in_force(&crate::bake::read(&cfg.state_dir)?, &region);
        provider.use_images(images);
    }
    provider.preflight().await.map_err(preflight_error)?;
    let admin_path = cfg.admin_socket();
    let admin_listener = crate::admin::bind(&admin_path).await?;

    let cookie = cluster_cookie(&cfg)?;
    let pki = Arc::new(pki);
    let bundle = artifacts.disco_bundle.as_ref().map(|b| crate::engine::disco::Bundle {
        url: format!(
            "https://{}{}",
            join_host_port(&host, listeners.download_addr.port()),
            crate::download::DISCO_BUNDLE_PATH
        ),
        sha256: hex::encode(Sha256::digest(b)),
    });
    let engine = crate::engine::from_config(&cfg, cookie, pki.clone(), bundle);
    let mut files = artifacts.files();
    let python_envs =
        python_envs(&cfg, engine.as_ref(), provider.as_ref(), &host, listeners.download_addr.port())
            .await?
            .into_iter()
            .map(|(env, bytes)| {
                files.push((crate::download::python_env_path(&env.sha256), bytes));
                env
            })
            .collect();
    let shared = Arc::new(Cluster::new(Parts {
        cfg,
        engine,
        registry,
        clock,
        pki,
        provider,
        endpoints: endpoints.clone(),
        fd_limit,
        cluster_id: cluster_id.clone(),
        python_envs,
    }));
    if let Some(w) = crate::limits::fd_warning(fd_limit, shared.registry.lock().desired_slaves() + 1) {
        tracing::warn!("{w}");
    }
    tracing::info!(
        grpc = %endpoints.grpc_url,
        agent = %endpoints.agent_url,
        admin = %admin_path.display(),
        metrics = %format!(
            "{}://{}/metrics",
            if listeners.dashboard_addr.ip().is_loopback() { "http" } else { "https" },
            listeners.dashboard_addr
        ),
        provider = shared.provider.name(),
        cluster = %shared.cfg.tag_key,
        ca_sha256 = %shared.pki.ca_fingerprint(),
        "controller started"
    );
    run_tasks(&shared, listeners, files, admin_listener).await?;
    shared.save()?;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// The nodes' Python packages, prepared (or found in the cache) for each
/// architecture, with the bytes to serve; none when nodes install nothing
/// with pip or `pip_source = "index"`. A failure stops `serve` here, with
/// the installer's words, before any node is launched.
async fn python_envs(
    cfg: &Config,
    engine: &dyn crate::engine::Engine,
    provider: &dyn crate::provider::Provider,
    host: &str,
    download_port: u16,
) -> anyhow::Result<Vec<(crate::plan::PreparedEnv, Vec<u8>)>> {
    use crate::model::Role;
    if cfg.pip_source == crate::config::PipSource::Index {
        return Ok(vec![]);
    }
    let layout = provider.layout("master-0000");
    let steps = [engine.steps(Role::Master, 1, &layout), engine.steps(Role::Slave, 1, &layout)];
    let requirements = crate::pyenv::requirements(cfg, &steps);
    if requirements.is_empty() {
        return Ok(vec![]);
    }
    // An image the controller cannot tell the Python of (an AMI by id
    // without node_python): its nodes install from the index, as before.
    let python = match crate::pyenv::node_python(cfg, crate::pyenv::host_python) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                "{e}; until then, every node pip-installs {} from the package index",
                crate::pyenv::shown(&requirements)
            );
            return Ok(vec![]);
        }
    };
    let installer = crate::pyenv::find_installer();
    let cache = crate::pyenv::cache_dir();
    let mut out = Vec::new();
    for arch in crate::pyenv::archs(cfg) {
        let spec = crate::pyenv::Spec {
            requirements: requirements.clone(),
            python: python.clone(),
            arch: arch.into(),
        };
        let t0 = std::time::Instant::now();
        tracing::info!(
            requirements = %crate::pyenv::shown(&spec.requirements),
            python = %spec.python,
            arch,
            installer = ?installer,
            "preparing the nodes' Python packages"
        );
        let (prepared, cached) = crate::pyenv::prepare(&spec, &cache, &installer).await?;
        let bytes = std::fs::read(&prepared.path)
            .with_context(|| format!("cannot read the prepared packages {}", prepared.path.display()))?;
        let url = format!(
            "https://{}{}",
            join_host_port(host, download_port),
            crate::download::python_env_path(&prepared.sha256)
        );
        let env = prepared.for_nodes(url);
        tracing::info!(
            arch,
            cached,
            bytes = env.size,
            secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
            archive = %prepared.path.display(),
            "the nodes' Python packages are ready"
        );
        out.push((env, bytes));
    }
    Ok(out)
}

/// What nodes download from the controller: the agent binaries (checked
/// for their architecture) and the Disco build, read once at start.
struct Artifacts {
    agent: Vec<u8>,
    agent_sha256: String,
    agent_arm64: Option<Vec<u8>>,
    disco_bundle: Option<Vec<u8>>,
}

impl Artifacts {
    fn read(cfg: &Config) -> anyhow::Result<Artifacts> {
        let agent_path = agent_binary_path(cfg)?;
        let agent = std::fs::read(&agent_path).with_context(|| {
            format!(
                "cannot read the agent binary {} (set agent_binary in the config, or build it: \
                 cargo build -p ddisco-agent)",
                agent_path.display()
            )
        })?;
        check_agent_arch(&agent, "x86_64", "agent_binary", &agent_path)?;
        let agent_arm64 = match &cfg.agent_binary_arm64 {
            Some(p) => {
                let bytes = std::fs::read(p).with_context(|| {
                    format!("cannot read the arm64 agent {} (key `agent_binary_arm64`)", p.display())
                })?;
                check_agent_arch(&bytes, "arm64", "agent_binary_arm64", p)?;
                Some(bytes)
            }
            None => None,
        };
        let disco_bundle = match &cfg.disco.bundle {
            Some(p) => Some(std::fs::read(p).with_context(|| {
                format!(
                    "cannot read the Disco build {} (key `disco_bundle`; scripts/build-disco makes it)",
                    p.display()
                )
            })?),
            None => None,
        };
        Ok(Artifacts { agent_sha256: hex::encode(Sha256::digest(&agent)), agent, agent_arm64, disco_bundle })
    }

    /// Where nodes reach the controller and its downloads.
    fn endpoints(&self, host: &str, grpc_port: u16, download_port: u16) -> Endpoints {
        let download = |path: &str| format!("https://{}{path}", join_host_port(host, download_port));
        Endpoints {
            grpc_url: format!("https://{}", join_host_port(host, grpc_port)),
            agent_url: download(crate::download::AGENT_PATH),
            agent_sha256: self.agent_sha256.clone(),
            agent_arm64: self
                .agent_arm64
                .as_ref()
                .map(|b| (download(crate::download::AGENT_ARM64_PATH), hex::encode(Sha256::digest(b)))),
        }
    }

    /// The download port's files, by path.
    fn files(self) -> Vec<(String, Vec<u8>)> {
        let mut files = vec![(crate::download::AGENT_PATH.to_string(), self.agent)];
        files.extend(self.agent_arm64.map(|b| (crate::download::AGENT_ARM64_PATH.to_string(), b)));
        files.extend(self.disco_bundle.map(|b| (crate::download::DISCO_BUNDLE_PATH.to_string(), b)));
        files
    }
}

/// The controller's TCP listeners (the admin socket is opened later, once
/// the provider's preflight passed).
struct Listeners {
    grpc: tokio::net::TcpListener,
    grpc_addr: SocketAddr,
    download: std::net::TcpListener,
    download_addr: SocketAddr,
    dashboard: tokio::net::TcpListener,
    dashboard_addr: SocketAddr,
}

impl Listeners {
    /// Port 0 means "pick one", once: nodes know the address from their
    /// userdata, so a restarted controller must come back on the same ports
    /// (`ports.json`).
    async fn open(cfg: &Config) -> anyhow::Result<Listeners> {
        let ports_file = cfg.state_dir.join("ports.json");
        let saved: Option<(u16, u16)> =
            std::fs::read_to_string(&ports_file).ok().and_then(|t| serde_json::from_str(&t).ok());
        let grpc_std = bind_keeping_port(cfg.listen, saved.map(|p| p.0), "listen")?;
        let download = bind_keeping_port(cfg.download_listen, saved.map(|p| p.1), "download_listen")?;
        let grpc_addr = grpc_std.local_addr()?;
        let download_addr = download.local_addr()?;
        let dashboard = tokio::net::TcpListener::bind(cfg.dashboard_listen)
            .await
            .with_context(|| format!("cannot listen on {} (key `dashboard_listen`)", cfg.dashboard_listen))?;
        let dashboard_addr = dashboard.local_addr()?;
        pki::write_private(&cfg.state_dir.join("dashboard.addr"), &dashboard_addr.to_string())?;
        pki::write_private(&ports_file, &serde_json::to_string(&(grpc_addr.port(), download_addr.port()))?)?;
        grpc_std.set_nonblocking(true)?;
        let grpc = tokio::net::TcpListener::from_std(grpc_std)?;
        Ok(Listeners { grpc, grpc_addr, download, download_addr, dashboard, dashboard_addr })
    }
}

/// The registry of `cluster.json` (re-adopting its nodes), or a new one.
fn load_registry(cfg: &Config, clock: &Clock) -> anyhow::Result<Registry> {
    let cluster_file = cfg.state_dir.join("cluster.json");
    match std::fs::read_to_string(&cluster_file) {
        Ok(text) => {
            // Agents reconnect with a backoff capped at 10 s: count every
            // adopted node as heard from until then.
            let mut reg =
                Registry::from_json(&text, clock.now_ms() + ADOPTION_GRACE_MS).with_context(|| {
                    format!("{} is damaged; move it away to start afresh", cluster_file.display())
                })?;
            reg.replay_spent(&crate::cluster::persist::Journal::replay(&cfg.state_dir));
            tracing::info!(
                nodes = reg.len(),
                desired_slaves = reg.desired_slaves(),
                "re-adopting the cluster from {}",
                cluster_file.display()
            );
            Ok(reg)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(Registry::new(cfg.pools().into_iter().map(|p| (p.name, p.count)).collect()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", cluster_file.display())),
    }
}

/// Runs the servers and loops until Ctrl-C, SIGTERM, `stop`, or one of
/// them fails; then stops them all.
async fn run_tasks(
    shared: &Arc<Cluster>,
    listeners: Listeners,
    files: Vec<(String, Vec<u8>)>,
    admin_listener: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let shutdown_rx = shared.shutdown_signal();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::grpc::serve(shared.clone(), listeners.grpc, shutdown_rx.clone()));
    tasks.spawn(crate::download::serve(shared.clone(), listeners.download, files, shutdown_rx.clone()));
    tasks.spawn(crate::admin::serve(shared.clone(), admin_listener, shutdown_rx.clone()));
    tasks.spawn(crate::dashboard::serve(shared.clone(), listeners.dashboard, shutdown_rx.clone()));
    tasks.spawn(reconcile_loop(shared.clone(), shutdown_rx.clone()));
    tasks.spawn(persist_loop(shared.clone(), shutdown_rx.clone()));
    tasks.spawn(publish_loop(shared.clone(), shutdown_rx.clone()));
    tasks.spawn(renewal_loop(shared.clone(), shutdown_rx.clone()));
    let baking = shared.cfg.bake.is_some();
    if baking {
        tasks.spawn(crate::bake::drive(shared.clone(), shutdown_rx.clone()));
    }

    let mut stop_rx = shutdown_rx.clone();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let keep = if baking {
        "the bake node is destroyed first"
    } else {
        "nodes keep running; `destroy` removes them"
    };
    let signalled = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping the controller ({keep})"); true }
        _ = sigterm.recv() => { tracing::info!("SIGTERM; stopping the controller ({keep})"); true }
        _ = stop_rx.changed() => false,
        Some(res) = tasks.join_next() => {
            shared.stop();
            res??;
            false
        }
    };
    // A bake node has no purpose without its controller.
    if baking
        && signalled
        && let Err(e) = crate::cluster::ops::destroy(shared).await
    {
        tracing::error!(
            "the bake node may still run: {e:#} (`ddisco-controller destroy --state-dir <state_dir>/bake`)"
        );
    }
    shared.stop();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res? {
            tracing::error!("{e:#}");
        }
    }
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
        match listen(SocketAddr::new(addr.ip(), port)) {
            Ok(l) => return Ok(l),
            Err(e) => tracing::warn!(
                "cannot reuse port {port} of the previous run ({e}); nodes launched before will not \
                 find this controller and will be replaced"
            ),
        }
    }
    listen(addr).with_context(|| format!("cannot listen on {addr} (key `{key}`)"))
}

/// Connections the kernel may queue before they are accepted. std's
/// `TcpListener::bind` asks for 128: a burst of enrollments (a scale-up of
/// thousands of nodes) overflows that, and the kernel drops handshakes. The
/// kernel caps it at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds and listens with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // `TcpSocket::listen` needs a runtime only for registering the
    // listener; `serve` runs inside one.
    socket.listen(LISTEN_BACKLOG)?.into_std()
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

/// How long the publisher waits after a membership change for more: a
/// burst of nodes becoming ready is published once.
const PUBLISH_COALESCE: Duration = Duration::from_millis(50);

async fn publish_loop(shared: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shared.publish_wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        tokio::time::sleep(PUBLISH_COALESCE).await;
        shared.publish();
    }
}

/// Publishes again when the engine's directives change with time alone
/// (`Engine::renews_at`: its certificates' next epoch). Wakes at least
/// hourly, so a clock that jumps is followed.
async fn renewal_loop(shared: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Every task runs until shutdown (one that ends stops the controller).
    let Some(mut next) = shared.engine.renews_at() else {
        let _ = shutdown.wait_for(|s| *s).await;
        return Ok(());
    };
    loop {
        let left = next.duration_since(std::time::SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(left.min(Duration::from_secs(3600))) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        if std::time::SystemTime::now() >= next {
            tracing::info!("the engine's certificates are renewed: publishing every node's directives again");
            shared.membership_changed();
            next = shared.engine.renews_at().unwrap_or(next + Duration::from_secs(3600));
        }
    }
}

async fn persist_loop(shared: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut spacing = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = shared.persist.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        // Coalesce bursts (many enrollments) into one write, and space
        // writes by their cost (see `persist::save_spacing`).
        tokio::time::sleep(spacing).await;
        let took = crate::cluster::persist::save_timed(&shared);
        spacing = crate::cluster::persist::save_spacing(took);
    }
}

/// The reconcile loop never waits less than this (a deadline that is due
/// again at once must not spin).
const MIN_TICK_GAP: Duration = Duration::from_millis(20);

async fn reconcile_loop(shared: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        let mut wait = shared.cfg.reconcile_interval;
        let ticks = shared.policies.lock().lifecycle.ticks();
        if ticks && let Some(deadline) = crate::cluster::tick::pass(&shared).await {
            // Just past the deadline (a node is lost when silent for *more*
            // than the timeout).
            wait = wait.min((deadline + Duration::from_millis(1)).max(MIN_TICK_GAP));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}
