//! Every transition of a node, as a method of the [`Registry`]: what an
//! agent reports (`on_hello`, `on_step`, `on_notice`, ...), what the
//! reconcile pass decided (`apply`), what the operator asked (`set_desired`,
//! `supersede`). Network handlers and the reconcile pass call these; no other
//! code sets a node's state. The diagram they implement is in
//! [`NodeState`]'s documentation.
//!
//! # Guarantees
//! - Reports are validated before anything changes: a report for another
//!   plan, a step index outside the plan, an oversized attribute change
//!   nothing and say why.
//! - "Became ready" is one method ([`Registry::become_ready`]), whichever
//!   report completes the plan.

use super::{Facts, Registry, StepLog, unix_ms};
use crate::model::{Market, NodeState, Notice, Role};
use crate::plan::Plan;
use crate::provider::{Launched, Target};
use crate::reconcile::{Action, Reason};
use std::collections::BTreeMap;

/// What an agent says when its session opens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hello {
    pub facts: Facts,
    /// The plan its progress belongs to.
    pub plan_id: String,
    /// Steps of that plan already done.
    pub completed_steps: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Running,
    Succeeded,
    Skipped,
    Failed,
}

impl StepStatus {
    pub fn label(self) -> &'static str {
        match self {
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Skipped => "skipped",
            StepStatus::Failed => "failed",
        }
    }
}

/// An agent's report about one step of its plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub plan_id: String,
    pub index: u32,
    pub name: String,
    pub status: StepStatus,
    pub duration_ms: u64,
    pub exit_code: i32,
    pub output_tail: String,
}

/// How applying one engine directive went on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectiveReport {
    pub name: String,
    pub ok: bool,
    pub message: String,
}

/// Engine problems kept per node, and the longest message kept.
pub const MAX_ENGINE_PROBLEMS: usize = 32;
pub const MAX_ENGINE_MESSAGE: usize = 1024;
/// Longer directive names are not ours: such reports are ignored.
pub const MAX_ENGINE_NAME: usize = 256;

/// The largest attribute accepted (public keys are well under this).
pub const MAX_ATTRIBUTE: usize = 16 * 1024;
/// Step output kept per step (the agent sends its last 4 KiB; more is cut
/// from the front).
pub const MAX_STEP_OUTPUT: usize = 8 * 1024;

/// A report that changed nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("node {0} is not in the registry")]
    UnknownNode(String),
    #[error("step index {index} is outside the plan of {of} steps, or names another step")]
    StepOutOfRange { index: u32, of: u32 },
    /// A report no honest agent sends; the node was failed for it.
    #[error("{0}")]
    Invalid(String),
}

/// What an applied action leaves for the provider to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Nothing,
    /// Terminate this instance; `loss`: the node was lost, not removed.
    Terminate {
        target: Target,
        loss: bool,
    },
    Launch {
        role: Role,
        pool: String,
        count: u32,
    },
}

/// What a notice changed, for the caller to pass on (on-demand fallback,
/// metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Noticed {
    pub role: Role,
    pub pool: String,
    pub market: Market,
    pub instance_id: Option<String>,
}

impl Registry {
    /// The token is spent and the node `Enrolled`.
    pub fn complete_enrollment(&mut self, id: &str, facts: Facts, now_ms: u64, cert_sha256: &str) {
        let Some(e) = self.nodes.get_mut(id) else { return };
        e.rec.token_used = true;
        e.rec.cert_sha256 = Some(cert_sha256.to_string());
        e.rec.cert_sha256_next = None;
        e.rec.state = NodeState::Enrolled;
        if facts.started_unix_ms > 0 && e.rec.phases.len() < 64 {
            e.rec.phases.push(("agent downloaded and started".into(), facts.started_unix_ms));
        }
        e.rec.phase("enrolled");
        e.rec.detail.clear();
        if e.rec.instance_id.is_none() && !facts.instance_id.is_empty() {
            e.rec.instance_id = Some(facts.instance_id.clone());
        }
        e.rec.facts = Some(facts);
        e.live.touch(now_ms);
        self.dirty = true;
    }

    /// Whether a session may present the certificate with SHA-256 `sha256`
    /// for node `id`: the one issued at enrollment, or its renewal (which
    /// then becomes the current one). A record from before certificates
    /// were pinned pins the first one presented.
    pub fn accept_session_cert(&mut self, id: &str, sha256: &str) -> Result<(), Refused> {
        let e = self.nodes.get_mut(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        if e.rec.cert_sha256.as_deref() == Some(sha256) {
            return Ok(());
        }
        if e.rec.cert_sha256_next.as_deref() == Some(sha256) {
            e.rec.cert_sha256 = e.rec.cert_sha256_next.take();
            self.dirty = true;
            return Ok(());
        }
        if e.rec.pin_first_session && e.rec.cert_sha256.is_none() {
            e.rec.cert_sha256 = Some(sha256.to_string());
            e.rec.pin_first_session = false;
            self.dirty = true;
            return Ok(());
        }
        Err(Refused::Invalid(format!("the certificate presented is not the one issued to node {id}")))
    }

    /// A renewed certificate was issued to `id`: accepted from now on
    /// besides the current one.
    pub fn renewed(&mut self, id: &str, sha256: &str) {
        if let Some(e) = self.nodes.get_mut(id) {
            e.rec.cert_sha256_next = Some(sha256.to_string());
            self.dirty = true;
        }
    }

    /// The provider started `launched` of the batch `nodes`: they get their
    /// instance, type and market; the rest of the batch is forgotten (it
    /// will be launched again).
    pub fn on_launched(&mut self, nodes: &[String], launched: &[Launched]) {
        for l in launched {
            if let Some(e) = self.get_mut(&l.node_id) {
                e.rec.instance_id = Some(l.instance_id.clone());
                e.rec.instance_type = l.instance_type.clone();
                e.rec.market = l.market;
            }
        }
        let on_demand: Vec<&str> =
            launched.iter().filter(|l| l.on_demand_why.is_some()).map(|l| l.node_id.as_str()).collect();
        if let Some(why) = launched.iter().find_map(|l| l.on_demand_why.as_deref()) {
            let msg = format!("{} launched on-demand, not spot: {why}", on_demand.join(", "));
            tracing::warn!("{msg}");
            self.event(msg);
        }
        for id in nodes.iter().filter(|id| !launched.iter().any(|l| &l.node_id == *id)) {
            self.remove(id);
        }
    }

    /// An agent opened a session: records its facts and its assignment
    /// (`workers`, `plan`), and moves it to where its progress says.
    /// Returns whether it became ready.
    /// Its facts are checked first (`untrusted::check_facts`; host name and
    /// address unique among the nodes not being terminated): invalid ones
    /// are not stored, the node fails saying why. With `keep_identity`
    /// (attested nodes) its instance id and addresses stay those the
    /// enrollment verified, whatever the hello says.
    pub fn on_hello(
        &mut self,
        id: &str,
        mut hello: Hello,
        workers: u32,
        plan: &Plan,
        keep_identity: bool,
    ) -> Result<bool, Refused> {
        let e = self.nodes.get(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        if keep_identity && let Some(old) = &e.rec.facts {
            hello.facts.instance_id = old.instance_id.clone();
            hello.facts.addresses = old.addresses.clone();
        }
        let address = if e.rec.address.is_empty() {
            hello.facts.addresses.first().cloned().unwrap_or_default()
        } else {
            e.rec.address.clone()
        };
        let wanted = super::claims(&hello.facts.hostname, &address);
        if let Err(why) = super::untrusted::check_facts(&hello.facts).and_then(|()| self.unique(id, &wanted))
        {
            self.reject(id, "hello", &why);
            return Err(Refused::Invalid(why));
        }
        let e = self.nodes.get(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        let old = super::claims_of(&e.rec);
        for c in old.into_iter().filter(|c| !wanted.contains(c)) {
            self.claims.remove(&c);
        }
        for c in wanted {
            self.claims.insert(c, id.to_string());
        }
        let e = self.nodes.get_mut(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        e.rec.step_names = plan.steps.iter().map(|s| s.name.clone()).collect();
        e.rec.collects = plan
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                crate::plan::StepKind::Collect { attribute, .. } => Some(attribute.clone()),
                _ => None,
            })
            .collect();
        self.dirty = true;
        // Its facts may have changed, and a new session needs its
        // directives again.
        self.changed_members.push(id.to_string());
        let n = plan.steps.len() as u32;
        e.rec.workers = workers;
        e.rec.plan_id = plan.id.clone();
        if e.rec.instance_id.is_none() && !hello.facts.instance_id.is_empty() {
            e.rec.instance_id = Some(hello.facts.instance_id.clone());
        }
        e.rec.facts = Some(hello.facts);
        let same_plan = hello.plan_id == plan.id;
        let done = if same_plan { hello.completed_steps.min(n) } else { 0 };
        let was_ready = e.rec.state == NodeState::Ready;
        // A failed node stays failed for the plan that failed; a draining
        // one keeps draining.
        if (matches!(e.rec.state, NodeState::Failed { .. }) && same_plan)
            || e.rec.state == NodeState::Draining
        {
            return Ok(false);
        }
        if done == n {
            if !was_ready {
                self.become_ready(id);
                return Ok(true);
            }
        } else {
            e.rec.state = NodeState::Provisioning { step: done, of: n };
        }
        Ok(false)
    }

    /// The one "became ready" transition.
    fn become_ready(&mut self, id: &str) {
        let Some(e) = self.nodes.get_mut(id) else { return };
        e.rec.state = NodeState::Ready;
        e.rec.phase("ready");
        e.rec.current_step.clear();
        let msg = format!("{id} ready ({}, {} workers)", e.rec.role, e.rec.workers);
        self.dirty = true;
        self.changed_members.push(id.to_string());
        self.event(msg);
    }

    /// A step report. Reports about another plan, or arriving when the node
    /// is not provisioning, are ignored. Returns whether the node became
    /// ready.
    pub fn on_step(&mut self, id: &str, s: StepReport) -> Result<bool, Refused> {
        let e = self.nodes.get_mut(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        if s.plan_id != e.rec.plan_id {
            return Ok(false); // a report about an older plan
        }
        let NodeState::Provisioning { of, .. } = e.rec.state else { return Ok(false) };
        if s.index >= of {
            return Err(Refused::StepOutOfRange { index: s.index, of });
        }
        // The name is the plan's: a node cannot grow its record with names
        // of its own.
        if e.rec.step_names.get(s.index as usize) != Some(&s.name) {
            return Err(Refused::StepOutOfRange { index: s.index, of });
        }
        let mut s = s;
        if s.output_tail.len() > MAX_STEP_OUTPUT {
            let mut cut = s.output_tail.len() - MAX_STEP_OUTPUT;
            while !s.output_tail.is_char_boundary(cut) {
                cut += 1;
            }
            s.output_tail.drain(..cut);
        }
        self.dirty = true;
        if s.status != StepStatus::Running {
            let log = StepLog {
                status: s.status.label().to_string(),
                exit_code: s.exit_code,
                duration_ms: s.duration_ms,
                output_tail: s.output_tail.clone(),
            };
            e.rec.steps.insert(s.name.clone(), log);
        }
        match s.status {
            StepStatus::Running => {
                e.rec.phase(format!("step {}", s.name));
                e.rec.state = NodeState::Provisioning { step: s.index, of };
                e.rec.current_step = s.name;
            }
            StepStatus::Succeeded | StepStatus::Skipped => {
                tracing::info!(node = %id, step = %s.name, ms = s.duration_ms, "step succeeded");
                // `index < of`, so `index + 1` cannot overflow.
                if s.index + 1 == of {
                    self.become_ready(id);
                    return Ok(true);
                }
                e.rec.state = NodeState::Provisioning { step: s.index + 1, of };
            }
            StepStatus::Failed => {
                let failure = crate::failures::Failure {
                    unix_ms: unix_ms(),
                    node: id.to_string(),
                    role: e.rec.role,
                    step: s.name.clone(),
                };
                e.rec.state = NodeState::Failed { step: s.name.clone() };
                e.rec.phase(format!("failed at {}", s.name));
                e.rec.detail =
                    format!("step {} failed (exit {}): {}", s.name, s.exit_code, s.output_tail.trim());
                let msg = format!(
                    "{id} FAILED at step {} (exit {}); see `ddisco-controller status`",
                    s.name, s.exit_code
                );
                e.rec.current_step = s.name;
                self.event(msg);
                self.failed(failure);
            }
        }
        Ok(false)
    }

    /// Notes a failure (the failure budget counts them).
    fn failed(&mut self, f: crate::failures::Failure) {
        if self.failures.len() == crate::failures::MAX_FAILURES {
            self.failures.pop_front();
        }
        self.failures.push_back(f);
        self.dirty = true;
    }

    /// A notice from the node's cloud. Recorded once per node; returns what
    /// it concerns when it is new.
    pub fn on_notice(&mut self, id: &str, kind: Notice, detail: &str) -> Option<Noticed> {
        let e = self.nodes.get_mut(id)?;
        if e.rec.notice.is_some() {
            return None;
        }
        e.rec.notice = Some(kind);
        let noticed = Noticed {
            role: e.rec.role,
            pool: e.rec.pool.clone(),
            market: e.rec.market,
            instance_id: e.rec.instance_id.clone(),
        };
        self.dirty = true;
        self.changed_members.push(id.to_string());
        let msg = format!("{id}: {} notice ({}); launching its replacement now", kind.label(), detail.trim());
        tracing::warn!("{msg}");
        self.event(msg);
        Some(noticed)
    }

    /// A value the node's plan collected for the engine: an SSH public key
    /// (see `StepKind::Collect`). A name its plan does not collect, or a
    /// value that is not one valid key line, fails the node and is not
    /// stored. Returns whether the value changed.
    pub fn on_attribute(&mut self, id: &str, name: &str, value: &str) -> Result<bool, Refused> {
        let e = self.nodes.get(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        let checked = if name.len() > MAX_ATTRIBUTE || !e.rec.collects.iter().any(|c| c == name) {
            Err(format!(
                "attribute {:?} is not one its plan collects",
                super::untrusted::clean_line(super::untrusted::prefix(name, 64))
            ))
        } else if value.len() > MAX_ATTRIBUTE {
            Err(format!("attribute {name}: over {MAX_ATTRIBUTE} bytes"))
        } else {
            super::untrusted::ssh_public_key(value).map_err(|e| format!("attribute {name}: {e}"))
        };
        let key = match checked {
            Ok(k) => k,
            Err(why) => {
                self.reject(id, "attribute", &why);
                return Err(Refused::Invalid(why));
            }
        };
        let e = self.nodes.get_mut(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        if e.rec.attributes.get(name) == Some(&key) {
            return Ok(false);
        }
        e.rec.attributes.insert(name.to_string(), key);
        self.dirty = true;
        self.changed_members.push(id.to_string());
        Ok(true)
    }

    /// Host name (first label, any case) and address held by no other
    /// node of the registry (a node being replaced holds them until it is
    /// gone). One lookup each, whatever the cluster's size.
    fn unique(&self, id: &str, wanted: &[super::Claim]) -> Result<(), String> {
        for c in wanted {
            if let Some(other) = self.claims.get(c).filter(|o| o.as_str() != id) {
                return Err(format!("{c} is already node {other}'s"));
            }
        }
        Ok(())
    }

    /// Handling a message of `id`'s panicked: a bug in the controller that
    /// the message found. The node fails saying so (and, being failed, is
    /// replaced); nothing else changes.
    pub fn on_internal_error(&mut self, id: &str, what: &str, why: &str) {
        let why = format!("the controller could not handle it (a bug in the controller; report it): {why}");
        self.reject(id, &format!("{what} message"), &super::untrusted::clean_line(&why));
    }

    /// A node that sent what no honest agent sends: failed, with the reason
    /// (its session is refused; it is kept for diagnosis like a failed step).
    fn reject(&mut self, id: &str, what: &str, why: &str) {
        let Some(e) = self.nodes.get_mut(id) else { return };
        if e.rec.state == NodeState::Terminating {
            return;
        }
        let first =
            !matches!(&e.rec.state, NodeState::Failed { step } if step == what) || e.rec.detail != why;
        e.rec.state = NodeState::Failed { step: what.to_string() };
        e.rec.phase(format!("failed: invalid {what}"));
        e.rec.detail = format!("refused its {what}: {why}");
        self.dirty = true;
        self.changed_members.push(id.to_string());
        if first {
            let msg = format!("{id} FAILED: its {what} was refused: {why}");
            tracing::warn!("{msg}");
            let role = e.rec.role;
            self.event(msg);
            self.failed(crate::failures::Failure {
                unix_ms: unix_ms(),
                node: id.to_string(),
                role,
                step: what.to_string(),
            });
        }
    }

    /// How applying an engine directive went. Problems are kept per
    /// directive (a later success of another one does not hide it); a new
    /// problem is an event. Bounded: at most [`MAX_ENGINE_PROBLEMS`] names,
    /// messages cut at [`MAX_ENGINE_MESSAGE`] bytes.
    pub fn on_directive_report(&mut self, id: &str, d: DirectiveReport) {
        let Some(e) = self.nodes.get_mut(id) else { return };
        if d.name.len() > MAX_ENGINE_NAME {
            return; // no directive has such a name
        }
        if d.ok {
            if e.rec.engine_problems.remove(&d.name).is_some() {
                self.dirty = true;
            }
            return;
        }
        let mut message = d.message;
        if message.len() > MAX_ENGINE_MESSAGE {
            let mut cut = MAX_ENGINE_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        if e.rec.engine_problems.get(&d.name) == Some(&message)
            || (e.rec.engine_problems.len() >= MAX_ENGINE_PROBLEMS
                && !e.rec.engine_problems.contains_key(&d.name))
        {
            return;
        }
        let event = format!("{id} engine: {}: {message}", d.name);
        e.rec.engine_problems.insert(d.name, message);
        self.dirty = true;
        self.event_once(event);
    }

    /// Carries out a reconcile action on the registry; returns what is left
    /// for the provider. `drain_secs` is only for the operator's message.
    pub fn apply(&mut self, action: Action, drain_secs: f64) -> Effect {
        match action {
            Action::MarkBooting { id } => {
                if let Some(e) = self.get_mut(&id) {
                    e.rec.state = NodeState::Booting;
                    e.rec.phase("running");
                }
                Effect::Nothing
            }
            Action::Forget { id } => {
                self.remove(&id);
                Effect::Nothing
            }
            Action::Reterminate { id } => {
                let Some(e) = self.get_mut(&id) else { return Effect::Nothing };
                e.rec.terminate_sent_unix_ms = Some(unix_ms());
                let target = Target { node_id: Some(id.clone()), instance_id: e.rec.instance_id.clone() };
                let msg = format!(
                    "{id}: instance {} still running after it was terminated; terminating it again",
                    e.rec.instance_id.as_deref().unwrap_or("?")
                );
                self.dirty = true;
                tracing::warn!("{msg}");
                self.event_once(msg);
                Effect::Terminate { target, loss: false }
            }
            Action::Drain { id } => {
                let Some(e) = self.get_mut(&id) else { return Effect::Nothing };
                e.rec.state = NodeState::Draining;
                e.rec.drain_started_unix_ms = Some(unix_ms());
                let why =
                    if e.rec.superseded { "on-demand, its spot replacement is ready" } else { "scale down" };
                self.changed_members.push(id.clone());
                self.event(format!("{id} draining before removal ({why}; up to {drain_secs:.0}s)"));
                Effect::Nothing
            }
            Action::Terminate { id, reason } => {
                let Some(e) = self.get_mut(&id) else { return Effect::Nothing };
                if reason == Reason::Failed {
                    // What it reported stays readable (status, `logs`).
                    let kept = e.rec.clone();
                    if self.failed_nodes.len() == super::MAX_FAILED_NODES {
                        self.failed_nodes.pop_front();
                    }
                    self.failed_nodes.push_back(kept);
                }
                let Some(e) = self.get_mut(&id) else { return Effect::Nothing };
                let role = e.rec.role;
                let was = crate::text::prefix(e.rec.detail.lines().next().unwrap_or(""), 200).to_string();
                e.rec.state = NodeState::Terminating;
                e.rec.terminate_sent_unix_ms = Some(unix_ms());
                e.rec.phase("terminating");
                e.rec.detail = reason.describe();
                e.live.revoke();
                let target = Target { node_id: Some(id.clone()), instance_id: e.rec.instance_id.clone() };
                let loss = reason.is_loss();
                self.changed_members.push(id.clone());
                let msg = match (&reason, role) {
                    (Reason::Failed, _) => format!(
                        "{id} terminated, it failed ({was}); its reports stay in status and `logs {id}`; it is \
                         replaced unless the failure budget holds launches"
                    ),
                    (r, Role::Master) if r.is_loss() => format!(
                        "MASTER {id} LOST ({}): the cluster cannot run jobs until a new master is ready; \
                         launching one now; slaves keep running and will be pointed at it",
                        r.describe()
                    ),
                    (r, _) if r.is_loss() => format!("{id} lost ({}); replacing it", r.describe()),
                    (Reason::ScaleDown, _) => format!("{id} removed (scale down)"),
                    (r, _) => format!("{id} terminated ({})", r.describe()),
                };
                if loss {
                    tracing::warn!("{msg}");
                }
                self.event(msg);
                Effect::Terminate { target, loss }
            }
            Action::Launch { role, pool, count } => Effect::Launch { role, pool, count },
        }
    }

    /// The operator asked for `desired` slaves per pool; returns the total
    /// before.
    pub fn set_desired(&mut self, desired: BTreeMap<String, u32>) -> u32 {
        let previous = self.desired_slaves();
        let total: u32 = desired.values().sum();
        let summary: Vec<String> = desired.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.event(format!("scale: {previous} -> {total} slaves ({})", summary.join(" ")));
        self.desired = desired;
        self.dirty = true;
        previous
    }

    /// Marks on-demand slaves for replacement by spot ones (chosen by
    /// `reconcile::supersede`); `why` prefixes each event.
    pub fn supersede(&mut self, ids: &[String], why: &str) {
        for id in ids {
            if let Some(e) = self.get_mut(id) {
                e.rec.superseded = true;
            }
            self.event(format!(
                "{why}{id} runs on-demand but spot works again: replacing it with a spot node"
            ));
        }
    }

    /// `destroy`: every node is terminating and its session revoked; returns
    /// what to terminate.
    pub fn terminate_all(&mut self) -> Vec<Target> {
        self.dirty = true;
        self.nodes
            .values_mut()
            .map(|e| {
                e.live.revoke();
                e.rec.state = NodeState::Terminating;
                e.rec.terminate_sent_unix_ms = Some(unix_ms());
                Target { node_id: Some(e.rec.id.clone()), instance_id: e.rec.instance_id.clone() }
            })
            .collect()
    }

    /// `destroy` finished: forgets every node.
    pub fn forget_all(&mut self) {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
        // The next cluster of this state directory starts its own clock.
        self.started_unix_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Step, StepKind};
    use crate::registry::NewNode;

    fn plan(n: usize) -> Plan {
        Plan::new(
            (0..n)
                .map(|i| Step {
                    name: format!("s{i}"),
                    kind: StepKind::Shell { script: "true".into(), env: Default::default() },
                })
                .collect(),
        )
    }

    fn registry_with(role: Role) -> (Registry, String) {
        let mut r = Registry::new(BTreeMap::new());
        let id = r.add_node(
            NewNode {
                role,
                pool: "default".into(),
                batch: None,
                token_hash: "h".into(),
                token_expires_unix_ms: u64::MAX,
            },
            |_| String::new(),
        );
        r.complete_enrollment(&id, Facts::default(), 1, "fp");
        (r, id)
    }

    /// A hello with valid facts.
    fn good() -> Hello {
        Hello { facts: Facts { hostname: "node-1".into(), ..Default::default() }, ..Default::default() }
    }

    fn report(p: &Plan, index: u32, status: StepStatus) -> StepReport {
        StepReport {
            plan_id: p.id.clone(),
            index,
            name: format!("s{index}"),
            status,
            duration_ms: 1,
            exit_code: 0,
            output_tail: String::new(),
        }
    }

    #[test]
    fn hello_then_steps_make_a_node_ready_once() {
        let (mut r, id) = registry_with(Role::Slave);
        let p = plan(2);
        assert_eq!(r.on_hello(&id, good(), 3, &p, false), Ok(false));
        assert_eq!(r.get(&id).unwrap().rec.state, NodeState::Provisioning { step: 0, of: 2 });
        assert_eq!(r.on_step(&id, report(&p, 0, StepStatus::Succeeded)), Ok(false));
        assert_eq!(r.on_step(&id, report(&p, 1, StepStatus::Succeeded)), Ok(true));
        assert_eq!(r.get(&id).unwrap().rec.state, NodeState::Ready);
        // A reconnect with the finished progress does not become ready twice.
        let hello = Hello { plan_id: p.id.clone(), completed_steps: 2, ..good() };
        assert_eq!(r.on_hello(&id, hello, 3, &p, false), Ok(false));
        let readies = r.events().iter().filter(|e| e.message.contains(" ready (")).count();
        assert_eq!(readies, 1);
    }

    #[test]
    fn a_hello_with_finished_progress_is_ready_at_once() {
        let (mut r, id) = registry_with(Role::Master);
        let p = plan(1);
        let hello = Hello { plan_id: p.id.clone(), completed_steps: 1, ..good() };
        assert_eq!(r.on_hello(&id, hello, 2, &p, false), Ok(true));
        assert!(r.events().back().unwrap().message.contains("ready (master, 2 workers)"));
    }

    #[test]
    fn a_step_index_outside_the_plan_is_refused_not_a_panic() {
        let (mut r, id) = registry_with(Role::Slave);
        let p = plan(2);
        r.on_hello(&id, good(), 1, &p, false).unwrap();
        for index in [2, u32::MAX] {
            for status in [StepStatus::Running, StepStatus::Succeeded, StepStatus::Failed] {
                assert_eq!(
                    r.on_step(&id, report(&p, index, status)),
                    Err(Refused::StepOutOfRange { index, of: 2 })
                );
            }
        }
        assert_eq!(r.get(&id).unwrap().rec.state, NodeState::Provisioning { step: 0, of: 2 });
        // A name of its own, at a valid index: refused, nothing stored.
        let mut named = report(&p, 0, StepStatus::Succeeded);
        named.name = "spam-0001".into();
        assert!(matches!(r.on_step(&id, named), Err(Refused::StepOutOfRange { .. })));
        assert!(r.get(&id).unwrap().rec.steps.is_empty());
        // Output is cut to its last MAX_STEP_OUTPUT bytes.
        let mut big = report(&p, 0, StepStatus::Succeeded);
        big.output_tail = format!("{}end", "é".repeat(MAX_STEP_OUTPUT));
        r.on_step(&id, big).unwrap();
        let kept = &r.get(&id).unwrap().rec.steps["s0"].output_tail;
        assert!(kept.len() <= MAX_STEP_OUTPUT && kept.ends_with("end"), "{}", kept.len());
    }

    #[test]
    fn only_the_certificate_issued_to_a_node_opens_its_sessions_and_a_renewal_takes_over() {
        let (mut r, id) = registry_with(Role::Slave); // enrolled with "fp"
        assert_eq!(r.accept_session_cert(&id, "fp"), Ok(()));
        assert!(matches!(r.accept_session_cert(&id, "other"), Err(Refused::Invalid(_))));
        r.renewed(&id, "fp2");
        // Until the renewed one is used, both work; then only it.
        assert_eq!(r.accept_session_cert(&id, "fp"), Ok(()));
        assert_eq!(r.accept_session_cert(&id, "fp2"), Ok(()));
        assert!(r.accept_session_cert(&id, "fp").is_err());
        // A node not enrolled yet has no certificate: nothing opens it.
        let b = r.add_node(
            NewNode {
                role: Role::Slave,
                pool: "default".into(),
                batch: None,
                token_hash: "hb".into(),
                token_expires_unix_ms: u64::MAX,
            },
            |_| String::new(),
        );
        assert!(r.accept_session_cert(&b, "fp").is_err());
    }

    #[test]
    fn a_failed_node_stays_failed_for_its_plan() {
        let (mut r, id) = registry_with(Role::Slave);
        let p = plan(2);
        r.on_hello(&id, good(), 1, &p, false).unwrap();
        r.on_step(&id, report(&p, 0, StepStatus::Failed)).unwrap();
        assert!(matches!(r.get(&id).unwrap().rec.state, NodeState::Failed { .. }));
        let hello = Hello { plan_id: p.id.clone(), completed_steps: 0, ..good() };
        r.on_hello(&id, hello, 1, &p, false).unwrap();
        assert!(matches!(r.get(&id).unwrap().rec.state, NodeState::Failed { .. }));
        // A new plan starts over.
        r.on_hello(&id, good(), 1, &plan(3), false).unwrap();
        assert_eq!(r.get(&id).unwrap().rec.state, NodeState::Provisioning { step: 0, of: 3 });
    }

    #[test]
    fn reports_about_another_plan_change_nothing() {
        let (mut r, id) = registry_with(Role::Slave);
        let p = plan(2);
        r.on_hello(&id, good(), 1, &p, false).unwrap();
        let mut s = report(&p, 1, StepStatus::Succeeded);
        s.plan_id = "old".into();
        assert_eq!(r.on_step(&id, s), Ok(false));
        assert_eq!(r.get(&id).unwrap().rec.state, NodeState::Provisioning { step: 0, of: 2 });
    }

    #[test]
    fn notices_are_recorded_once_and_attributes_bounded() {
        let (mut r, id) = registry_with(Role::Slave);
        let n = r.on_notice(&id, Notice::SpotInterruption, "soon").unwrap();
        assert_eq!((n.role, n.market), (Role::Slave, Market::Spot));
        assert_eq!(r.on_notice(&id, Notice::Rebalance, "again"), None);
        assert_eq!(r.get(&id).unwrap().rec.notice, Some(Notice::SpotInterruption));
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINDXutbB7qRqVzBDiLzGqDUXnJ+ApqvHYmtaUeSjbDK0";

    fn collecting(attribute: &str) -> Plan {
        Plan::new(vec![crate::plan::Step {
            name: "collect".into(),
            kind: crate::plan::StepKind::Collect { attribute: attribute.into(), path: "/k.pub".into() },
        }])
    }

    #[test]
    fn only_collected_attributes_holding_one_valid_key_are_stored() {
        let (mut r, id) = registry_with(Role::Slave);
        r.on_hello(&id, good(), 1, &collecting("ssh_host_key"), false).unwrap();
        assert_eq!(r.on_attribute(&id, "ssh_host_key", &format!("{KEY} root@x\n")), Ok(true));
        assert_eq!(r.get(&id).unwrap().rec.attributes["ssh_host_key"], format!("{KEY} root@x"));
        // The same value again changes nothing (no republish).
        r.take_changed_members();
        assert_eq!(r.on_attribute(&id, "ssh_host_key", &format!("{KEY} root@x")), Ok(false));
        assert!(r.take_changed_members().is_empty());
        // An injected second line: refused, the node fails, nothing stored.
        let evil = format!("{KEY}\n@cert-authority * {KEY}");
        assert!(matches!(r.on_attribute(&id, "ssh_host_key", &evil), Err(Refused::Invalid(_))));
        let rec = &r.get(&id).unwrap().rec;
        assert_eq!(rec.attributes["ssh_host_key"], format!("{KEY} root@x"));
        assert!(
            matches!(rec.state, NodeState::Failed { .. }) && rec.detail.contains("ssh_host_key"),
            "{rec:?}"
        );
        // A name its plan does not collect.
        let (mut r, id) = registry_with(Role::Slave);
        r.on_hello(&id, good(), 1, &collecting("ssh_host_key"), false).unwrap();
        assert!(matches!(r.on_attribute(&id, "disco_pubkey", KEY), Err(Refused::Invalid(_))));
        assert!(r.get(&id).unwrap().rec.attributes.is_empty());
        assert!(r.get(&id).unwrap().rec.detail.contains("not one its plan collects"));
    }

    #[test]
    fn a_hello_with_invalid_or_duplicate_facts_fails_the_node_and_stores_nothing() {
        let (mut r, id) = registry_with(Role::Slave);
        let mut h = good();
        h.facts.hostname = "x\n# END ddisco\n10.0.0.9 master".into();
        assert!(matches!(r.on_hello(&id, h, 1, &plan(1), false), Err(Refused::Invalid(_))));
        let rec = &r.get(&id).unwrap().rec;
        assert!(matches!(rec.state, NodeState::Failed { .. }), "{rec:?}");
        assert!(rec.facts.as_ref().is_none_or(|f| !f.hostname.contains('\n')));
        assert!(r.events().back().unwrap().message.contains("facts.hostname"));

        // Another node may not take a host name or address already in use.
        let (mut r, a) = registry_with(Role::Master);
        r.on_hello(&a, good(), 1, &plan(1), false).unwrap();
        let b = r.add_node(
            NewNode {
                role: Role::Slave,
                pool: "default".into(),
                batch: None,
                token_hash: "h2".into(),
                token_expires_unix_ms: u64::MAX,
            },
            |_| String::new(),
        );
        r.complete_enrollment(&b, Facts::default(), 1, "fp-b");
        let mut h = good();
        h.facts.hostname = "NODE-1.ec2.internal".into();
        assert!(
            matches!(r.on_hello(&b, h, 1, &plan(1), false), Err(Refused::Invalid(why)) if why.contains(&a))
        );
    }

    #[test]
    fn an_attested_node_keeps_the_instance_and_address_its_enrollment_proved() {
        let mut r = Registry::new(BTreeMap::new());
        let id = r.add_node(
            NewNode {
                role: Role::Slave,
                pool: "default".into(),
                batch: None,
                token_hash: "h".into(),
                token_expires_unix_ms: u64::MAX,
            },
            |_| String::new(),
        );
        let proved = Facts { instance_id: "i-0a".into(), addresses: vec!["10.0.0.7".into()], ..good().facts };
        r.complete_enrollment(&id, proved, 1, "fp");
        let mut h = good();
        h.facts.instance_id = "i-0b".into();
        h.facts.addresses = vec!["10.0.0.1".into()];
        r.on_hello(&id, h, 1, &plan(1), true).unwrap();
        let f = r.get(&id).unwrap().rec.facts.clone().unwrap();
        assert_eq!((f.instance_id.as_str(), f.addresses), ("i-0a", vec!["10.0.0.7".to_string()]));
    }

    #[test]
    fn a_launch_records_instance_type_and_market_and_drops_what_did_not_start() {
        let (mut r, id) = registry_with(Role::Slave);
        let id2 = r.add_node(
            NewNode {
                role: Role::Slave,
                pool: "default".into(),
                batch: None,
                token_hash: "h2".into(),
                token_expires_unix_ms: 0,
            },
            |_| String::new(),
        );
        let l = Launched {
            node_id: id.clone(),
            instance_id: "i-1".into(),
            instance_type: "c5.large".into(),
            market: Market::OnDemand,
            on_demand_why: Some("spot kept failing".into()),
        };
        r.on_launched(&[id.clone(), id2.clone()], &[l]);
        let rec = &r.get(&id).unwrap().rec;
        assert_eq!(
            (rec.instance_id.as_deref(), rec.instance_type.as_str(), rec.market),
            (Some("i-1"), "c5.large", Market::OnDemand)
        );
        assert!(r.get(&id2).is_none());
        assert!(
            r.events().back().unwrap().message.contains("launched on-demand, not spot: spot kept failing")
        );
    }

    #[test]
    fn engine_problems_are_kept_per_directive() {
        let (mut r, id) = registry_with(Role::Slave);
        let report = |name: &str, ok: bool| DirectiveReport { name: name.into(), ok, message: "no".into() };
        r.on_directive_report(&id, report("hosts", false));
        // Another directive that works does not hide it.
        r.on_directive_report(&id, report("settings", true));
        assert_eq!(r.get(&id).unwrap().rec.engine_detail(), "engine: hosts: no");
        r.on_directive_report(&id, report("hosts", true));
        assert_eq!(r.get(&id).unwrap().rec.engine_detail(), "");
        // Bounded: a name no directive has is ignored.
        let unnamed =
            DirectiveReport { name: "x".repeat(MAX_ENGINE_NAME + 1), ok: false, message: "m".into() };
        r.on_directive_report(&id, unnamed);
        assert!(r.get(&id).unwrap().rec.engine_problems.is_empty());
        for i in 0..100 {
            r.on_directive_report(&id, report(&format!("d{i}"), false));
        }
        assert_eq!(r.get(&id).unwrap().rec.engine_problems.len(), MAX_ENGINE_PROBLEMS);
        let unnamed =
            DirectiveReport { name: "x".repeat(MAX_ENGINE_NAME + 1), ok: false, message: "m".into() };
        r.on_directive_report(&id, unnamed);
        assert!(r.get(&id).unwrap().rec.engine_problems.keys().all(|k| k.len() <= MAX_ENGINE_NAME));
        let long = DirectiveReport { name: "d0".into(), ok: false, message: "é".repeat(2000) };
        r.on_directive_report(&id, long);
        assert!(r.get(&id).unwrap().rec.engine_problems["d0"].len() <= MAX_ENGINE_MESSAGE);
    }

    #[test]
    fn terminating_a_lost_master_says_so_and_revokes_it() {
        let (mut r, id) = registry_with(Role::Master);
        let effect = r.apply(Action::Terminate { id: id.clone(), reason: Reason::BootTimeout }, 60.0);
        assert!(matches!(effect, Effect::Terminate { loss: true, .. }));
        let e = r.get(&id).unwrap();
        assert_eq!(e.rec.state, NodeState::Terminating);
        assert!(e.live.is_revoked());
        assert!(r.events().back().unwrap().message.starts_with(&format!("MASTER {id} LOST")));
    }
}
