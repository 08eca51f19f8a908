//! Every transition of a node, in one function: [`Registry::transition`],
//! whose `match (state, event)` is the diagram in [`NodeState`]'s
//! documentation. Every other (state, event) pair is refused inside the
//! registry's lock, so no race (a hello against a tick's terminate) can move
//! a node backwards. What an agent reports, what the reconcile pass decided
//! (`apply`), what `destroy` does all go through it; `NodeRecord::state` is
//! private to the registry, so the compiler keeps the rule.
//!
//! # Guarantees
//! - Reports are validated before anything changes: a report for another
//!   plan, a step index outside the plan, an oversized attribute change
//!   nothing and say why.
//! - "Became ready" is one method ([`Registry::become_ready`]), whichever
//!   report completes the plan.
//! - A terminating node never leaves `Terminating` but to be forgotten.

use super::{Facts, Registry, StepLog, unix_ms};
pub use crate::model::StepStatus;
use crate::model::{
    DrainWhy, Failure, Launched, Market, NodeState, Notice, Reason, Refusal, Role, StateKind, Target,
};
use crate::plan::Plan;
use crate::reconcile::Action;
use std::collections::BTreeMap;

/// What an agent says when its session opens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hello {
    pub facts: Facts,
    /// The plan its progress belongs to.
    pub plan_id: String,
    /// Steps of that plan already done.
    pub completed_steps: u32,
    /// The host names this node may have, as the provider knows them (its
    /// node id locally; on EC2 the names of its attested address and
    /// instance id); empty: the provider cannot tell. Set by the
    /// controller, never by the agent.
    pub own_names: Vec<String>,
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

/// A report or decision that changed nothing, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("node {0} is not in the registry")]
    UnknownNode(String),
    #[error("step index {index} is outside the plan of {of} steps, or names another step")]
    StepOutOfRange { index: u32, of: u32 },
    /// A report no honest agent sends; the node was failed for it.
    #[error("{0}")]
    Invalid(String),
    /// The node is being terminated: it never comes back.
    #[error("node {0} is being terminated")]
    Terminated(String),
    /// Not a transition of the diagram (`NodeState`).
    #[error("node {node}: {event} is not a transition from {state}")]
    Illegal { node: String, state: StateKind, event: &'static str },
}

/// What happened to a node, to be applied by [`Registry::transition`].
#[derive(Debug, Clone)]
pub enum NodeEvent<'a> {
    /// The provider lists its instance.
    Listed,
    /// Its agent spent the bootstrap token and holds a certificate.
    Enrolled { facts: Facts, now_ms: u64, cert_sha256: &'a str },
    /// The journal of spent tokens says it enrolled (a controller that
    /// crashed before its snapshot recorded the enrollment).
    Spent,
    /// Its agent opened a session: its facts, and the assignment given.
    Hello { hello: Hello, workers: u32, plan: &'a Plan, keep_identity: bool },
    /// A step report.
    Step(StepReport),
    /// It sent what no honest agent sends (or what the controller could
    /// not handle): it fails.
    Refuse { refusal: Refusal, why: String },
    /// Scale down (or back to spot): its engine stops giving it work.
    Drain,
    /// The engine holds nothing only this draining node has.
    Drained,
    /// Its instance is to be terminated.
    Terminate(Reason),
    /// Its instance still runs: ask again.
    Reterminate,
    /// Its instance is gone (or was never started): drop it.
    Forget,
}

impl NodeEvent<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            NodeEvent::Listed => "listed",
            NodeEvent::Enrolled { .. } => "enrolled",
            NodeEvent::Spent => "spent",
            NodeEvent::Hello { .. } => "hello",
            NodeEvent::Step(_) => "step",
            NodeEvent::Refuse { .. } => "refuse",
            NodeEvent::Drain => "drain",
            NodeEvent::Drained => "drained",
            NodeEvent::Terminate(_) => "terminate",
            NodeEvent::Reterminate => "reterminate",
            NodeEvent::Forget => "forget",
        }
    }
}

/// What a transition leaves for the caller to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Nothing,
    /// It became ready (engines take it in).
    Ready,
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
    /// The one place a node's state changes: `match (state, event)` is the
    /// diagram (`NodeState`); any other pair is refused and changes nothing.
    pub fn transition(&mut self, id: &str, event: NodeEvent<'_>) -> Result<Effect, Refused> {
        use StateKind as K;
        let state = self.nodes.get(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?.rec.state.kind();
        match (state, event) {
            (K::Requested, NodeEvent::Listed) => Ok(self.booting(id)),
            (K::Requested | K::Booting, NodeEvent::Enrolled { facts, now_ms, cert_sha256 }) => {
                Ok(self.enrolled(id, facts, now_ms, cert_sha256))
            }
            (K::Requested | K::Booting, NodeEvent::Spent) => {
                self.set_state(id, NodeState::Enrolled).phase("enrolled");
                Ok(Effect::Nothing)
            }
            // The snapshot already has it enrolled, or further.
            (_, NodeEvent::Spent) => Ok(Effect::Nothing),
            // A terminated node never comes back: its hello (racing the
            // tick that terminated it) or a report is refused.
            (K::Terminating, NodeEvent::Hello { .. } | NodeEvent::Step(_)) => {
                Err(Refused::Terminated(id.to_string()))
            }
            (
                K::Enrolled | K::Provisioning | K::Ready | K::Failed | K::Draining,
                NodeEvent::Hello { hello, workers, plan, keep_identity },
            ) => self.hello(id, hello, workers, plan, keep_identity),
            (K::Provisioning, NodeEvent::Step(report)) => self.step(id, report),
            // A report about a step it is no longer in (a new plan began,
            // it failed or drains meanwhile): stale, ignored.
            (K::Enrolled | K::Ready | K::Failed | K::Draining, NodeEvent::Step(_)) => Ok(Effect::Nothing),
            // Already leaving: nothing more to fail.
            (K::Terminating, NodeEvent::Refuse { .. }) => Ok(Effect::Nothing),
            (_, NodeEvent::Refuse { refusal, why }) => Ok(self.refuse(id, refusal, &why)),
            (K::Ready, NodeEvent::Drain) => Ok(self.drain(id)),
            (K::Draining, NodeEvent::Drained) => Ok(self.drained(id)),
            (K::Terminating, NodeEvent::Reterminate) => Ok(self.reterminate(id)),
            (K::Terminating | K::Requested, NodeEvent::Forget) => {
                self.remove(id);
                Ok(Effect::Nothing)
            }
            (K::Terminating, event @ NodeEvent::Terminate(_)) => {
                Err(Refused::Illegal { node: id.to_string(), state, event: event.name() })
            }
            (_, NodeEvent::Terminate(reason)) => Ok(self.terminate(id, reason)),
            (state, event) => Err(Refused::Illegal { node: id.to_string(), state, event: event.name() }),
        }
    }

    /// The state and its data, for the transition helpers below (the
    /// node exists: `transition` checked).
    fn set_state(&mut self, id: &str, state: NodeState) -> &mut super::NodeRecord {
        self.dirty = true;
        let e = self.nodes.get_mut(id).expect("transition checked the node exists");
        e.rec.state = state;
        &mut e.rec
    }

    fn booting(&mut self, id: &str) -> Effect {
        self.set_state(id, NodeState::Booting).phase("running");
        Effect::Nothing
    }

    /// The token is spent and the node `Enrolled`.
    fn enrolled(&mut self, id: &str, facts: Facts, now_ms: u64, cert_sha256: &str) -> Effect {
        let rec = self.set_state(id, NodeState::Enrolled);
        rec.token_used = true;
        rec.cert_sha256 = Some(cert_sha256.to_string());
        rec.cert_sha256_next = None;
        if facts.started_unix_ms > 0 && rec.phases.len() < 64 {
            rec.phases.push(("agent downloaded and started".into(), facts.started_unix_ms));
        }
        rec.phase("enrolled");
        rec.detail.clear();
        if rec.instance_id.is_none() && !facts.instance_id.is_empty() {
            rec.instance_id = Some(facts.instance_id.clone());
        }
        rec.facts = Some(facts);
        if let Some(e) = self.nodes.get(id) {
            e.live.touch(now_ms);
        }
        Effect::Nothing
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

    /// Is `sha256` the certificate of node `id` as it stands (issued at
    /// enrollment or renewed; the node not terminating nor revoked)? The
    /// agents' port admits such connections without the limits of
    /// unproven peers. Changes nothing.
    pub fn is_live_cert(&self, id: &str, sha256: &str) -> bool {
        let Some(e) = self.nodes.get(id) else { return false };
        if e.rec.state().is(crate::model::StateKind::Terminating) || e.live.is_revoked() {
            return false;
        }
        e.rec.cert_sha256.as_deref() == Some(sha256)
            || e.rec.cert_sha256_next.as_deref() == Some(sha256)
            || (e.rec.pin_first_session && e.rec.cert_sha256.is_none())
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
                e.rec.placement.clone_from(&l.placement);
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
            // Not started: forgotten, unless it moved on meanwhile (then
            // the refusal says so, and the reconcile pass sees it).
            if let Err(e) = self.transition(id, NodeEvent::Forget) {
                tracing::warn!("a launch that did not start {id}: {e}");
            }
        }
    }

    /// Records a hello's facts and assignment (`workers`, `plan`), and
    /// moves the node to where its progress says. Its facts are checked
    /// first (`untrusted::check_facts`; host name and address unique among
    /// the nodes not being terminated): invalid ones are not stored, the
    /// node fails saying why. With `keep_identity` (attested nodes) its
    /// instance id and addresses stay those the enrollment verified,
    /// whatever the hello says.
    fn hello(
        &mut self,
        id: &str,
        mut hello: Hello,
        workers: u32,
        plan: &Plan,
        keep_identity: bool,
    ) -> Result<Effect, Refused> {
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
        let named = super::untrusted::check_facts(&hello.facts)
            .and_then(|()| super::untrusted::check_own_name(&hello.facts.hostname, &hello.own_names))
            .and_then(|()| self.unique(id, &wanted));
        if let Err(why) = named {
            self.refuse(id, Refusal::Hello, &why);
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
        match e.rec.state.kind() {
            // A failed node stays failed for the plan that failed; a
            // draining one keeps draining.
            StateKind::Failed if same_plan => return Ok(Effect::Nothing),
            StateKind::Draining => return Ok(Effect::Nothing),
            StateKind::Ready if done == n => return Ok(Effect::Nothing),
            _ => {}
        }
        if done == n {
            return Ok(self.become_ready(id));
        }
        e.rec.state = NodeState::Provisioning { step: done, of: n };
        Ok(Effect::Nothing)
    }

    /// The one "became ready" transition.
    fn become_ready(&mut self, id: &str) -> Effect {
        let rec = self.set_state(id, NodeState::Ready);
        rec.phase("ready");
        rec.current_step.clear();
        let msg = format!("{id} ready ({}, {} workers)", rec.role, rec.workers);
        self.changed_members.push(id.to_string());
        self.event(msg);
        Effect::Ready
    }

    /// A step report of a provisioning node. Reports about another plan
    /// are ignored.
    fn step(&mut self, id: &str, s: StepReport) -> Result<Effect, Refused> {
        let e = self.nodes.get_mut(id).ok_or_else(|| Refused::UnknownNode(id.to_string()))?;
        if s.plan_id != e.rec.plan_id {
            return Ok(Effect::Nothing); // a report about an older plan
        }
        let NodeState::Provisioning { of, .. } = e.rec.state else { return Ok(Effect::Nothing) };
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
                status: s.status,
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
                    return Ok(self.become_ready(id));
                }
                e.rec.state = NodeState::Provisioning { step: s.index + 1, of };
            }
            StepStatus::Failed => {
                let role = e.rec.role;
                e.rec.state = NodeState::Failed(Failure::Step { step: s.name.clone() });
                e.rec.phase(format!("failed at {}", s.name));
                e.rec.detail =
                    format!("step {} failed (exit {}): {}", s.name, s.exit_code, s.output_tail.trim());
                let msg = format!(
                    "{id} FAILED at step {} (exit {}); see `ddisco-controller status`",
                    s.name, s.exit_code
                );
                e.rec.current_step = s.name.clone();
                self.event(msg);
                self.failed(id, role, &s.name);
            }
        }
        Ok(Effect::Nothing)
    }

    /// Notes a failure (the failure budget counts them).
    fn failed(&mut self, id: &str, role: Role, what: &str) {
        if self.failures.len() == crate::failures::MAX_FAILURES {
            self.failures.pop_front();
        }
        self.failures.push_back(crate::failures::Failure {
            unix_ms: unix_ms(),
            node: id.to_string(),
            role,
            step: what.to_string(),
        });
        self.dirty = true;
    }

    /// A notice from the node's cloud. Recorded once per node; returns what
    /// it concerns when it is new. (Not a state: a noticed node keeps its
    /// state until reconcile replaces it.)
    pub fn on_notice(&mut self, id: &str, kind: Notice, detail: &str) -> Option<Noticed> {
        let e = self.nodes.get_mut(id)?;
        if e.rec.notice.is_some() || e.rec.state.is(StateKind::Terminating) {
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
        if e.rec.state.is(StateKind::Terminating) {
            return Err(Refused::Terminated(id.to_string()));
        }
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
                self.transition(id, NodeEvent::Refuse { refusal: Refusal::Attribute, why: why.clone() })?;
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
        let refusal = Refusal::Unhandled { message: super::untrusted::clean_line(what) };
        let why = super::untrusted::clean_line(&why);
        if let Err(e) = self.transition(id, NodeEvent::Refuse { refusal, why }) {
            tracing::warn!("{e}");
        }
    }

    /// A node that sent what no honest agent sends: failed, with the reason
    /// (its session is refused; it is kept for diagnosis like a failed step).
    fn refuse(&mut self, id: &str, refusal: Refusal, why: &str) -> Effect {
        let failure = Failure::Refused { refused: refusal.clone() };
        let Some(e) = self.nodes.get_mut(id) else { return Effect::Nothing };
        let first = e.rec.state != NodeState::Failed(failure.clone()) || e.rec.detail != why;
        e.rec.state = NodeState::Failed(failure);
        e.rec.phase(format!("failed: invalid {refusal}"));
        e.rec.detail = format!("refused its {refusal}: {why}");
        self.dirty = true;
        self.changed_members.push(id.to_string());
        if first {
            let msg = format!("{id} FAILED: its {refusal} was refused: {why}");
            tracing::warn!("{msg}");
            let role = e.rec.role;
            self.event(msg);
            self.failed(id, role, &refusal.to_string());
        }
        Effect::Nothing
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

    fn drain(&mut self, id: &str) -> Effect {
        let superseded = self.nodes.get(id).is_some_and(|e| e.rec.superseded);
        let why = if superseded { DrainWhy::BackToSpot } else { DrainWhy::ScaleDown };
        self.set_state(id, NodeState::Draining { since_unix_ms: unix_ms(), why, drained: false });
        self.changed_members.push(id.to_string());
        Effect::Nothing
    }

    fn drained(&mut self, id: &str) -> Effect {
        if let Some(e) = self.nodes.get_mut(id)
            && let NodeState::Draining { drained, .. } = &mut e.rec.state
        {
            *drained = true;
            self.dirty = true;
        }
        Effect::Nothing
    }

    fn reterminate(&mut self, id: &str) -> Effect {
        let rec = self.nodes.get_mut(id).map(|e| &mut e.rec).expect("transition checked the node exists");
        if let NodeState::Terminating { sent_unix_ms, .. } = &mut rec.state {
            *sent_unix_ms = unix_ms();
        }
        let target = Target { node_id: Some(id.to_string()), instance_id: rec.instance_id.clone() };
        let msg = format!(
            "{id}: instance {} still running after it was terminated; terminating it again",
            rec.instance_id.as_deref().unwrap_or("?")
        );
        self.dirty = true;
        tracing::warn!("{msg}");
        self.event_once(msg);
        Effect::Terminate { target, loss: false }
    }

    fn terminate(&mut self, id: &str, reason: Reason) -> Effect {
        if reason == Reason::Failed
            && let Some(e) = self.nodes.get(id)
        {
            // What it reported stays readable (status, `logs`).
            let kept = e.rec.clone();
            if self.failed_nodes.len() == super::MAX_FAILED_NODES {
                self.failed_nodes.pop_front();
            }
            self.failed_nodes.push_back(kept);
        }
        let was = {
            let e = &self.nodes[id];
            crate::text::prefix(e.rec.detail.lines().next().unwrap_or(""), 200).to_string()
        };
        let loss = reason.is_loss();
        let describe = reason.describe();
        let state = NodeState::Terminating { sent_unix_ms: unix_ms(), reason: reason.clone() };
        let rec = self.set_state(id, state);
        let role = rec.role;
        rec.phase("terminating");
        rec.detail = describe;
        let target = Target { node_id: Some(id.to_string()), instance_id: rec.instance_id.clone() };
        self.nodes[id].live.revoke();
        self.changed_members.push(id.to_string());
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
            // `destroy` says it once for the cluster.
            (Reason::Destroyed, _) => return Effect::Terminate { target, loss },
            (r, _) => format!("{id} terminated ({})", r.describe()),
        };
        if loss {
            tracing::warn!("{msg}");
        }
        self.event(msg);
        Effect::Terminate { target, loss }
    }

    /// Carries out a reconcile action on the registry (each a transition
    /// but `Launch`); returns what is left for the provider. `drain_secs`
    /// is only for the operator's message.
    pub fn apply(&mut self, action: Action, drain_secs: f64) -> Result<Effect, Refused> {
        match action {
            Action::MarkBooting { id } => self.transition(&id, NodeEvent::Listed),
            Action::Forget { id } => self.transition(&id, NodeEvent::Forget),
            Action::Reterminate { id } => self.transition(&id, NodeEvent::Reterminate),
            Action::Drain { id } => {
                let effect = self.transition(&id, NodeEvent::Drain)?;
                if let Some(NodeState::Draining { why, .. }) = self.nodes.get(&id).map(|e| &e.rec.state) {
                    let why = why.describe();
                    self.event(format!("{id} draining before removal ({why}; up to {drain_secs:.0}s)"));
                }
                Ok(effect)
            }
            Action::Terminate { id, reason } => self.transition(&id, NodeEvent::Terminate(reason)),
            Action::Launch { role, pool, count } => Ok(Effect::Launch { role, pool, count }),
            // The cluster's own actions: `tick` carries them out.
            Action::TerminateOrphan { .. }
            | Action::WarnSpend
            | Action::StopLaunching
            | Action::Destroy { .. }
            | Action::Resize { .. } => Ok(Effect::Nothing),
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
    /// `reconcile::supersede`); `why` prefixes each event. (A mark, not a
    /// state: the node serves as it is until its replacement is ready.)
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

    /// `destroy`: every node is terminating (those already terminating
    /// are asked again) and its session revoked; returns what to terminate.
    pub fn terminate_all(&mut self) -> Vec<Target> {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        let mut targets = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = &self.nodes[&id].rec;
            if rec.state.is(StateKind::Terminating) {
                // Asked before: asked again, its state as it is.
                targets.push(Target { node_id: Some(id.clone()), instance_id: rec.instance_id.clone() });
            } else if let Ok(Effect::Terminate { target, .. }) =
                self.transition(&id, NodeEvent::Terminate(Reason::Destroyed))
            {
                targets.push(target);
            }
        }
        targets
    }

    /// `destroy` finished: forgets every node (all terminating by then).
    pub fn forget_all(&mut self) {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids {
            if self.transition(&id, NodeEvent::Forget).is_err() {
                // Not terminating (a node added since): it goes too.
                self.remove(&id);
            }
        }
        // The next cluster of this state directory starts its own clock.
        self.started_unix_ms = None;
    }
}

/// Shorthands for tests: each is one transition.
#[cfg(test)]
impl Registry {
    pub fn complete_enrollment(&mut self, id: &str, facts: Facts, now_ms: u64, cert_sha256: &str) {
        self.transition(id, NodeEvent::Enrolled { facts, now_ms, cert_sha256 }).expect("enrollment");
    }

    /// Whether the node became ready.
    pub fn on_hello(
        &mut self,
        id: &str,
        hello: Hello,
        workers: u32,
        plan: &Plan,
        keep_identity: bool,
    ) -> Result<bool, Refused> {
        Ok(self.transition(id, NodeEvent::Hello { hello, workers, plan, keep_identity })? == Effect::Ready)
    }

    /// Whether the node became ready.
    pub fn on_step(&mut self, id: &str, report: StepReport) -> Result<bool, Refused> {
        Ok(self.transition(id, NodeEvent::Step(report))? == Effect::Ready)
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

    /// A registry with one node of `role`, just requested.
    fn requested(role: Role) -> (Registry, String) {
        let mut r = Registry::new(BTreeMap::new());
        let new = NewNode {
            role,
            pool: "default".into(),
            batch: None,
            token_hash: "h".into(),
            token_expires_unix_ms: u64::MAX,
        };
        let id = r.add_node(new, |_| String::new());
        (r, id)
    }

    fn registry_with(role: Role) -> (Registry, String) {
        let (mut r, id) = requested(role);
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
            placement: "c5.large on-demand in us-east-1a: cheapest".into(),
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
        assert!(matches!(effect, Ok(Effect::Terminate { loss: true, .. })));
        let e = r.get(&id).unwrap();
        assert!(matches!(e.rec.state, NodeState::Terminating { reason: Reason::BootTimeout, .. }));
        assert!(e.live.is_revoked());
        assert!(r.events().back().unwrap().message.starts_with(&format!("MASTER {id} LOST")));
    }

    /// A registry holding one node in `kind` (reached through transitions,
    /// the only way there), with a plan of 2 steps where it has one.
    fn node_in(kind: StateKind, p: &Plan) -> (Registry, String) {
        let (mut r, id) = requested(Role::Slave);
        let enroll = |r: &mut Registry| r.complete_enrollment(&id, Facts::default(), 1, "fp");
        let hello = |r: &mut Registry| r.on_hello(&id, good(), 1, p, false).unwrap();
        match kind {
            StateKind::Requested => {}
            StateKind::Booting => {
                r.transition(&id, NodeEvent::Listed).unwrap();
            }
            StateKind::Enrolled => enroll(&mut r),
            StateKind::Provisioning => {
                enroll(&mut r);
                hello(&mut r);
            }
            StateKind::Ready | StateKind::Draining => {
                enroll(&mut r);
                hello(&mut r);
                r.on_step(&id, report(p, 0, StepStatus::Succeeded)).unwrap();
                r.on_step(&id, report(p, 1, StepStatus::Succeeded)).unwrap();
                if kind == StateKind::Draining {
                    r.transition(&id, NodeEvent::Drain).unwrap();
                }
            }
            StateKind::Failed => {
                enroll(&mut r);
                hello(&mut r);
                r.on_step(&id, report(p, 0, StepStatus::Failed)).unwrap();
            }
            StateKind::Terminating => {
                enroll(&mut r);
                r.transition(&id, NodeEvent::Terminate(Reason::ScaleDown)).unwrap();
            }
        }
        assert_eq!(r.get(&id).unwrap().rec.state.kind(), kind);
        (r, id)
    }

    /// Every (state, event) pair: the diagram of `NodeState`, and nothing
    /// else. `None`: refused (and nothing changed); `Some(k)`: allowed, the
    /// node then in `k` (`None` inside: forgotten).
    #[test]
    fn every_state_event_pair_follows_the_diagram() {
        use StateKind::*;
        let p = plan(2);
        type MakeEvent = Box<dyn Fn() -> NodeEvent<'static>>;
        let events: Vec<(&str, MakeEvent)> = {
            let p: &'static Plan = Box::leak(Box::new(p.clone()));
            vec![
                ("listed", Box::new(|| NodeEvent::Listed)),
                (
                    "enrolled",
                    Box::new(|| NodeEvent::Enrolled {
                        facts: Facts::default(),
                        now_ms: 1,
                        cert_sha256: "fp",
                    }),
                ),
                ("spent", Box::new(|| NodeEvent::Spent)),
                (
                    "hello",
                    Box::new(move || NodeEvent::Hello {
                        hello: good(),
                        workers: 1,
                        plan: p,
                        keep_identity: false,
                    }),
                ),
                ("step", Box::new(move || NodeEvent::Step(report(p, 0, StepStatus::Running)))),
                ("refuse", Box::new(|| NodeEvent::Refuse { refusal: Refusal::Hello, why: "x".into() })),
                ("drain", Box::new(|| NodeEvent::Drain)),
                ("drained", Box::new(|| NodeEvent::Drained)),
                ("terminate", Box::new(|| NodeEvent::Terminate(Reason::ScaleDown))),
                ("reterminate", Box::new(|| NodeEvent::Reterminate)),
                ("forget", Box::new(|| NodeEvent::Forget)),
            ]
        };
        // The diagram, row by row: (state, event) -> the state after.
        let expected = |state: StateKind, event: &str| -> Option<Option<StateKind>> {
            Some(Some(match (state, event) {
                (Requested, "listed") => Booting,
                (Requested | Booting, "enrolled") => Enrolled,
                (Requested | Booting, "spent") => Enrolled,
                (_, "spent") => state, // already past it
                (Enrolled | Provisioning, "hello") => Provisioning,
                // Likewise a ready node (one that reports its plan done
                // stays ready: `a_hello_with_finished_progress_is_ready_at_once`).
                (Ready, "hello") => Provisioning,
                // The hello reports progress of no plan (a new agent, or
                // a new plan): a failed node starts again (with the plan
                // that failed it stays failed: `a_failed_node_stays_failed_for_its_plan`).
                (Failed, "hello") => Provisioning,
                (Draining, "hello") => Draining,
                (Provisioning, "step") => Provisioning,
                (Enrolled | Ready | Failed | Draining, "step") => state, // stale: ignored
                (Terminating, "refuse") => Terminating,
                (_, "refuse") => Failed,
                (Ready, "drain") => Draining,
                (Draining, "drained") => Draining,
                (Terminating, "reterminate") => Terminating,
                (Terminating | Requested, "forget") => return Some(None),
                (Terminating, "terminate") => return None,
                (_, "terminate") => Terminating,
                _ => return None,
            }))
        };
        let mut checked = 0;
        for state in StateKind::ALL {
            for (name, event) in &events {
                let (mut r, id) = node_in(state, &p);
                let before = r.to_json();
                let result = r.transition(&id, event());
                let after = r.get(&id).map(|e| e.rec.state.kind());
                match expected(state, name) {
                    None => {
                        assert!(result.is_err(), "{state} + {name} must be refused, got {result:?}");
                        assert_eq!(r.to_json(), before, "{state} + {name}: a refusal changed the record");
                    }
                    Some(want) => {
                        assert!(result.is_ok(), "{state} + {name} must be allowed: {result:?}");
                        assert_eq!(after, want, "{state} + {name}");
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, StateKind::ALL.len() * events.len());
    }

    /// A node's hello racing the tick that terminates it (issue 23): in
    /// either order, the node ends terminating and revoked, never back in
    /// provisioning or ready. Both run under the registry's lock, as in the
    /// controller, from two threads, many times.
    #[test]
    fn a_hello_racing_a_terminate_never_revives_the_node() {
        let p = plan(0); // a hello makes the node ready at once
        for _ in 0..200 {
            let (r, id) = node_in(StateKind::Ready, &plan(2));
            let r = std::sync::Arc::new(parking_lot::Mutex::new(r));
            let (r1, id1, p1) = (r.clone(), id.clone(), p.clone());
            let hello = std::thread::spawn(move || {
                let event = NodeEvent::Hello { hello: good(), workers: 1, plan: &p1, keep_identity: false };
                r1.lock().transition(&id1, event)
            });
            let terminated = r.lock().transition(&id, NodeEvent::Terminate(Reason::ScaleDown));
            let said = hello.join().unwrap();
            assert!(matches!(terminated, Ok(Effect::Terminate { .. })), "{terminated:?}");
            let reg = r.lock();
            let e = reg.get(&id).unwrap();
            assert!(
                e.rec.state.is(StateKind::Terminating),
                "revived: {:?} (hello said {said:?})",
                e.rec.state
            );
            assert!(e.live.is_revoked());
            // The hello either came first (and changed nothing that lasts)
            // or was refused for it.
            assert!(matches!(said, Ok(_) | Err(Refused::Terminated(_))), "{said:?}");
        }
        // And after the terminate, a hello is refused and changes nothing.
        let (mut r, id) = node_in(StateKind::Terminating, &p);
        let before = r.to_json();
        let event = NodeEvent::Hello { hello: good(), workers: 1, plan: &p, keep_identity: false };
        assert_eq!(r.transition(&id, event), Err(Refused::Terminated(id.clone())));
        assert_eq!(r.to_json(), before);
    }

    /// Records of an older controller (state data beside the state, step
    /// names for refusals) load into the typed states.
    #[test]
    fn older_state_fields_load_into_the_typed_states() {
        let (r, id) = node_in(StateKind::Ready, &plan(2));
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let node = &mut v["nodes"][0];
        node["state"] = "draining".into();
        node["drain_started_unix_ms"] = 42.into();
        node["terminate_sent_unix_ms"] = serde_json::Value::Null;
        let r2 = Registry::from_json(&v.to_string(), 1).unwrap();
        assert_eq!(
            r2.get(&id).unwrap().rec.state,
            NodeState::Draining { since_unix_ms: 42, why: DrainWhy::ScaleDown, drained: false }
        );
        let node = &mut v["nodes"][0];
        node["state"] = "terminating".into();
        node["terminate_sent_unix_ms"] = 7.into();
        let r3 = Registry::from_json(&v.to_string(), 1).unwrap();
        assert_eq!(
            r3.get(&id).unwrap().rec.state,
            NodeState::Terminating { sent_unix_ms: 7, reason: Reason::Unrecorded }
        );
        let node = &mut v["nodes"][0];
        node["state"] = "failed".into();
        node["step"] = "post_init".into();
        let r4 = Registry::from_json(&v.to_string(), 1).unwrap();
        assert_eq!(
            r4.get(&id).unwrap().rec.state,
            NodeState::Failed(Failure::Step { step: "post_init".into() })
        );
        // The typed forms round-trip.
        for state in [
            NodeState::Failed(Failure::Refused { refused: Refusal::Unhandled { message: "probe".into() } }),
            NodeState::Terminating { sent_unix_ms: 9, reason: Reason::HeartbeatTimeout { silent_ms: 3 } },
            NodeState::Draining { since_unix_ms: 5, why: DrainWhy::BackToSpot, drained: true },
            NodeState::Provisioning { step: 1, of: 3 },
        ] {
            let mut r5 = Registry::from_json(&v.to_string(), 1).unwrap();
            r5.nodes.get_mut(&id).unwrap().rec.state = state.clone();
            let back = Registry::from_json(&r5.to_json(), 1).unwrap();
            assert_eq!(back.get(&id).unwrap().rec.state, state);
        }
    }
}
