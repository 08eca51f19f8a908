//! The running cluster: its shared state ([`Cluster`]: registry, PKI,
//! provider, engine) and everything done to it: what agents report (this
//! file), one reconcile pass ([`tick`]), scaling and destroying ([`ops`]).
//! The edges (`grpc`, `admin`, `dashboard`, `download`) and `serve`'s wiring
//! call into it; it calls none of them.
//!
//! ```text
//!  agents --TLS gRPC--> grpc (Enrollment, Agent) --\
//!  nodes  --HTTPS-----> download (agent binary)     |--> Cluster (registry, pki, provider, engine)
//!  CLI    --Unix sock-> admin (Status/Scale/Destroy)/        ^
//!                       reconcile loop (serve): tick = provider.list -> decide -> act
//! ```
//!
//! # Guarantees
//! - The registry's mutex is held only for short synchronous sections,
//!   never across `.await`; provider calls happen outside it.
//! - Node state changes only through `Registry::transition`
//!   (`registry::transitions`).

pub mod ops;
pub mod persist;
pub mod tick;

#[cfg(test)]
mod enroll_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod work_tests;

use crate::attest::IdentityDoc;
use crate::config::Config;
use crate::engine::{DirectiveSet, Engine, Member};
use crate::model::{Market, Notice, Role, worker_count};
use crate::pki::Pki;
use crate::plan::Assignment;
use crate::provider::Provider;
use crate::reconcile::Limits;
use crate::registry::{
    DirectiveReport, Effect, Facts, Hello, NodeEvent, Refused, Registry, StepReport, TokenError, unix_ms,
};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

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
    /// The arm64 agent's URL and SHA-256, when one is served.
    pub agent_arm64: Option<(String, String)>,
}

/// The most of a probe's answer the controller reads (the agent sends no
/// more).
pub const MAX_PROBE_BODY: usize = 256 * 1024;

pub struct Cluster {
    pub cfg: Config,
    /// The map/reduce engine (plain functions over the membership).
    pub engine: Box<dyn Engine>,
    /// Membership changed since the last `publish`.
    membership_changed: AtomicBool,
    /// Held only for short, synchronous sections; never across `.await`.
    pub registry: Mutex<Registry>,
    pub clock: Clock,
    pub pki: Arc<Pki>,
    pub provider: Arc<dyn Provider>,
    pub endpoints: Endpoints,
    pub cert_validity: Duration,
    /// Wakes the reconcile loop early (scale, notice, removals).
    pub wake: Notify,
    /// Wakes the persister.
    pub persist: Notify,
    /// Wakes the publisher.
    pub publish_wake: Notify,
    /// What was last published: the engine's shared key and each node's
    /// member data then (std mutex: only `publish` takes it).
    published: Mutex<Published>,
    /// Held from taking the registry's snapshot to renaming the file, so
    /// that two saves (the persister's, a launch's) neither share a
    /// temporary file nor let an older snapshot replace a newer one.
    save_lock: Mutex<()>,
    /// Spent tokens, appended at each enrollment (see `persist`).
    journal: persist::Journal,
    /// Serialises reconcile ticks with `destroy` (a tokio mutex: held across
    /// provider calls).
    pub tick_lock: tokio::sync::Mutex<()>,
    /// The cluster's lifecycle and its policies' state (spend cap,
    /// autostop, max runtime, adaptive size, failure budget): one value.
    /// Lock order: the registry's, then this one (never the other way).
    pub policies: Mutex<crate::lifecycle::Policies>,
    /// What the dashboard's charts draw (bounded).
    pub history: Mutex<crate::history::History>,
    /// Each launch in flight holds a read guard; `destroy` takes the write
    /// side, so it sees every instance a launch started.
    pub launches: Arc<tokio::sync::RwLock<()>>,
    /// Instances whose termination is under way off the tick
    /// (`tick::terminate_off_tick`): never asked twice at once.
    pub terminations: Mutex<std::collections::HashSet<String>>,
    /// The provider's listings, taken beside the reconcile loop
    /// (`tick::observe`): a slow `DescribeInstances` does not hold loss
    /// detection. Tokio mutex: only the tick takes it, across its wait.
    pub listings: tokio::sync::Mutex<tick::Listings>,
    /// When spot prices were last fetched (tokio mutex: held across the call).
    prices_at: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Minted at the first start (`state::cluster_id`): everything
    /// launched carries it.
    pub cluster_id: String,
    /// The open-file limit in force (`serve` raised it at start).
    pub fd_limit: u64,
    /// The nodes' prepared Python packages, one per architecture
    /// (`pip_source = "controller"`); empty: nodes pip-install themselves.
    pub python_envs: Vec<crate::plan::PreparedEnv>,
    shutdown: watch::Sender<bool>,
}

/// The engine's view of one node.
fn member_of(r: &crate::registry::NodeRecord) -> Member {
    let hostname = r.facts.as_ref().map_or("", |f| f.hostname.as_str());
    Member {
        id: r.id.clone(),
        role: Some(r.role),
        address: r.address().to_string(),
        hostname: hostname.split('.').next().unwrap_or("").to_string(),
        workers: r.workers,
        ready: r.state().is(crate::model::StateKind::Ready)
            || r.state().is(crate::model::StateKind::Draining),
        leaving: r.state().is(crate::model::StateKind::Draining) || r.notice.is_some(),
        attributes: r.attributes.clone(),
    }
}

/// What `publish` last pushed.
#[derive(Default)]
struct Published {
    shared: String,
    members: std::collections::HashMap<String, Member>,
}

/// What `Cluster::new` is built from (everything `serve` prepared).
pub struct Parts {
    pub cfg: Config,
    pub engine: Box<dyn Engine>,
    pub registry: Registry,
    pub clock: Clock,
    pub pki: Arc<Pki>,
    pub provider: Arc<dyn Provider>,
    pub endpoints: Endpoints,
    pub fd_limit: u64,
    pub cluster_id: String,
    pub python_envs: Vec<crate::plan::PreparedEnv>,
}

impl Cluster {
    pub fn new(p: Parts) -> Cluster {
        Cluster {
            engine: p.engine,
            membership_changed: AtomicBool::new(true),
            cert_validity: p.cfg.cert_validity,
            registry: Mutex::new(p.registry),
            clock: p.clock,
            pki: p.pki,
            provider: p.provider,
            endpoints: p.endpoints,
            wake: Notify::new(),
            persist: Notify::new(),
            publish_wake: Notify::new(),
            published: Mutex::new(Published::default()),
            save_lock: Mutex::new(()),
            journal: persist::Journal::new(&p.cfg.state_dir),
            tick_lock: tokio::sync::Mutex::new(()),
            launches: Arc::default(),
            terminations: Mutex::default(),
            listings: tokio::sync::Mutex::default(),
            policies: Mutex::new(Default::default()),
            history: Mutex::new(Default::default()),
            prices_at: tokio::sync::Mutex::new(None),
            metrics: Default::default(),
            fd_limit: p.fd_limit,
            cluster_id: p.cluster_id,
            python_envs: p.python_envs,
            shutdown: watch::channel(false).0,
            cfg: p.cfg,
        }
    }

    /// The registry changed: save it soon.
    pub fn changed(&self) {
        self.persist.notify_one();
    }

    /// Something engines care about changed (a node became ready or started
    /// leaving, an attribute arrived): the publisher recomputes directives
    /// shortly (a burst of changes is published once).
    pub fn membership_changed(&self) {
        self.membership_changed.store(true, Ordering::Relaxed);
        self.publish_wake.notify_one();
    }

    /// The engine's view of every node.
    pub fn members(&self) -> Vec<Member> {
        let reg = self.registry.lock();
        reg.entries()
            .filter(|e| !e.rec.state().is(crate::model::StateKind::Terminating))
            .map(|e| member_of(&e.rec))
            .collect()
    }

    /// Recomputes the directives of the ready nodes whose inputs changed
    /// and pushes them to connected agents. Runs after membership changes
    /// (coalesced by the publisher loop), never per heartbeat.
    ///
    /// Cost per call: for an engine whose directives depend only on the
    /// node and the master (`Engine::partial`: Dask, none), O(changed
    /// nodes + masters) while the master's part (`shared_key`) holds;
    /// otherwise, or when it changed, O(N) to build the membership, with
    /// directives computed for every ready node whose inputs changed.
    pub fn publish(&self) {
        if !self.membership_changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let (changed, masters) = {
            let mut reg = self.registry.lock();
            let changed: Vec<(Member, Arc<crate::registry::Liveness>)> = reg
                .take_changed_members()
                .iter()
                .filter_map(|id| reg.get(id))
                .filter(|e| !e.rec.state().is(crate::model::StateKind::Terminating))
                .map(|e| (member_of(&e.rec), e.live.clone()))
                .collect();
            let masters: Vec<Member> =
                reg.entries().filter(|e| e.rec.role == Role::Master).map(|e| member_of(&e.rec)).collect();
            (changed, masters)
        };
        if self.engine.partial() {
            let shared = self.engine.shared_key(&masters);
            let mut last = self.published.lock();
            if shared == last.shared {
                let mut retry = Vec::new();
                for (me, live) in changed.iter().filter(|(m, _)| m.ready) {
                    let mut around = masters.clone();
                    if !me.is_master() {
                        around.push(me.clone());
                    }
                    if !self.push_to(me, &around, live) {
                        retry.push(me.id.clone());
                    }
                }
                drop(last);
                self.retry(retry);
                return;
            }
            last.shared = shared;
            last.members.clear();
        }
        self.publish_all();
    }

    /// Every ready node whose inputs changed since its last push (all of
    /// them when the engine's shared key changed).
    fn publish_all(&self) {
        let members = self.members();
        let shared = self.engine.shared_key(&members);
        let lives: BTreeMap<String, Arc<crate::registry::Liveness>> = {
            let reg = self.registry.lock();
            reg.entries().map(|e| (e.rec.id.clone(), e.live.clone())).collect()
        };
        let mut last = self.published.lock();
        let everyone = last.shared != shared || self.engine.partial();
        let mut still = std::collections::HashSet::with_capacity(members.len());
        let mut retry = Vec::new();
        for me in members.iter().filter(|m| m.ready) {
            still.insert(me.id.as_str());
            if !everyone && last.members.get(&me.id) == Some(me) {
                continue; // its inputs did not change
            }
            let Some(live) = lives.get(&me.id) else { continue };
            if self.push_to(me, &members, live) {
                last.members.insert(me.id.clone(), me.clone());
            } else {
                last.members.remove(&me.id);
                retry.push(me.id.clone());
            }
        }
        last.members.retain(|id, _| still.contains(id.as_str()));
        last.shared = shared;
        drop(last);
        self.retry(retry);
    }

    /// Computes `me`'s directives from `members` and pushes them; false
    /// when its session did not take them (none open, or its queue full).
    fn push_to(&self, me: &Member, members: &[Member], live: &crate::registry::Liveness) -> bool {
        let layout = self.provider.layout(&me.id);
        // A bake node runs no engine: nothing of it may end in the image.
        let directives =
            if self.cfg.bake.is_some() { vec![] } else { self.engine.directives(me, members, &layout) };
        let set = DirectiveSet::new(directives);
        crate::metrics::Metrics::inc(&self.metrics.directive_sets);
        self.metrics.directive_bytes.fetch_add(set.json_len as u64, Ordering::Relaxed);
        live.push_directives(&Arc::new(set))
    }

    /// Nodes whose push did not go through are published again at the
    /// next change.
    fn retry(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut reg = self.registry.lock();
        for id in ids {
            reg.member_changed(&id);
        }
    }

    /// A new session must get its node's directives even if nothing
    /// changed: forget what was published for it.
    fn republish(&self, node_id: &str) {
        self.published.lock().members.remove(node_id);
        self.membership_changed();
    }

    /// Nodes by (role, first word of the state), for `/metrics`.
    pub fn node_counts(&self) -> (BTreeMap<(String, String), u64>, u32) {
        let reg = self.registry.lock();
        let mut by = BTreeMap::new();
        for e in reg.entries() {
            *by.entry((e.rec.role.to_string(), e.rec.state().kind().name().to_string())).or_default() += 1;
        }
        (by, reg.desired_slaves())
    }

    /// Conditions of the cluster's own lifecycle worth a line in status
    /// (taken without the registry's lock).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(e) = self.policies.lock().destroy_error.clone() {
            notes.push(e);
        }
        let hold = crate::failures::hold(
            &self.registry.lock().failures(),
            unix_ms(),
            self.cfg.failure_budget,
            self.cfg.failure_window.as_millis() as u64,
        );
        notes.extend(hold.map(|h| crate::failures::note(&h, unix_ms())));
        if !self.cfg.max_runtime.is_zero()
            && let Some(started) = self.registry.lock().started_unix_ms()
        {
            let left = (started + self.cfg.max_runtime.as_millis() as u64).saturating_sub(unix_ms());
            notes.push(format!(
                "max runtime: destroyed in {} (max_runtime_mins {})",
                crate::model::span(left as f64 / 1000.0),
                self.cfg.max_runtime.as_secs_f64() / 60.0
            ));
        }
        let window = self.cfg.orphan_timeout.as_secs_f64();
        notes.push(if window > 0.0 {
            format!(
                "nodes shut themselves down after {} without a session with this controller \
                 (orphan_timeout_secs{})",
                crate::model::span(window),
                if self.provider.orphan_action() == "poweroff" { "; EC2 terminates them" } else { "" }
            )
        } else {
            "orphan_timeout_secs = 0: nodes keep running (and billing) if this controller dies".into()
        });
        notes
    }

    /// Fires when the controller stops.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks `serve` to stop.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn limits(&self) -> Limits {
        Limits {
            boot_timeout_ms: self.cfg.boot_timeout.as_millis() as u64,
            heartbeat_timeout_ms: self.cfg.heartbeat_timeout.as_millis() as u64,
            drain_ms: if self.engine.drains() { self.cfg.drain_timeout.as_millis() as u64 } else { 0 },
            // Two heartbeat timeouts (30 s by default): EC2 moves a
            // terminated instance out of "running" within seconds.
            reterminate_ms: 2 * self.cfg.heartbeat_timeout.as_millis() as u64,
            // EC2 shows a new instance within seconds, rarely a minute.
            listing_grace_ms: 120_000,
        }
    }

    // ---- what agents report; each calls one registry transition ----

    /// Checks a bootstrap token (refusals change nothing and count as such).
    pub fn check_token(&self, hash: &str) -> Result<String, TokenError> {
        let r = self.registry.lock().check_token(hash, unix_ms());
        if r.is_err() {
            crate::metrics::Metrics::inc(&self.metrics.refusals);
        }
        r
    }

    /// Spends the token (checked again under the lock: of two concurrent
    /// enrollments with one token, one loses) and enrolls the node. On a
    /// provider that attests instances, `attested` is the verified identity
    /// document: it must name the instance launched for the token's slot,
    /// and its instance id and private address replace what the agent said.
    pub fn enroll(
        &self,
        node_id: &str,
        hash: &str,
        mut facts: Facts,
        attested: Option<&IdentityDoc>,
        cert_sha256: &str,
        from: &str,
    ) -> Result<(), EnrollRefused> {
        let mut reg = self.registry.lock();
        if let Err(e) = reg.check_token(hash, unix_ms()) {
            crate::metrics::Metrics::inc(&self.metrics.refusals);
            return Err(EnrollRefused::Token(e));
        }
        if let Some(doc) = attested {
            let recorded = reg.get(node_id).and_then(|e| e.rec.instance_id.as_deref());
            if let Err(e) = check_binding(recorded, &doc.instance_id) {
                crate::metrics::Metrics::inc(&self.metrics.refusals);
                return Err(e);
            }
            facts.instance_id = doc.instance_id.clone();
            if let Some(ip) = doc.private_ip {
                facts.addresses = vec![ip.to_string()];
            }
        }
        if let Err(why) = crate::registry::untrusted::check_facts(&facts) {
            crate::metrics::Metrics::inc(&self.metrics.refusals);
            return Err(EnrollRefused::Invalid(why));
        }
        let enrolled = NodeEvent::Enrolled { facts, now_ms: self.clock.now_ms(), cert_sha256 };
        if let Err(e) = reg.transition(node_id, enrolled) {
            // Checked above under this lock: only a node that moved on
            // (terminated) gets here.
            crate::metrics::Metrics::inc(&self.metrics.refusals);
            return Err(EnrollRefused::Invalid(e.to_string()));
        }
        crate::metrics::Metrics::inc(&self.metrics.enrollments);
        reg.event(format!("{node_id} enrolled from {from}"));
        drop(reg);
        // The spend is durable before the certificate is handed out: a
        // certificate a restarted controller would not know (and a token it
        // would take again) is never given.
        if let Err(journal) = self.journal.spent(node_id, cert_sha256) {
            tracing::error!("cannot append to tokens.log ({journal}); saving cluster.json instead");
            if let Err(snapshot) = self.save() {
                let why = format!(
                    "its enrollment could not be recorded in {} (tokens.log: {journal}; cluster.json: {snapshot:#}): \
                     no certificate was handed out; free or fix that disk",
                    self.cfg.state_dir.display()
                );
                tracing::error!(node = %node_id, "{why}");
                let refuse =
                    NodeEvent::Refuse { refusal: crate::model::Refusal::Unrecorded, why: why.clone() };
                if let Err(e) = self.registry.lock().transition(node_id, refuse) {
                    tracing::error!(node = %node_id, "cannot fail the node: {e}");
                }
                self.changed();
                return Err(EnrollRefused::Unrecorded);
            }
        }
        self.changed();
        Ok(())
    }

    /// An agent opened its session: its worker count and plan.
    pub fn hello(&self, node_id: &str, hello: Hello) -> Result<Assignment, Refused> {
        let mut reg = self.registry.lock();
        let entry = reg.get(node_id).ok_or_else(|| Refused::UnknownNode(node_id.to_string()))?;
        let role = entry.rec.role;
        let mut hello = hello;
        // The names it may have are the provider's to say, from what it
        // proved (its attested address and instance), not from its claims.
        hello.own_names =
            self.provider.host_names(node_id, entry.rec.address(), entry.rec.instance_id.as_deref());
        // A node is believed on its cores up to what its instance type has
        // (EC2: its vCPUs), not beyond.
        if let Some(max) = self.provider.cores_of(&entry.rec.instance_type)
            && hello.facts.logical_cores > max
        {
            tracing::warn!(
                node = node_id,
                claimed = hello.facts.logical_cores,
                "{node_id} claims more cores than its instance type ({}) has: counted as {max}",
                entry.rec.instance_type
            );
            hello.facts.logical_cores = max;
        }
        let multiplier = match role {
            Role::Master => self.cfg.master_multiplier,
            Role::Slave => self.cfg.slave_multiplier,
        };
        let workers = worker_count(hello.facts.logical_cores, multiplier);
        let layout = self.provider.layout(node_id);
        let steps = self.engine.steps(role, workers, &layout);
        // The packages for the node's architecture (an older agent does not
        // say: the first, x86_64); none for it: the node pip-installs.
        let arch = hello.facts.arch.as_str();
        let env = self.python_envs.iter().find(|e| arch.is_empty() || e.arch == arch);
        let image = self.engine.image_steps();
        let mut plan = crate::plan::build(&self.cfg, role, workers, &layout, steps, image, env);
        if let Some(name) = &self.cfg.bake {
            // A bake node: every role's image steps, then the seal.
            let other = if role == Role::Master { Role::Slave } else { Role::Master };
            let steps = self.engine.steps(other, workers, &layout);
            let other = crate::plan::build(&self.cfg, other, workers, &layout, steps, image, env);
            plan = crate::plan::bake_plan(&[&plan, &other], name, layout.system);
        }
        let attested = self.provider.attestor().is_some();
        let event = NodeEvent::Hello { hello, workers, plan: &plan, keep_identity: attested };
        if let Err(e) = reg.transition(node_id, event) {
            drop(reg);
            self.changed(); // a refused hello fails the node
            return Err(e);
        }
        drop(reg);
        self.changed();
        // The new session gets the node's directives.
        self.republish(node_id);
        Ok(Assignment {
            node_id: node_id.to_string(),
            role,
            workers,
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u32,
            plan,
        })
    }

    pub fn step_report(&self, node_id: &str, report: StepReport) -> Result<(), Refused> {
        let effect = self.registry.lock().transition(node_id, NodeEvent::Step(report))?;
        if effect == Effect::Ready {
            self.membership_changed();
        }
        self.changed();
        Ok(())
    }

    pub fn notice(&self, node_id: &str, kind: Notice, detail: &str) {
        let noticed = self.registry.lock().on_notice(node_id, kind, detail);
        let Some(n) = noticed else { return };
        if n.market == Market::Spot {
            self.provider.noticed(n.role, &n.pool, node_id, n.instance_id.as_deref(), kind);
        }
        crate::metrics::Metrics::inc(&self.metrics.notices);
        self.changed();
        // It is leaving: engines stop giving it work.
        self.membership_changed();
        self.wake.notify_one();
    }

    /// A collected attribute; only a changed value republishes.
    pub fn attribute(&self, node_id: &str, name: &str, value: &str) -> Result<(), Refused> {
        let r = self.registry.lock().on_attribute(node_id, name, value);
        match r {
            Ok(false) => {}
            Ok(true) => {
                self.changed();
                self.membership_changed();
            }
            Err(_) => self.changed(), // the node failed
        }
        r.map(|_| ())
    }

    /// Signs a renewed certificate for `node_id` and records it as accepted
    /// (durably, before the agent gets it: a reconnect with it must work).
    pub fn renew(&self, node_id: &str, csr_pem: &str) -> Result<String, String> {
        let cert = self.pki.sign_node(node_id, csr_pem, self.cert_validity).map_err(|e| e.to_string())?;
        let sha = crate::pki::pem_sha256(&cert).map_err(|e| e.to_string())?;
        let mut reg = self.registry.lock();
        reg.renewed(node_id, &sha);
        reg.event(format!("{node_id}: client certificate renewed"));
        drop(reg);
        self.save().map_err(|e| format!("cannot save the renewed certificate's record: {e:#}"))?;
        Ok(cert)
    }

    /// A probe's answer from `node_id`: only the master's, only probes the
    /// engine asked for, at most `MAX_PROBE_BODY` bytes. Hosts the engine
    /// reads as safe to remove end their drain now.
    pub fn probed(&self, node_id: &str, name: &str, body: &str) -> Result<(), String> {
        if body.len() > MAX_PROBE_BODY {
            return Err(format!("probe answer over {MAX_PROBE_BODY} bytes"));
        }
        let role = self.registry.lock().get(node_id).map(|e| e.rec.role);
        if role != Some(Role::Master) {
            return Err("probe answers are taken from the master only".into());
        }
        // Read (up to 256 KiB of JSON) without holding the registry.
        let probed = self.engine.probed(name, body)?;
        {
            let mut p = self.policies.lock();
            if let Some(busy) = probed.busy {
                p.engine_busy = busy;
            }
            if let Some(t) = probed.target_workers {
                p.engine_target = Some(t);
            }
        }
        let marked = probed.safe_to_remove.is_some_and(|hosts| self.registry.lock().mark_drained(&hosts));
        if marked {
            self.changed();
        }
        Ok(())
    }

    pub fn directive_report(&self, node_id: &str, report: DirectiveReport) {
        self.registry.lock().on_directive_report(node_id, report);
    }

    /// Handling a `kind` message of `node_id` panicked (see
    /// `grpc::take_guarded`): the node is failed with the reason.
    pub fn internal_failure(&self, node_id: &str, kind: &str, why: &str) {
        self.registry.lock().on_internal_error(node_id, kind, why);
        self.changed();
        self.membership_changed();
    }
}

/// Why an enrollment with a valid-looking token was refused. The messages
/// go to an unauthenticated caller: they tell it nothing it did not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollRefused {
    #[error("{0}")]
    Token(TokenError),
    /// The token's slot was launched as another instance. The token stays
    /// unspent: the rightful instance can still use it.
    #[error("this bootstrap token was not issued to this instance")]
    Instance,
    /// The controller has not recorded which instance the slot became
    /// (a launch whose answer it has not seen yet): try again shortly.
    #[error("the controller does not know this slot's instance yet: retry later")]
    NotYet,
    /// The facts sent are not valid (`untrusted::check_facts`); the token
    /// stays unspent.
    #[error("{0}")]
    Invalid(String),
    /// Neither the journal nor the snapshot took the enrollment: the node
    /// fails (the token is spent) and is replaced; its agent gets no
    /// certificate.
    #[error(
        "the controller cannot record enrollments now (its state directory's disk); this node is replaced"
    )]
    Unrecorded,
}

/// Whether the attested instance may use the token of a slot whose
/// recorded instance is `recorded`. An unknown slot instance is never
/// filled in from the caller's claim.
pub fn check_binding(recorded: Option<&str>, attested: &str) -> Result<(), EnrollRefused> {
    match recorded {
        None => Err(EnrollRefused::NotYet),
        Some(r) if r != attested => Err(EnrollRefused::Instance),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod binding_tests {
    use super::*;

    #[test]
    fn a_slot_token_binds_only_the_recorded_instance_and_never_trusts_a_claim() {
        assert_eq!(check_binding(Some("i-0a"), "i-0a"), Ok(()));
        assert_eq!(check_binding(Some("i-0a"), "i-0b"), Err(EnrollRefused::Instance));
        // Not recorded yet (a launch whose answer was lost): retry later,
        // never "take the caller's word and record it".
        assert_eq!(check_binding(None, "i-0b"), Err(EnrollRefused::NotYet));
        assert!(!EnrollRefused::Instance.to_string().contains("i-0"));
    }
}
