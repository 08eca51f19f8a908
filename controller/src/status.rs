//! The cluster's status as one plain value, [`StatusView`]: built from the
//! cluster by [`StatusView::of`], served by the admin API (through `wire`)
//! and the dashboard's JSON API, rendered by the CLI. It depends on neither
//! of them.

use crate::cluster::Cluster;
use crate::config::Config;
use crate::model::{Market, NodeState, Role, StateKind, StepStatus};
use crate::registry::{NodeRecord, unix_ms};
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusView {
    pub cluster: String,
    /// The cluster's id (`state::cluster_id`), on everything it launched.
    pub cluster_id: String,
    pub provider: String,
    pub desired_slaves: u32,
    pub desired_pools: std::collections::BTreeMap<String, u32>,
    pub nodes: Vec<NodeStatus>,
    /// Failed nodes already terminated (the newest 16): what they reported.
    pub failed_nodes: Vec<NodeStatus>,
    pub events: Vec<String>,
    pub provider_notes: Vec<String>,
    /// Conditions of the controller itself (its open-file limit).
    pub controller_notes: Vec<String>,
    /// Counts over every node (also in a brief status, which has no nodes).
    pub counts: NodeCounts,
    /// What the provider launches with (image per architecture).
    pub provider_facts: Vec<String>,
    pub engine: String,
    pub engine_endpoints: std::collections::BTreeMap<String, String>,
    pub engine_lines: Vec<String>,
    /// Recent events with their times.
    pub timed_events: Vec<EventView>,
    /// USD per hour of the nodes present now.
    pub cost_per_hour: f64,
    /// USD spent since the cluster was created.
    pub spent_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub unix_ms: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub role: Role,
    pub state: StateKind,
    /// (step, of steps), 0-based, while provisioning.
    pub progress: Option<(u32, u32)>,
    pub instance_id: String,
    pub address: String,
    pub hostname: String,
    pub cores: u32,
    pub workers: u32,
    pub last_heartbeat_ms: Option<u64>,
    pub current_step: String,
    pub detail: String,
    pub age_ms: u64,
    pub connected: bool,
    pub pool: String,
    pub instance_type: String,
    pub notice: String,
    /// (phase, unix ms it began).
    pub phases: Vec<(String, u64)>,
    pub steps: Vec<StepView>,
    pub stuck: String,
    pub price_per_hour: f64,
    /// Where it landed and why there.
    pub placement: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepView {
    pub name: String,
    pub status: StepStatus,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub output_tail: String,
}

/// Counts over every node.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeCounts {
    pub nodes: u32,
    pub ready: u32,
    pub masters: u32,
    /// Ids of failed nodes.
    pub failed: Vec<String>,
}

impl NodeStatus {
    /// The state as status shows it ("provisioning 2/5").
    pub fn label(&self) -> String {
        match self.progress {
            Some((step, of)) => format!("{} {}/{of}", self.state, step + 1),
            None => self.state.to_string(),
        }
    }
}

impl StatusView {
    /// What the cluster looks like now.
    pub fn of(sh: &Cluster) -> StatusView {
        StatusView::build(sh, false)
    }

    /// Without the node list: O(N) counting, no per-node strings.
    pub fn brief(sh: &Cluster) -> StatusView {
        StatusView::build(sh, true)
    }

    fn build(sh: &Cluster, brief: bool) -> StatusView {
        let members = sh.members();
        let engine_endpoints = sh.engine.endpoints(&members);
        let engine_lines = sh.engine.lines(&members);
        let now = sh.clock.now_ms();
        let now_unix = unix_ms();
        // Read before the registry's lock is taken below (the lock order
        // is the registry's, then the policies': never the other way).
        let (adaptive, idle_since) = {
            let p = sh.policies.lock();
            (p.adaptive.clone(), p.idle_since_ms)
        };
        let adaptive_note = sh.registry.lock().adaptive_bounds().map(|(min, max)| {
            let target = adaptive.target_slaves.map_or("none yet".to_string(), |t| format!("{t} slaves"));
            format!("adaptive: {min}..{max} slaves; engine target {target}; {}", adaptive.why)
        });
        let own_notes = sh.notes();
        let reg = sh.registry.lock();
        let mut counts = NodeCounts::default();
        for e in reg.entries() {
            counts.nodes += 1;
            counts.ready += u32::from(e.rec.state().is(crate::model::StateKind::Ready));
            counts.masters += u32::from(e.rec.role == Role::Master);
            if e.rec.state().is(crate::model::StateKind::Failed) {
                counts.failed.push(e.rec.id.clone());
            }
        }
        let nodes = reg
            .entries()
            .filter(|_| !brief)
            .map(|e| node_status(&e.rec, Some(&e.live), now, now_unix, &sh.cfg))
            .collect();
        let failed_nodes = reg
            .failed_nodes()
            .filter(|_| !brief)
            .map(|r| node_status(r, None, now, now_unix, &sh.cfg))
            .collect();
        let events = reg.events();
        StatusView {
            cluster: sh.cfg.tag_key.clone(),
            cluster_id: sh.cluster_id.clone(),
            provider: sh.provider.name().to_string(),
            desired_slaves: reg.desired_slaves(),
            desired_pools: reg.desired.clone(),
            nodes,
            failed_nodes,
            events: events
                .iter()
                .skip(events.len().saturating_sub(RECENT_EVENTS))
                .map(|e| e.message.clone())
                .collect(),
            provider_notes: sh.provider.notes(),
            controller_notes: crate::limits::fd_warning(sh.fd_limit, reg.desired_slaves() + 1)
                .into_iter()
                .chain(crate::budget::note(reg.spent_usd, sh.cfg.max_spend_usd, sh.cfg.on_budget))
                .chain((reg.unpriced() > 0).then(|| {
                    format!(
                        "{} node(s) unpriced (EC2's price list gave no price: pricing:GetProducts?): counted at the \
                         highest price known, against max_spend_usd too",
                        reg.unpriced()
                    )
                }))
                .chain(adaptive_note)
                .chain(crate::autostop::note(idle_since, unix_ms(), sh.cfg.autostop_idle.as_millis() as u64))
                .chain(own_notes)
                .collect(),
            counts,
            provider_facts: sh.provider.facts(),
            engine: sh.engine.name().to_string(),
            engine_endpoints,
            engine_lines,
            timed_events: events
                .iter()
                .map(|e| EventView { unix_ms: e.unix_ms, message: e.message.clone() })
                .collect(),
            cost_per_hour: reg.cost_per_hour(),
            spent_usd: reg.spent_usd,
        }
    }
}

/// One node as status shows it; `live`: its liveness, for a node still in
/// the registry (a terminated failed node has none).
fn node_status(
    r: &NodeRecord,
    live: Option<&crate::registry::Liveness>,
    now: u64,
    now_unix: u64,
    cfg: &Config,
) -> NodeStatus {
    let facts = r.facts.clone().unwrap_or_default();
    NodeStatus {
        node_id: r.id.clone(),
        role: r.role,
        state: r.state().kind(),
        progress: match r.state() {
            NodeState::Provisioning { step, of } => Some((*step, *of)),
            _ => None,
        },
        instance_id: r.instance_id.clone().unwrap_or_default(),
        address: r.address().to_string(),
        hostname: facts.hostname,
        cores: facts.logical_cores,
        workers: r.workers,
        last_heartbeat_ms: if r.state().is_enrolled() {
            live.and_then(|l| l.last_seen_ms()).map(|t| now.saturating_sub(t))
        } else {
            None
        },
        current_step: match r.state() {
            NodeState::Provisioning { .. } | NodeState::Failed(_) => r.current_step.clone(),
            _ => String::new(),
        },
        detail: {
            let engine = r.engine_detail();
            match (r.detail.is_empty(), engine.is_empty()) {
                (_, true) => r.detail.clone(),
                (true, false) => engine,
                (false, false) => format!("{}; {}", r.detail, engine),
            }
        },
        age_ms: now_unix.saturating_sub(r.launched_unix_ms),
        connected: live.is_some_and(|l| l.connected()),
        pool: r.pool.clone(),
        instance_type: match (r.instance_type.is_empty(), r.market) {
            (false, Market::OnDemand) => format!("{} on-demand", r.instance_type),
            _ => r.instance_type.clone(),
        },
        notice: r.notice.map(|n| n.label().to_string()).unwrap_or_default(),
        phases: r.phases.clone(),
        steps: r
            .steps
            .iter()
            .map(|(name, l)| StepView {
                name: name.clone(),
                status: l.status,
                exit_code: l.exit_code,
                duration_ms: l.duration_ms,
                output_tail: l.output_tail.clone(),
            })
            .collect(),
        stuck: stuck(r, now_unix, cfg),
        price_per_hour: r.price_per_hour,
        placement: r.placement.clone(),
    }
}

/// Events shown in the status table (all are in `timed_events`).
pub const RECENT_EVENTS: usize = 10;

/// How long a plan step may run before it is flagged.
const STEP_EXPECTED_MS: u64 = 15 * 60 * 1000;

/// Names the phase a node has been in for longer than expected, if any.
fn stuck(r: &NodeRecord, now_unix: u64, cfg: &Config) -> String {
    let since = r.phases.last().map(|(_, t)| now_unix.saturating_sub(*t)).unwrap_or(0);
    let boot = cfg.boot_timeout.as_millis() as u64;
    match r.state() {
        NodeState::Requested | NodeState::Booting if since > boot / 2 => format!(
            "stuck in {} for {:.0}s: its agent has not enrolled (replaced after {:.0}s); see its console",
            r.state().label(),
            since as f64 / 1000.0,
            boot as f64 / 1000.0
        ),
        NodeState::Enrolled if since > 60_000 => {
            format!("enrolled {:.0}s ago but has not started its plan", since as f64 / 1000.0)
        }
        NodeState::Provisioning { .. } if since > STEP_EXPECTED_MS => format!(
            "step {} running for {:.0} min (expected under {} min)",
            r.current_step,
            since as f64 / 60_000.0,
            STEP_EXPECTED_MS / 60_000
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewNode, Registry};

    #[test]
    fn stuck_names_the_phase() {
        let cfg =
            crate::config::Config { boot_timeout: std::time::Duration::from_secs(600), ..Default::default() };
        let mut reg = Registry::new(Default::default());
        let new = NewNode {
            role: crate::model::Role::Slave,
            pool: "default".into(),
            batch: None,
            token_hash: "h".into(),
            token_expires_unix_ms: 0,
        };
        let id = reg.add_node(new, |_| String::new());
        let rec = &mut reg.get_mut(&id).unwrap().rec;
        let t0 = rec.phases[0].1;
        rec.set_state_for_test(NodeState::Booting);
        assert_eq!(stuck(rec, t0 + 200_000, &cfg), "");
        assert!(
            stuck(rec, t0 + 400_000, &cfg).starts_with("stuck in booting for 400s"),
            "{}",
            stuck(rec, t0 + 400_000, &cfg)
        );
        rec.set_state_for_test(NodeState::Provisioning { step: 1, of: 3 });
        rec.current_step = "pip_requirements".into();
        rec.phases.push(("step pip_requirements".into(), t0));
        assert!(stuck(rec, t0 + 16 * 60_000, &cfg).starts_with("step pip_requirements running for 16 min"));
        rec.set_state_for_test(NodeState::Ready);
        assert_eq!(stuck(rec, t0 + 3_600_000, &cfg), "");
    }
}
