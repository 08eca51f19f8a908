//! Every conversion between the generated protobuf types (`api`) and the
//! controller's domain types, in both directions.
//!
//! **API Boundary:** `api::*` types appear only here and in the modules that
//! serve or call gRPC (`grpc`, `admin`, `cli::client`); everything else works
//! on domain types. Input from agents is validated here: a message that does
//! not make sense (an unspecified status or kind) is refused with a
//! [`Status`] that names the field.

use crate::cluster::ops::{Destroyed, Scaled};
use crate::engine::{DirectiveKind, DirectiveSet};
use crate::model::{Notice, Role, StateKind};
use crate::plan::{Assignment, Plan, Step, StepKind};
use crate::registry::untrusted::{clean_line, clean_text};
use crate::registry::{DirectiveReport, Facts, Hello, Outbound, StepReport, StepStatus};
use crate::status::{EventView, NodeCounts, NodeStatus, StatusView, StepView};
use ddisco_proto::v1 as api;
use tonic::Status;

// ---- agents -> controller ----
// Free text from agents loses its control characters here (it is shown on
// terminals); facts and attributes are checked by `untrusted` where they
// are stored.

impl From<api::NodeFacts> for Facts {
    fn from(f: api::NodeFacts) -> Facts {
        Facts {
            instance_id: f.instance_id,
            hostname: f.hostname,
            addresses: f.addresses,
            logical_cores: f.logical_cores,
            memory_bytes: f.memory_bytes,
            agent_version: f.agent_version,
            started_unix_ms: f.started_unix_ms,
            arch: f.arch,
        }
    }
}

impl From<api::Hello> for Hello {
    fn from(h: api::Hello) -> Hello {
        Hello {
            facts: h.facts.unwrap_or_default().into(),
            plan_id: h.plan_id,
            completed_steps: h.completed_steps,
            // The controller's to fill in, never the agent's.
            own_names: vec![],
        }
    }
}

impl TryFrom<api::StepReport> for StepReport {
    type Error = Status;
    fn try_from(s: api::StepReport) -> Result<StepReport, Status> {
        let status = match api::StepStatus::try_from(s.status) {
            Ok(api::StepStatus::Running) => StepStatus::Running,
            Ok(api::StepStatus::Succeeded) => StepStatus::Succeeded,
            Ok(api::StepStatus::Skipped) => StepStatus::Skipped,
            Ok(api::StepStatus::Failed) => StepStatus::Failed,
            Ok(api::StepStatus::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!("step.status: {} is not a status", s.status)));
            }
        };
        Ok(StepReport {
            plan_id: s.plan_id,
            index: s.index,
            name: clean_line(&s.name),
            status,
            duration_ms: s.duration_ms,
            exit_code: s.exit_code,
            output_tail: clean_text(&s.output_tail),
        })
    }
}

/// A notice's kind and detail.
pub fn notice(n: api::Notice) -> Result<(Notice, String), Status> {
    let kind = match api::NoticeKind::try_from(n.kind) {
        Ok(api::NoticeKind::SpotInterruption) => Notice::SpotInterruption,
        Ok(api::NoticeKind::Rebalance) => Notice::Rebalance,
        Ok(api::NoticeKind::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!("notice.kind: {} is not a notice kind", n.kind)));
        }
    };
    Ok((kind, clean_line(&n.detail)))
}

impl From<api::DirectiveReport> for DirectiveReport {
    fn from(d: api::DirectiveReport) -> DirectiveReport {
        DirectiveReport { name: clean_line(&d.name), ok: d.ok, message: clean_text(&d.message) }
    }
}

// ---- controller -> agents ----

/// The typed state on the wire.
fn node_state(k: StateKind) -> api::NodeState {
    match k {
        StateKind::Requested => api::NodeState::Requested,
        StateKind::Booting => api::NodeState::Booting,
        StateKind::Enrolled => api::NodeState::Enrolled,
        StateKind::Provisioning => api::NodeState::Provisioning,
        StateKind::Ready => api::NodeState::Ready,
        StateKind::Failed => api::NodeState::Failed,
        StateKind::Draining => api::NodeState::Draining,
        StateKind::Terminating => api::NodeState::Terminating,
    }
}

/// The CLI's read of a node's state. The CLI and the controller are one
/// binary and the controller always sets the state; a value it does not
/// know (unspecified) reads as `requested`, the state that promises least.
fn from_node_state(v: i32) -> StateKind {
    match api::NodeState::try_from(v) {
        Ok(api::NodeState::Booting) => StateKind::Booting,
        Ok(api::NodeState::Enrolled) => StateKind::Enrolled,
        Ok(api::NodeState::Provisioning) => StateKind::Provisioning,
        Ok(api::NodeState::Ready) => StateKind::Ready,
        Ok(api::NodeState::Failed) => StateKind::Failed,
        Ok(api::NodeState::Draining) => StateKind::Draining,
        Ok(api::NodeState::Terminating) => StateKind::Terminating,
        Ok(api::NodeState::Requested | api::NodeState::Unspecified) | Err(_) => StateKind::Requested,
    }
}

fn step_status(s: StepStatus) -> api::StepStatus {
    match s {
        StepStatus::Running => api::StepStatus::Running,
        StepStatus::Succeeded => api::StepStatus::Succeeded,
        StepStatus::Skipped => api::StepStatus::Skipped,
        StepStatus::Failed => api::StepStatus::Failed,
    }
}

/// Like `from_node_state`: what the controller sends is always set.
fn from_step_status(v: i32) -> StepStatus {
    match api::StepStatus::try_from(v) {
        Ok(api::StepStatus::Succeeded) => StepStatus::Succeeded,
        Ok(api::StepStatus::Skipped) => StepStatus::Skipped,
        Ok(api::StepStatus::Failed) => StepStatus::Failed,
        Ok(api::StepStatus::Running | api::StepStatus::Unspecified) | Err(_) => StepStatus::Running,
    }
}

fn role(r: Role) -> api::Role {
    match r {
        Role::Master => api::Role::Master,
        Role::Slave => api::Role::Slave,
    }
}

impl From<Outbound> for api::ControllerMessage {
    fn from(o: Outbound) -> api::ControllerMessage {
        use api::controller_message::Msg;
        let msg = match o {
            Outbound::Assignment(a) => Msg::Assignment(api::Assignment::from(&*a)),
            Outbound::Directives(d) => Msg::Directives(api::Directives::from(&*d)),
            Outbound::Shutdown(reason) => Msg::Shutdown(api::Shutdown { reason }),
            Outbound::RenewCertificate => Msg::RenewCertificate(api::RenewCertificate {}),
            Outbound::NewCertificate(certificate_pem) => {
                Msg::NewCertificate(api::NewCertificate { certificate_pem })
            }
        };
        api::ControllerMessage { msg: Some(msg) }
    }
}

impl From<&Assignment> for api::Assignment {
    fn from(a: &Assignment) -> api::Assignment {
        api::Assignment {
            node_id: a.node_id.clone(),
            role: role(a.role) as i32,
            workers: a.workers,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            plan: Some((&a.plan).into()),
        }
    }
}

impl From<&Plan> for api::Plan {
    fn from(p: &Plan) -> api::Plan {
        let steps = p
            .steps
            .iter()
            .zip(p.image.iter().chain(std::iter::repeat(&None)))
            .map(|(s, d)| api::Step { image_digest: d.clone().unwrap_or_default(), ..api::Step::from(s) })
            .collect();
        api::Plan { id: p.id.clone(), steps }
    }
}

impl From<&Step> for api::Step {
    fn from(s: &Step) -> api::Step {
        use api::step::Kind;
        let kind = match &s.kind {
            StepKind::SystemPackages { packages, install } => {
                Kind::SystemPackages(api::SystemPackages { packages: packages.clone(), install: *install })
            }
            StepKind::Pip { requirements, venv } => {
                Kind::Pip(api::PipRequirements { requirements: requirements.clone(), venv: venv.clone() })
            }
            StepKind::Scratch { path } => Kind::Scratch(api::Scratch { path: path.clone(), devices: vec![] }),
            StepKind::AuthorizedKeys { path, keys, owner } => Kind::AuthorizedKeys(api::AuthorizedKeys {
                path: path.clone(),
                keys: keys.clone(),
                owner: owner.clone(),
            }),
            StepKind::Shell { script, env } => {
                Kind::Shell(api::Shell { script: script.clone(), env: env.clone().into_iter().collect() })
            }
            StepKind::Collect { attribute, path } => {
                Kind::Collect(api::Collect { attribute: attribute.clone(), path: path.clone() })
            }
            StepKind::PythonEnv { url, sha256, size, venv, python, compiled, requirements } => {
                Kind::PythonEnv(api::PythonEnv {
                    compiled: *compiled,
                    url: url.clone(),
                    sha256: sha256.clone(),
                    venv: venv.clone(),
                    python: python.clone(),
                    requirements: requirements.clone(),
                    size: *size,
                })
            }
            StepKind::Seal { image, generalize } => {
                Kind::Seal(api::Seal { image: image.clone(), generalize: *generalize })
            }
        };
        api::Step { name: s.name.clone(), kind: Some(kind), image_digest: String::new() }
    }
}

impl From<&DirectiveSet> for api::Directives {
    fn from(set: &DirectiveSet) -> api::Directives {
        use api::directive::Kind;
        let items = set
            .items
            .iter()
            .map(|d| api::Directive {
                name: d.name.clone(),
                kind: Some(match &d.kind {
                    DirectiveKind::Service { argv, env, workdir, grace_ms } => Kind::Service(api::Service {
                        argv: argv.clone(),
                        env: env.clone().into_iter().collect(),
                        workdir: workdir.clone(),
                        grace_ms: *grace_ms,
                    }),
                    DirectiveKind::File { path, content, mode, owner, marker } => {
                        Kind::File(api::ManagedFile {
                            path: path.clone(),
                            content: content.clone(),
                            mode: *mode,
                            owner: owner.clone(),
                            marker: marker.clone(),
                        })
                    }
                    DirectiveKind::Post { url, body, content_type } => Kind::Post(api::Post {
                        url: url.clone(),
                        body: body.clone(),
                        content_type: content_type.clone(),
                    }),
                    DirectiveKind::Probe { url } => Kind::Probe(api::Probe { url: url.clone() }),
                }),
            })
            .collect();
        api::Directives { id: set.id.clone(), items }
    }
}

// ---- admin API: the server's side and the CLI's side ----

impl From<StatusView> for api::StatusReply {
    fn from(v: StatusView) -> api::StatusReply {
        api::StatusReply {
            cluster: v.cluster,
            cluster_id: v.cluster_id,
            provider: v.provider,
            desired_slaves: v.desired_slaves,
            nodes: v.nodes.into_iter().map(api::NodeStatus::from).collect(),
            failed_nodes: v.failed_nodes.into_iter().map(api::NodeStatus::from).collect(),
            notes: v.events,
            desired_pools: v.desired_pools.into_iter().collect(),
            provider_notes: v.provider_notes,
            controller_notes: v.controller_notes,
            counts: Some(api::NodeCounts {
                nodes: v.counts.nodes,
                ready: v.counts.ready,
                masters: v.counts.masters,
                failed: v.counts.failed,
            }),
            engine: v.engine,
            engine_endpoints: v.engine_endpoints.into_iter().collect(),
            engine_lines: v.engine_lines,
            events: v
                .timed_events
                .into_iter()
                .map(|e| api::Event { unix_ms: e.unix_ms, message: e.message })
                .collect(),
            cost_per_hour: v.cost_per_hour,
            spent_usd: v.spent_usd,
            provider_facts: v.provider_facts,
        }
    }
}

impl From<NodeStatus> for api::NodeStatus {
    fn from(n: NodeStatus) -> api::NodeStatus {
        api::NodeStatus {
            node_id: n.node_id,
            role: role(n.role) as i32,
            state: node_state(n.state) as i32,
            progress: n.progress.map(|(step, of)| api::Progress { step, of }),
            instance_id: n.instance_id,
            address: n.address,
            hostname: n.hostname,
            cores: n.cores,
            workers: n.workers,
            last_heartbeat_ms: n.last_heartbeat_ms,
            current_step: n.current_step,
            detail: n.detail,
            age_ms: n.age_ms,
            connected: n.connected,
            pool: n.pool,
            instance_type: n.instance_type,
            notice: n.notice,
            phases: n.phases.into_iter().map(|(name, unix_ms)| api::Phase { name, unix_ms }).collect(),
            steps: n
                .steps
                .into_iter()
                .map(|l| api::StepLog {
                    name: l.name,
                    status: step_status(l.status) as i32,
                    exit_code: l.exit_code,
                    duration_ms: l.duration_ms,
                    output_tail: l.output_tail,
                })
                .collect(),
            stuck: n.stuck,
            price_per_hour: n.price_per_hour,
            placement: n.placement,
        }
    }
}

impl From<api::StatusReply> for StatusView {
    fn from(s: api::StatusReply) -> StatusView {
        StatusView {
            cluster: s.cluster,
            cluster_id: s.cluster_id,
            provider: s.provider,
            desired_slaves: s.desired_slaves,
            desired_pools: s.desired_pools.into_iter().collect(),
            provider_notes: s.provider_notes,
            controller_notes: s.controller_notes,
            counts: s
                .counts
                .map(|c| NodeCounts { nodes: c.nodes, ready: c.ready, masters: c.masters, failed: c.failed })
                .unwrap_or_default(),
            provider_facts: s.provider_facts,
            engine: s.engine,
            engine_endpoints: s.engine_endpoints.into_iter().collect(),
            engine_lines: s.engine_lines,
            cost_per_hour: s.cost_per_hour,
            spent_usd: s.spent_usd,
            timed_events: s
                .events
                .into_iter()
                .map(|e| EventView { unix_ms: e.unix_ms, message: e.message })
                .collect(),
            nodes: s.nodes.into_iter().map(NodeStatus::from).collect(),
            failed_nodes: s.failed_nodes.into_iter().map(NodeStatus::from).collect(),
            events: s.notes,
        }
    }
}

impl From<api::NodeStatus> for NodeStatus {
    fn from(n: api::NodeStatus) -> NodeStatus {
        NodeStatus {
            role: if n.role == api::Role::Master as i32 { Role::Master } else { Role::Slave },
            node_id: n.node_id,
            state: from_node_state(n.state),
            progress: n.progress.map(|p| (p.step, p.of)),
            instance_id: n.instance_id,
            address: n.address,
            hostname: n.hostname,
            cores: n.cores,
            workers: n.workers,
            last_heartbeat_ms: n.last_heartbeat_ms,
            current_step: n.current_step,
            detail: n.detail,
            age_ms: n.age_ms,
            connected: n.connected,
            pool: n.pool,
            instance_type: n.instance_type,
            notice: n.notice,
            phases: n.phases.into_iter().map(|p| (p.name, p.unix_ms)).collect(),
            steps: n
                .steps
                .into_iter()
                .map(|l| StepView {
                    name: l.name,
                    status: from_step_status(l.status),
                    exit_code: l.exit_code,
                    duration_ms: l.duration_ms,
                    output_tail: l.output_tail,
                })
                .collect(),
            stuck: n.stuck,
            price_per_hour: n.price_per_hour,
            placement: n.placement,
        }
    }
}

impl From<Scaled> for api::ScaleReply {
    fn from(s: Scaled) -> api::ScaleReply {
        api::ScaleReply { previous: s.previous, desired: s.desired, pools: s.pools.into_iter().collect() }
    }
}

impl From<api::ScaleReply> for Scaled {
    fn from(s: api::ScaleReply) -> Scaled {
        Scaled { previous: s.previous, desired: s.desired, pools: s.pools.into_iter().collect() }
    }
}

impl From<Destroyed> for api::DestroyReply {
    fn from(d: Destroyed) -> api::DestroyReply {
        api::DestroyReply { terminated: d.terminated, spent_usd: d.spent_usd }
    }
}

impl From<api::DestroyReply> for Destroyed {
    fn from(d: api::DestroyReply) -> Destroyed {
        Destroyed { terminated: d.terminated, spent_usd: d.spent_usd }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_survives_the_wire() {
        let mut view = StatusView {
            cluster: "c".into(),
            cluster_id: "c-0123456789ab".into(),
            provider: "local".into(),
            desired_slaves: 2,
            desired_pools: [("default".to_string(), 2)].into(),
            nodes: vec![NodeStatus {
                node_id: "master-0001".into(),
                role: Role::Master,
                state: StateKind::Ready,
                progress: None,
                instance_id: "i-1".into(),
                address: "10.0.0.1".into(),
                hostname: "h".into(),
                cores: 4,
                workers: 4,
                last_heartbeat_ms: Some(10),
                current_step: String::new(),
                detail: "d".into(),
                age_ms: 5,
                connected: true,
                pool: "master".into(),
                instance_type: "c5.large on-demand".into(),
                notice: "spot-interruption".into(),
                phases: vec![("requested".into(), 1)],
                steps: vec![StepView {
                    name: "s".into(),
                    status: StepStatus::Succeeded,
                    exit_code: 0,
                    duration_ms: 3,
                    output_tail: "ok".into(),
                }],
                stuck: String::new(),
                price_per_hour: 0.5,
                placement: "c5.large on-demand in us-east-1a: master_on_demand".into(),
            }],
            events: vec!["e".into()],
            provider_notes: vec!["n".into()],
            controller_notes: vec!["c".into()],
            counts: NodeCounts { nodes: 1, ready: 1, masters: 1, failed: vec![] },
            provider_facts: vec!["f".into()],
            engine: "dask".into(),
            engine_endpoints: [("scheduler".to_string(), "tls://x".to_string())].into(),
            engine_lines: vec!["l".into()],
            timed_events: vec![EventView { unix_ms: 1, message: "e".into() }],
            cost_per_hour: 0.5,
            spent_usd: 1.5,
            failed_nodes: vec![],
        };
        let mut gone = view.nodes[0].clone();
        gone.node_id = "slave-0002".into();
        gone.state = StateKind::Failed;
        let mut provisioning = view.nodes[0].clone();
        provisioning.node_id = "slave-0003".into();
        provisioning.state = StateKind::Provisioning;
        provisioning.progress = Some((1, 4));
        view.nodes.push(provisioning);
        view.failed_nodes.push(gone);
        assert_eq!(StatusView::from(api::StatusReply::from(view.clone())), view);
    }

    #[test]
    fn unspecified_enums_from_agents_are_refused_by_field() {
        let s = api::StepReport { status: 0, ..Default::default() };
        let e = StepReport::try_from(s).unwrap_err();
        assert!(e.message().starts_with("step.status"), "{e:?}");
        let e = notice(api::Notice { kind: 42, detail: String::new() }).unwrap_err();
        assert!(e.message().starts_with("notice.kind"), "{e:?}");
    }
}
