//! The agents' side of the control plane: `Enrollment` (token-authenticated)
//! and `Agent` (mutual TLS), served on one TLS port.
//!
//! **API Boundary:** protobuf types are converted to domain types here and go
//! no further.
//!
//! # Guarantees
//! - `Session` refuses a caller without a client certificate signed by the
//!   cluster CA (rustls checks the chain), or whose node is unknown or being
//!   terminated. A refusal is logged and changes no state.
//! - Heartbeats take no lock: two atomic stores per message (last seen, load).

use crate::controller::Shared;
use crate::model::{NodeState, Role, worker_count};
use crate::pki;
use crate::registry::{Facts, TokenError, unix_ms};
use ddisco_proto::v1 as api;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct EnrollmentService {
    pub shared: Arc<Shared>,
}

pub struct AgentService {
    pub shared: Arc<Shared>,
}

fn facts_from(f: Option<api::NodeFacts>) -> Facts {
    let f = f.unwrap_or_default();
    Facts {
        instance_id: f.instance_id,
        hostname: f.hostname,
        addresses: f.addresses,
        logical_cores: f.logical_cores,
        memory_bytes: f.memory_bytes,
        agent_version: f.agent_version,
        started_unix_ms: f.started_unix_ms,
    }
}

fn peer(req: &Request<impl Sized>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown peer".into())
}

#[tonic::async_trait]
impl api::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        req: Request<api::EnrollRequest>,
    ) -> Result<Response<api::EnrollResponse>, Status> {
        let from = peer(&req);
        let r = req.into_inner();
        if r.token.len() < 32 {
            tracing::warn!(%from, "enrollment refused: token missing or too short");
            return Err(Status::invalid_argument("token: missing or too short"));
        }
        let hash = pki::token_hash(&r.token);
        let sh = &self.shared;
        let node_id = {
            let reg = sh.registry.lock().expect("registry lock");
            reg.check_token(&hash, unix_ms())
        };
        let node_id = match node_id {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%from, "enrollment refused: {e}");
                sh.metrics_refusal();
                return Err(match e {
                    TokenError::Unknown | TokenError::Expired(_) => Status::unauthenticated(e.to_string()),
                    TokenError::Used(_) | TokenError::Terminated(_) => {
                        Status::permission_denied(e.to_string())
                    }
                });
            }
        };
        // Signing is CPU work; it happens outside the registry lock.
        let cert = sh
            .pki
            .sign_node(&node_id, &r.csr_pem, sh.cert_validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let facts = facts_from(r.facts);
        {
            let mut reg = sh.registry.lock().expect("registry lock");
            // Re-check: a concurrent enrollment with the same token loses.
            if let Err(e) = reg.check_token(&hash, unix_ms()) {
                tracing::warn!(%from, "enrollment refused: {e}");
                sh.metrics_refusal();
                return Err(Status::permission_denied(e.to_string()));
            }
            // Tokens of one launch call share a userdata: each is also bound
            // to the instance the launch returned for its slot.
            if sh.provider.attests_instance_id() {
                let recorded = reg.get(&node_id).and_then(|e| e.rec.instance_id.clone());
                let claimed = &facts.instance_id;
                let mismatch = match &recorded {
                    Some(rec) => rec != claimed,
                    None => claimed.is_empty(),
                };
                if mismatch {
                    let msg = format!(
                        "bootstrap token of node {node_id} is bound to instance {}, not {:?}",
                        recorded.as_deref().unwrap_or("(unknown)"),
                        claimed
                    );
                    tracing::warn!(%from, "enrollment refused: {msg}");
                    return Err(Status::permission_denied(msg));
                }
            }
            reg.complete_enrollment(&node_id, facts, sh.clock.now_ms());
            crate::metrics::Metrics::inc(&sh.metrics.enrollments);
            reg.event(format!("{node_id} enrolled from {from}"));
        }
        sh.changed();
        Ok(Response::new(api::EnrollResponse { node_id, certificate_pem: cert }))
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<api::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl api::agent_server::Agent for AgentService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<api::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let from = peer(&req);
        let Some(certs) = req.peer_certs().filter(|c| !c.is_empty()) else {
            tracing::warn!(%from, "session refused: no client certificate");
            self.shared.metrics_refusal();
            return Err(Status::unauthenticated(
                "client certificate required: enroll with a bootstrap token first",
            ));
        };
        let Some(node_id) = pki::node_id_of(&certs[0]) else {
            tracing::warn!(%from, "session refused: certificate without a node id");
            return Err(Status::unauthenticated("client certificate names no node"));
        };
        let sh = self.shared.clone();
        let live = {
            let reg = sh.registry.lock().expect("registry lock");
            match reg.get(&node_id) {
                Some(e) if !matches!(e.rec.state, NodeState::Terminating) && !e.live.is_revoked() => {
                    e.live.clone()
                }
                _ => {
                    tracing::warn!(%from, node = %node_id, "session refused: node unknown or terminated");
                    return Err(Status::permission_denied(format!(
                        "node {node_id} is not part of this cluster (terminated or replaced)"
                    )));
                }
            }
        };
        live.touch(sh.clock.now_ms());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<api::ControllerMessage, Status>>(8);
        live.set_push(tx.clone());
        let mut inbound = req.into_inner();
        let mut shutdown = sh.shutdown_signal();
        tokio::spawn(async move {
            let _open = live.session();
            loop {
                // End the stream when the controller stops, so the agent
                // reconnects (to this controller once restarted).
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(Ok(msg)) = msg else { break };
                if live.is_revoked() {
                    let _ = tx
                        .send(Ok(api::ControllerMessage {
                            msg: Some(api::controller_message::Msg::Shutdown(api::Shutdown {
                                reason: "node terminated by the controller".into(),
                            })),
                        }))
                        .await;
                    break;
                }
                live.touch(sh.clock.now_ms());
                match msg.msg {
                    Some(api::agent_message::Msg::Heartbeat(h)) => {
                        live.set_load(h.load_milli);
                        crate::metrics::Metrics::inc(&sh.metrics.heartbeats);
                    }
                    None => {}
                    Some(api::agent_message::Msg::Hello(h)) => {
                        let assignment = on_hello(&sh, &node_id, h);
                        sh.changed();
                        // The new session gets the node's directives.
                        sh.membership_changed();
                        let msg = api::ControllerMessage {
                            msg: Some(api::controller_message::Msg::Assignment(assignment)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                    }
                    Some(api::agent_message::Msg::Notice(n)) => {
                        on_notice(&sh, &node_id, n);
                        sh.changed();
                        sh.wake.notify_one();
                    }
                    Some(api::agent_message::Msg::Step(s)) => {
                        if on_step(&sh, &node_id, s) {
                            sh.membership_changed();
                        }
                        sh.changed();
                    }
                    Some(api::agent_message::Msg::Attribute(a)) => {
                        on_attribute(&sh, &node_id, a);
                        sh.changed();
                        sh.membership_changed();
                    }
                    Some(api::agent_message::Msg::Directive(d)) => on_directive_report(&sh, &node_id, d),
                }
            }
            live.clear_push(&tx);
            tracing::debug!(node = %node_id, "session ended");
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}

/// An agent said hello: record its facts, compute its worker count and plan.
fn on_hello(sh: &Shared, node_id: &str, h: api::Hello) -> api::Assignment {
    let facts = facts_from(h.facts);
    let mut reg = sh.registry.lock().expect("registry lock");
    let Some(e) = reg.get_mut(node_id) else {
        return api::Assignment::default();
    };
    let role = e.rec.role;
    let multiplier = match role {
        Role::Master => sh.cfg.master_multiplier,
        Role::Slave => sh.cfg.slave_multiplier,
    };
    let workers = worker_count(facts.logical_cores, multiplier);
    let plan = crate::plan::build(&sh.cfg, role, workers, &sh.provider.layout(node_id), sh.engine.as_ref());
    let n = plan.steps.len() as u32;
    e.rec.workers = workers;
    e.rec.plan_id = plan.id.clone();
    if e.rec.instance_id.is_none() && !facts.instance_id.is_empty() {
        e.rec.instance_id = Some(facts.instance_id.clone());
    }
    e.rec.facts = Some(facts);
    let done = if h.plan_id == plan.id { h.completed_steps.min(n) } else { 0 };
    let was = e.rec.state.clone();
    if !matches!(was, NodeState::Failed { .. }) || h.plan_id != plan.id {
        e.rec.state =
            if done == n { NodeState::Ready } else { NodeState::Provisioning { step: done, of: n } };
    }
    let became_ready = e.rec.state == NodeState::Ready && was != NodeState::Ready;
    if became_ready {
        e.rec.phase("ready");
        e.rec.current_step.clear();
        reg.event(format!("{node_id} ready ({role}, {workers} workers)"));
    }
    api::Assignment {
        node_id: node_id.to_string(),
        role: match role {
            Role::Master => api::Role::Master,
            Role::Slave => api::Role::Slave,
        } as i32,
        workers,
        heartbeat_interval_ms: sh.cfg.heartbeat_interval.as_millis() as u32,
        plan: Some((&plan).into()),
    }
}

/// An agent relayed a notice from its cloud (spot interruption, rebalance).
fn on_notice(sh: &Shared, node_id: &str, n: api::Notice) {
    let kind = match api::NoticeKind::try_from(n.kind) {
        Ok(api::NoticeKind::SpotInterruption) => "spot-interruption",
        Ok(api::NoticeKind::Rebalance) => "rebalance-recommendation",
        _ => return,
    };
    let mut reg = sh.registry.lock().expect("registry lock");
    let Some(e) = reg.get_mut(node_id) else { return };
    if !e.rec.notice.is_empty() {
        return;
    }
    e.rec.notice = kind.to_string();
    if kind == "spot-interruption" && !e.rec.instance_type.ends_with(" on-demand") {
        sh.provider.interrupted(e.rec.role, &e.rec.pool, node_id);
    }
    crate::metrics::Metrics::inc(&sh.metrics.notices);
    let msg = format!("{node_id}: {kind} notice ({}); launching its replacement now", n.detail.trim());
    tracing::warn!("{msg}");
    reg.event(msg);
}

/// The largest attribute accepted (public keys are well under this).
const MAX_ATTRIBUTE: usize = 16 * 1024;

/// An agent sent a value its plan collected (e.g. a public key).
fn on_attribute(sh: &Shared, node_id: &str, a: api::Attribute) {
    if a.name.is_empty() || a.value.len() > MAX_ATTRIBUTE {
        tracing::warn!(node = %node_id, "attribute {:?} refused (empty name or over 16 KiB)", a.name);
        return;
    }
    let mut reg = sh.registry.lock().expect("registry lock");
    if let Some(e) = reg.get_mut(node_id) {
        e.rec.attributes.insert(a.name, a.value);
    }
}

/// An agent reported how applying a directive went.
fn on_directive_report(sh: &Shared, node_id: &str, d: api::DirectiveReport) {
    let mut reg = sh.registry.lock().expect("registry lock");
    let Some(e) = reg.get_mut(node_id) else { return };
    let detail = if d.ok { String::new() } else { format!("engine: {}: {}", d.name, d.message) };
    if e.rec.engine_detail != detail {
        e.rec.engine_detail = detail.clone();
        if !detail.is_empty() {
            let msg = format!("{node_id} {detail}");
            reg.event_once(msg);
        }
    }
}

/// An agent reported a step. Returns whether the node became ready.
fn on_step(sh: &Shared, node_id: &str, s: api::StepReport) -> bool {
    let status = api::StepStatus::try_from(s.status).unwrap_or(api::StepStatus::Unspecified);
    let mut reg = sh.registry.lock().expect("registry lock");
    let Some(e) = reg.get_mut(node_id) else { return false };
    if s.plan_id != e.rec.plan_id {
        return false; // a report about an older plan
    }
    let of = match e.rec.state {
        NodeState::Provisioning { of, .. } => of,
        _ => return false,
    };
    let mut event = None;
    if status != api::StepStatus::Running {
        let log = crate::registry::StepLog {
            status: format!("{status:?}").to_lowercase(),
            exit_code: s.exit_code,
            duration_ms: s.duration_ms,
            output_tail: s.output_tail.clone(),
        };
        e.rec.steps.insert(s.name.clone(), log);
    }
    match status {
        api::StepStatus::Running => {
            e.rec.phase(format!("step {}", s.name));
            e.rec.state = NodeState::Provisioning { step: s.index, of };
            e.rec.current_step = s.name.clone();
        }
        api::StepStatus::Succeeded | api::StepStatus::Skipped => {
            tracing::info!(node = %node_id, step = %s.name, ms = s.duration_ms, "step succeeded");
            if s.index + 1 >= of {
                e.rec.state = NodeState::Ready;
                e.rec.phase("ready");
                e.rec.current_step.clear();
                event = Some(format!("{node_id} ready ({}, {} workers)", e.rec.role, e.rec.workers));
            } else {
                e.rec.state = NodeState::Provisioning { step: s.index + 1, of };
            }
        }
        api::StepStatus::Failed => {
            e.rec.state = NodeState::Failed { step: s.name.clone() };
            e.rec.phase(format!("failed at {}", s.name));
            e.rec.current_step = s.name.clone();
            e.rec.detail = format!("step {} failed (exit {}): {}", s.name, s.exit_code, s.output_tail.trim());
            event = Some(format!(
                "{node_id} FAILED at step {} (exit {}); see `ddisco-controller status`",
                s.name, s.exit_code
            ));
        }
        api::StepStatus::Unspecified => {}
    }
    let ready = e.rec.state == NodeState::Ready;
    if let Some(ev) = event {
        reg.event(ev);
    }
    ready
}
