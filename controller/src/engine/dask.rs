//! The Dask engine: the master runs the scheduler (and a worker with the
//! master's worker count), each slave runs `dask worker` with `--nworkers
//! <workers>` pointed at the scheduler. Installed with pip into the node's
//! virtualenv. A slave that is leaving gets no worker directive: its agent
//! stops the worker with SIGTERM, which retires it gracefully.
//!
//! # Security
//! - Scheduler, workers and clients speak **mutual TLS** only (`tls://`,
//!   Dask's `require_encryption`): every node's workers get a key and a
//!   certificate of the cluster's *engine* CA (pushed as files over the
//!   agent's mutual-TLS session, the key readable by the Dask user alone);
//!   users get a client certificate with `ddisco-controller credentials`.
//!   A peer without one is refused by Dask itself. None of them is
//!   accepted by the agents' port (the session CA's).
//! - Certificates are short-lived: issued per *epoch* (`CERT_EPOCH`, 7
//!   days), valid `CERT_VALIDITY` (14 days) from issue, so a certificate is
//!   valid at least 7 days past its epoch; at each new epoch the services
//!   are restarted with new ones (their spec names the epoch). A key a job
//!   copied stops working within 14 days, and with the cluster (`destroy`
//!   retires the CA).
//! - On machines the agent provisions as root, the workers run as the
//!   unprivileged system user `dask` (`runuser -u dask`), whose only
//!   writable places are its home and the worker's local directory. The
//!   scheduler runs as another user, `dask-scheduler`, with its own
//!   certificate and key: a task (running as `dask`, on the master too)
//!   can neither read the scheduler's key nor signal the scheduler and
//!   take its port.
//! - The dashboard (HTTP, read-only views) stays plain, bound to the
//!   master's private address.

use super::{Directive, DirectiveKind, Engine, Member, Probed, master};
use crate::model::Role;
use crate::pki::Pki;
use crate::plan::{NodeLayout, Step, StepKind};
use crate::text::prefix;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The system user Dask's workers run as where the agent is root.
pub const DASK_USER: &str = "dask";
/// The system user the scheduler runs as (not the workers' user).
pub const SCHEDULER_USER: &str = "dask-scheduler";
/// Certificates are issued per epoch of this length (from the Unix epoch);
/// at each new one the services restart with new certificates.
pub const CERT_EPOCH: Duration = Duration::from_secs(7 * 86_400);
/// How long a Dask certificate is valid from its issue: at least
/// `CERT_VALIDITY - CERT_EPOCH` past the end of its epoch.
pub const CERT_VALIDITY: Duration = Duration::from_secs(14 * 86_400);

/// The epoch of `now` (`CERT_EPOCH`s since the Unix epoch).
pub fn cert_epoch(now: std::time::SystemTime) -> u64 {
    now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() / CERT_EPOCH.as_secs()
}

/// A (certificate, key) pair and the epoch it was issued in.
type Issued = (u64, Arc<(String, String)>);

/// Which certificate a Dask process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    Workers,
    Scheduler,
}

pub struct Dask {
    pub version: String,
    /// Optional parts installed with Dask (`dask_extras`).
    pub extras: Vec<String>,
    pub scheduler_port: u16,
    pub dashboard_port: u16,
    pki: Arc<Pki>,
    /// Each node's (certificate, key) per holder, with the epoch it was
    /// issued in: issued once per epoch and controller run.
    creds: Mutex<HashMap<(String, Holder), Issued>>,
}

impl Dask {
    pub fn from_config(cfg: &crate::config::Config, pki: Arc<Pki>) -> Dask {
        Dask {
            version: cfg.dask.version.clone(),
            extras: cfg.dask.extras.clone(),
            scheduler_port: cfg.dask.scheduler_port,
            dashboard_port: cfg.dask.dashboard_port,
            pki,
            creds: Mutex::default(),
        }
    }

    /// The pip requirement: `dask[distributed,<extras>]==<version>`.
    fn requirement(&self) -> String {
        let extras: Vec<&str> =
            std::iter::once("distributed").chain(self.extras.iter().map(String::as_str)).collect();
        format!("dask[{}]=={}", extras.join(","), self.version)
    }

    fn dask(layout: &NodeLayout) -> String {
        layout.venv.join("bin/dask").display().to_string()
    }

    /// Where Dask's files live on a node: the `dask` user's home, or a
    /// folder of the node's root for nodes that are not machines of their
    /// own.
    fn home(layout: &NodeLayout) -> String {
        if layout.system { "/var/lib/dask".into() } else { super::under(layout, "var/dask") }
    }

    /// The scheduler's home (its certificate and key live there).
    fn scheduler_home(layout: &NodeLayout) -> String {
        if layout.system {
            "/var/lib/dask-scheduler".into()
        } else {
            super::under(layout, "var/dask-scheduler")
        }
    }

    fn local_dir(layout: &NodeLayout) -> String {
        match &layout.scratch {
            Some(s) => s.join("dask-worker").display().to_string(),
            None => super::under(layout, "var/dask-worker"),
        }
    }

    /// `argv`, run as `user` where the agent is root.
    fn as_user(layout: &NodeLayout, user: &str, argv: Vec<String>) -> Vec<String> {
        if !layout.system {
            return argv;
        }
        ["runuser", "-u", user, "--"].iter().map(|s| s.to_string()).chain(argv).collect()
    }

    fn tls_args(home: &str) -> Vec<String> {
        let tls = format!("{home}/tls");
        vec![
            "--tls-ca-file".into(),
            format!("{tls}/ca.pem"),
            "--tls-cert".into(),
            format!("{tls}/node.pem"),
            "--tls-key".into(),
            format!("{tls}/node.key"),
        ]
    }

    /// The TLS files of `holder` on `me` for the epoch `epoch`: the engine
    /// CA, its certificate and its key, in its user's home.
    fn tls_files(&self, me: &Member, layout: &NodeLayout, holder: Holder, epoch: u64) -> Vec<Directive> {
        let creds = {
            let mut map = self.creds.lock();
            match map.get(&(me.id.clone(), holder)) {
                Some((e, c)) if *e == epoch => c.clone(),
                _ => {
                    let name = match holder {
                        Holder::Workers => format!("dask {}", me.id),
                        Holder::Scheduler => format!("dask scheduler {}", me.id),
                    };
                    match self.pki.issue(&name, std::slice::from_ref(&me.address), CERT_VALIDITY) {
                        Ok(c) => {
                            let c = Arc::new(c);
                            map.insert((me.id.clone(), holder), (epoch, c.clone()));
                            c
                        }
                        Err(e) => {
                            tracing::error!(node = %me.id, "cannot issue its Dask certificate: {e}");
                            return vec![];
                        }
                    }
                }
            }
        };
        let (home, user, prefix) = match holder {
            Holder::Workers => (Dask::home(layout), DASK_USER, "dask_tls"),
            Holder::Scheduler => (Dask::scheduler_home(layout), SCHEDULER_USER, "dask_scheduler_tls"),
        };
        let tls = format!("{home}/tls");
        let owner = if layout.system { user } else { "" };
        let file = |name: &str, path: String, content: String, mode: u32| Directive {
            name: format!("{prefix}_{name}"),
            kind: DirectiveKind::File { path, content, mode, owner: owner.into(), marker: String::new() },
        };
        vec![
            file("ca", format!("{tls}/ca.pem"), self.pki.engine_ca_pem().to_string(), 0o444),
            file("cert", format!("{tls}/node.pem"), creds.0.clone(), 0o444),
            file("key", format!("{tls}/node.key"), creds.1.clone(), 0o400),
        ]
    }

    /// A service's environment: the certificates' epoch (a new one
    /// restarts it with new certificates).
    fn service_env(epoch: u64) -> BTreeMap<String, String> {
        BTreeMap::from([("DDISCO_DASK_CERT_EPOCH".to_string(), epoch.to_string())])
    }

    fn worker(&self, me: &Member, scheduler: &str, layout: &NodeLayout, epoch: u64) -> Directive {
        let mut argv: Vec<String> = [
            Dask::dask(layout).as_str(),
            "worker",
            scheduler,
            "--nworkers",
            &me.workers.max(1).to_string(),
            "--nthreads",
            "1",
            "--host",
            &me.address,
            "--name",
            &me.id,
            "--no-dashboard",
            "--local-directory",
            &Dask::local_dir(layout),
        ]
        .map(String::from)
        .to_vec();
        argv.extend(Dask::tls_args(&Dask::home(layout)));
        Directive {
            name: "dask-worker".into(),
            kind: DirectiveKind::Service {
                argv: Dask::as_user(layout, DASK_USER, argv),
                env: Dask::service_env(epoch),
                workdir: Dask::home(layout),
                grace_ms: 20_000,
            },
        }
    }

    /// `directives` at time `now`: certificates of `now`'s epoch.
    fn directives_at(
        &self,
        me: &Member,
        members: &[Member],
        layout: &NodeLayout,
        now: std::time::SystemTime,
    ) -> Vec<Directive> {
        if me.leaving || me.address.is_empty() {
            self.creds.lock().retain(|(id, _), _| *id != me.id);
            return vec![];
        }
        let epoch = cert_epoch(now);
        let mut out = Vec::new();
        if me.is_master() {
            let mut argv: Vec<String> = [
                Dask::dask(layout).as_str(),
                "scheduler",
                "--protocol",
                "tls",
                "--host",
                &me.address,
                "--port",
                &self.scheduler_port.to_string(),
                "--dashboard-address",
                &format!("{}:{}", me.address, self.dashboard_port),
            ]
            .map(String::from)
            .to_vec();
            argv.extend(Dask::tls_args(&Dask::scheduler_home(layout)));
            out.extend(self.tls_files(me, layout, Holder::Scheduler, epoch));
            out.extend(self.tls_files(me, layout, Holder::Workers, epoch));
            out.push(Directive {
                name: "dask-scheduler".into(),
                kind: DirectiveKind::Service {
                    argv: Dask::as_user(layout, SCHEDULER_USER, argv),
                    env: Dask::service_env(epoch),
                    workdir: Dask::scheduler_home(layout),
                    grace_ms: 5_000,
                },
            });
            out.push(self.worker(me, &self.scheduler_url(&me.address), layout, epoch));
            // The scheduler's counts (tasks, clients), for autostop.
            out.push(Directive {
                name: "counts".into(),
                kind: DirectiveKind::Probe {
                    url: format!("http://{}:{}/json/counts.json", me.address, self.dashboard_port),
                },
            });
        } else if let Some(m) = master(members) {
            // Slaves wait for a ready master.
            out.extend(self.tls_files(me, layout, Holder::Workers, epoch));
            out.push(self.worker(me, &self.scheduler_url(&m.address), layout, epoch));
        }
        out
    }

    fn scheduler_url(&self, address: &str) -> String {
        format!("tls://{address}:{}", self.scheduler_port)
    }
}

impl Engine for Dask {
    fn name(&self) -> &'static str {
        "dask"
    }

    fn image_steps(&self) -> &'static [&'static str] {
        &["dask_user"]
    }

    fn steps(&self, _role: Role, _workers: u32, layout: &NodeLayout) -> Vec<Step> {
        let home = Dask::home(layout);
        let shome = Dask::scheduler_home(layout);
        let local = Dask::local_dir(layout);
        // The user and its home are the machine's (an image may hold them);
        // the workers' folder is on scratch, each node's own. What is inside
        // the home is made by the user itself: a job (running as that user)
        // may have put a symlink there, and root would follow it (`install
        // -d -o` would give the link's target to the user).
        let (user, dirs) = if layout.system {
            (
                [(DASK_USER, &home), (SCHEDULER_USER, &shome)]
                    .map(|(user, home)| {
                        format!(
                            "{{ id -u {user} >/dev/null 2>&1 || useradd --system --home-dir '{home}' --shell /usr/sbin/nologin {user}; }} \
                             && install -d -o {user} -g {user} -m 0700 '{home}' \
                             && runuser -u {user} -- install -d -m 0700 '{home}/tls'"
                        )
                    })
                    .join(" && "),
                format!("install -d -o {DASK_USER} -g {DASK_USER} -m 0700 '{local}'"),
            )
        } else {
            (
                format!("mkdir -p '{home}/tls' '{shome}/tls' && chmod 0700 '{home}/tls' '{shome}/tls'"),
                format!("mkdir -p '{local}'"),
            )
        };
        vec![
            Step {
                name: "dask_install".into(),
                kind: StepKind::Pip {
                    requirements: vec![self.requirement()],
                    venv: layout.venv.display().to_string(),
                },
            },
            Step { name: "dask_user".into(), kind: StepKind::Shell { script: user, env: BTreeMap::new() } },
            Step { name: "dask_dirs".into(), kind: StepKind::Shell { script: dirs, env: BTreeMap::new() } },
        ]
    }

    fn directives(&self, me: &Member, members: &[Member], layout: &NodeLayout) -> Vec<Directive> {
        self.directives_at(me, members, layout, std::time::SystemTime::now())
    }

    fn renews_at(&self) -> Option<std::time::SystemTime> {
        let next = cert_epoch(std::time::SystemTime::now()) + 1;
        Some(std::time::UNIX_EPOCH + CERT_EPOCH * next as u32)
    }

    /// A node's directives depend on itself and the master only.
    fn partial(&self) -> bool {
        true
    }

    /// A slave's directives depend only on the scheduler's address and
    /// the certificates' epoch (a new one renews every node's).
    fn shared_key(&self, members: &[Member]) -> String {
        let address = master(members).map(|m| m.address.clone()).unwrap_or_default();
        format!("{address}@{}", cert_epoch(std::time::SystemTime::now()))
    }

    /// `counts`: Dask's `/json/counts.json`. Busy while tasks are
    /// processing, waiting or unrunnable, or a client other than the
    /// scheduler's own (its fire-and-forget client counts as one) is
    /// connected.
    fn probed(&self, name: &str, body: &str) -> Result<Probed, String> {
        if name != "counts" {
            return Err(format!("probe {:?} is not one the dask engine asks for", prefix(name, 64)));
        }
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("counts: not Dask's counts: {e}"))?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        let (Some(processing), Some(waiting), Some(clients)) = (n("processing"), n("waiting"), n("clients"))
        else {
            return Err("counts: processing, waiting or clients missing".into());
        };
        let busy = processing.saturating_add(waiting).saturating_add(n("unrunnable").unwrap_or(0)) > 0
            || clients > 1;
        // What Dask's own adaptive deployments follow.
        let target_workers = n("desired_workers").map(|t| t.min(u64::from(u32::MAX)) as u32);
        Ok(Probed { busy: Some(busy), target_workers, ..Default::default() })
    }

    fn endpoints(&self, members: &[Member]) -> BTreeMap<String, String> {
        let mut e = BTreeMap::new();
        if let Some(m) = master(members) {
            e.insert("scheduler".into(), self.scheduler_url(&m.address));
            e.insert("dashboard".into(), format!("http://{}:{}/status", m.address, self.dashboard_port));
        }
        e
    }

    fn lines(&self, members: &[Member]) -> Vec<String> {
        match master(members) {
            None => vec!["Dask: waiting for a ready master".into()],
            Some(m) => vec![
                format!(
                    "Dask scheduler: {} (mutual TLS: `ddisco-controller credentials` writes a client certificate \
                     and prints the Security to use)",
                    self.scheduler_url(&m.address)
                ),
                format!(
                    "Dask dashboard: http://{}:{}/status (remote: ssh -L {p}:{}:{p} <master>, then http://localhost:{p}/status)",
                    m.address,
                    self.dashboard_port,
                    m.address,
                    p = self.dashboard_port
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> NodeLayout {
        NodeLayout {
            root: "/n".into(),
            home: "/n/home".into(),
            owner: None,
            venv: "/n/venv".into(),
            install_packages: false,
            system: false,
            scratch: None,
        }
    }

    fn member(id: &str, role: Role, addr: &str, workers: u32) -> Member {
        Member {
            id: id.into(),
            role: Some(role),
            address: addr.into(),
            hostname: id.into(),
            workers,
            ready: true,
            ..Default::default()
        }
    }

    fn dask() -> Dask {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        Dask {
            version: crate::config::DASK_VERSION.into(),
            extras: Vec::new(),
            scheduler_port: 8786,
            dashboard_port: 8787,
            pki: Arc::new(pki),
            creds: Mutex::default(),
        }
    }

    fn argv(d: &Directive) -> &Vec<String> {
        match &d.kind {
            DirectiveKind::Service { argv, .. } => argv,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn master_runs_scheduler_and_worker_slaves_follow_the_master() {
        let m = member("master-0001", Role::Master, "10.0.0.1", 4);
        let s = member("slave-0002", Role::Slave, "10.0.0.2", 3);
        let all = [m.clone(), s.clone()];
        let d = dask().directives(&m, &all, &layout());
        assert_eq!(
            d.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            [
                "dask_scheduler_tls_ca",
                "dask_scheduler_tls_cert",
                "dask_scheduler_tls_key",
                "dask_tls_ca",
                "dask_tls_cert",
                "dask_tls_key",
                "dask-scheduler",
                "dask-worker",
                "counts"
            ]
        );
        // The scheduler's counts tell autostop whether it has work.
        assert!(
            matches!(&d[8].kind, DirectiveKind::Probe { url } if url == "http://10.0.0.1:8787/json/counts.json"),
            "{:?}",
            d[8]
        );
        let busy = |body: &str| dask().probed("counts", body).map(|p| p.busy);
        assert_eq!(
            busy(r#"{"processing": 0, "waiting": 0, "clients": 1, "unrunnable": 0}"#),
            Ok(Some(false))
        );
        assert_eq!(busy(r#"{"processing": 2, "waiting": 0, "clients": 2}"#), Ok(Some(true)));
        let target = |body: &str| dask().probed("counts", body).map(|p| p.target_workers);
        assert_eq!(
            target(r#"{"processing": 9, "waiting": 30, "clients": 2, "desired_workers": 12}"#),
            Ok(Some(12))
        );
        assert_eq!(
            busy(r#"{"processing": 0, "waiting": 0, "clients": 2}"#),
            Ok(Some(true)),
            "a client is on"
        );
        assert!(busy(r#"{"clients": 1}"#).is_err());
        assert!(dask().probed("other", "{}").is_err());
        let sched = argv(&d[6]);
        assert!(
            sched.contains(&"10.0.0.1".to_string()) && sched.contains(&"--tls-key".to_string()),
            "{sched:?}"
        );
        let d = dask().directives(&s, &all, &layout());
        let a = argv(d.iter().find(|d| d.name == "dask-worker").unwrap());
        assert_eq!(a[2], "tls://10.0.0.1:8786");
        assert_eq!(a[a.iter().position(|x| x == "--nworkers").unwrap() + 1], "3");
        assert!(a.contains(&"--tls-cert".to_string()), "{a:?}");
    }

    #[test]
    fn slaves_wait_for_a_ready_master_and_leaving_slaves_stop() {
        let mut m = member("m", Role::Master, "10.0.0.1", 1);
        m.ready = false;
        let s = member("s", Role::Slave, "10.0.0.2", 1);
        assert!(dask().directives(&s, &[m.clone(), s.clone()], &layout()).is_empty());
        m.ready = true;
        let mut leaving = s.clone();
        leaving.leaving = true;
        assert!(dask().directives(&leaving, &[m.clone(), leaving.clone()], &layout()).is_empty());
        assert_eq!(dask().endpoints(&[m])["scheduler"], "tls://10.0.0.1:8786");
    }

    #[test]
    fn each_node_has_its_own_key_kept_across_publishes_and_root_nodes_run_dask_unprivileged() {
        let d = dask();
        let m = member("m", Role::Master, "10.0.0.1", 1);
        let s = member("s", Role::Slave, "10.0.0.2", 1);
        let all = [m.clone(), s.clone()];
        let key = |ds: &[Directive]| match &ds.iter().find(|x| x.name == "dask_tls_key").unwrap().kind {
            DirectiveKind::File { content, mode, .. } => (content.clone(), *mode),
            other => panic!("{other:?}"),
        };
        let (k1, mode) = key(&d.directives(&s, &all, &layout()));
        assert!(k1.contains("PRIVATE KEY") && mode == 0o400);
        // Same key on the next publish (the directives' hash is stable).
        assert_eq!(key(&d.directives(&s, &all, &layout())).0, k1);
        assert_ne!(key(&d.directives(&m, &all, &layout())).0, k1, "one key per node");
        let mut sys = layout();
        sys.system = true;
        let ds = d.directives(&s, &all, &sys);
        let worker = ds.iter().find(|x| x.name == "dask-worker").unwrap();
        let w = argv(worker);
        assert_eq!(w[..4], ["runuser", "-u", DASK_USER, "--"]);
        // It runs in the dask user's home: a worker's processes chdir to
        // their parent's folder, and the agent's is root's alone.
        assert!(
            matches!(&worker.kind, DirectiveKind::Service { workdir, .. } if workdir == "/var/lib/dask"),
            "{worker:?}"
        );
        for f in ds.iter().filter(|x| x.name.starts_with("dask_tls")) {
            assert!(matches!(&f.kind, DirectiveKind::File { owner, .. } if owner == DASK_USER), "{f:?}");
        }
    }

    fn file<'a>(ds: &'a [Directive], name: &str) -> (&'a str, &'a str, &'a str) {
        match &ds.iter().find(|x| x.name == name).unwrap_or_else(|| panic!("{name}: {ds:?}")).kind {
            DirectiveKind::File { path, content, owner, .. } => (path, content, owner),
            other => panic!("{other:?}"),
        }
    }

    fn env(d: &Directive) -> &BTreeMap<String, String> {
        match &d.kind {
            DirectiveKind::Service { env, .. } => env,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_scheduler_has_its_own_user_certificate_and_key() {
        let d = dask();
        let m = member("m", Role::Master, "10.0.0.1", 1);
        let mut sys = layout();
        sys.system = true;
        let ds = d.directives(&m, std::slice::from_ref(&m), &sys);
        let sched = ds.iter().find(|x| x.name == "dask-scheduler").unwrap();
        let a = argv(sched);
        assert_eq!(a[..4], ["runuser", "-u", SCHEDULER_USER, "--"]);
        let key_arg = &a[a.iter().position(|x| x == "--tls-key").unwrap() + 1];
        let (path, skey, owner) = file(&ds, "dask_scheduler_tls_key");
        assert_eq!((key_arg.as_str(), owner), (path, SCHEDULER_USER));
        assert!(path.starts_with("/var/lib/dask-scheduler/"), "{path}");
        let (wpath, wkey, wowner) = file(&ds, "dask_tls_key");
        assert_eq!(wowner, DASK_USER);
        assert!(wpath.starts_with("/var/lib/dask/"), "{wpath}");
        assert_ne!(skey, wkey, "the scheduler's key is the workers' key");
        assert!(
            matches!(&sched.kind, DirectiveKind::Service { workdir, .. } if workdir == "/var/lib/dask-scheduler")
        );
        // Both users are made by the plan, each making its own folders.
        let steps = d.steps(Role::Master, 1, &sys);
        let StepKind::Shell { script, .. } = &steps.iter().find(|s| s.name == "dask_user").unwrap().kind
        else {
            panic!()
        };
        assert!(
            script.contains("runuser -u dask-scheduler -- install -d -m 0700 '/var/lib/dask-scheduler/tls'")
        );
        assert!(script.contains("runuser -u dask -- install -d -m 0700 '/var/lib/dask/tls'"), "{script}");
    }

    #[test]
    fn certificates_are_short_lived_and_renewed_each_epoch_with_a_restart() {
        let d = dask();
        let m = member("m", Role::Master, "10.0.0.1", 1);
        let s = member("s", Role::Slave, "10.0.0.2", 1);
        let all = [m.clone(), s.clone()];
        // Late in an epoch, then early in the next.
        let start = std::time::UNIX_EPOCH + CERT_EPOCH * 2950;
        let late = start + CERT_EPOCH - Duration::from_secs(60);
        let next = start + CERT_EPOCH + Duration::from_secs(60);
        let a = d.directives_at(&s, &all, &layout(), late);
        let again = d.directives_at(&s, &all, &layout(), late);
        let b = d.directives_at(&s, &all, &layout(), next);
        assert_eq!(a, again, "re-issued within an epoch");
        let cert = |ds: &[Directive]| file(ds, "dask_tls_cert").1.to_string();
        assert_ne!(cert(&a), cert(&b), "not renewed at the next epoch");
        let worker = |ds: &[Directive]| ds.iter().find(|x| x.name == "dask-worker").unwrap().clone();
        // The worker's spec changes with the epoch: the agent restarts it
        // on the new certificate.
        assert_ne!(env(&worker(&a)), env(&worker(&b)));
        assert_eq!(argv(&worker(&a)), argv(&worker(&b)));
        // Issued now, valid CERT_VALIDITY: past its epoch's end by a week.
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert(&b).as_bytes())
            .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
            .unwrap();
        let not_after = crate::pki::not_after_unix(&der).unwrap();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let days = (not_after - now) as f64 / 86_400.0;
        assert!((13.9..=14.1).contains(&days), "valid {days} days");
        assert!(CERT_VALIDITY >= CERT_EPOCH * 2, "a certificate may end before its epoch + a week");
        // The controller wakes at the next epoch to publish them.
        let at = d.renews_at().unwrap();
        let now = std::time::SystemTime::now();
        assert!(at > now && at <= now + CERT_EPOCH, "{at:?}");
        assert_eq!(cert_epoch(at), cert_epoch(now) + 1);
    }

    #[test]
    fn install_step_pins_the_version() {
        let steps = dask().steps(Role::Slave, 1, &layout());
        match &steps[0].kind {
            StepKind::Pip { requirements, venv } => {
                assert_eq!(
                    requirements,
                    &vec![format!("dask[distributed]=={}", crate::config::DASK_VERSION)]
                );
                assert_eq!(venv, "/n/venv");
            }
            other => panic!("{other:?}"),
        }
        let mut d = dask();
        d.extras = vec!["dataframe".into(), "array".into()];
        match &d.steps(Role::Master, 1, &layout())[0].kind {
            StepKind::Pip { requirements, .. } => assert_eq!(
                requirements,
                &vec![format!("dask[distributed,dataframe,array]=={}", crate::config::DASK_VERSION)]
            ),
            other => panic!("{other:?}"),
        }
    }
}
