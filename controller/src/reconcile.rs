//! The decision function of the reconcile loop: plain data in, actions out.
//!
//! # Expected flow
//! Every tick the controller builds a [`NodeView`] per node from its registry
//! and the provider's listing, calls [`decide`], and carries the actions out.
//! `decide` does not care why it was called; calling it twice on the same
//! input gives the same actions, and actions already applied (a node moved to
//! `Terminating`, a launch recorded as `Requested`) are not repeated.
//!
//! # Guarantees
//! - Exactly one master is wanted; a missing one is launched at once, in the
//!   same tick as any missing slaves (no waiting for the master).
//! - Surplus slaves are removed least-useful first: failed, then not yet
//!   enrolled, then provisioning, then ready; newest first within a group.
//! - A node whose instance is gone, that misses the boot deadline, or that is
//!   silent for the heartbeat timeout is terminated and, being no longer
//!   counted, replaced in the same tick.
//! - A failed node is terminated (the registry keeps its output) and, no
//!   longer counted, replaced in the same tick, unless its role is held
//!   (`Desired::hold`, the failure budget): then the cluster stays short.
//! - Slaves are counted per pool; a slave of a pool that is no longer wanted
//!   is surplus.
//! - A node with an interruption notice no longer counts: its replacement is
//!   launched at once. It is terminated only when its role/pool is back at
//!   size with ready nodes (or the provider takes it first). A superseded
//!   node (on-demand while spot is back) is replaced the same way.
//! - On scale down, on-demand slaves go before spot ones of the same state.

use crate::budget::{Budget, OnBudget};
use crate::lifecycle::{LifeEvent, Lifecycle, StopReason};
pub use crate::model::Reason;
use crate::model::{Role, StateKind};
use std::collections::BTreeMap;

/// What the user asked for: slaves per pool (one master is implied); and
/// the roles whose launches are held (the failure budget: a crash loop is
/// not fed new nodes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub pools: BTreeMap<String, u32>,
    pub hold: std::collections::BTreeSet<Role>,
}

impl Desired {
    /// One pool (`default`) of `n` slaves.
    pub fn slaves(n: u32) -> Desired {
        Desired {
            pools: BTreeMap::from([(crate::config::DEFAULT_POOL.to_string(), n)]),
            ..Default::default()
        }
    }
}

/// Spreads `total` slaves over pools in proportion to their weights (the
/// configured counts), largest remainder first; equal shares if all weights
/// are zero. Pool order breaks ties.
pub fn distribute(total: u32, weights: &[(String, u32)]) -> BTreeMap<String, u32> {
    let sum: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    let w = |x: u32| if sum == 0 { 1 } else { u64::from(x) };
    let denom = if sum == 0 { weights.len() as u64 } else { sum };
    let mut out: Vec<(String, u64, u64)> = weights
        .iter()
        .map(|(n, x)| {
            let exact = u64::from(total) * w(*x);
            (n.clone(), exact / denom.max(1), exact % denom.max(1))
        })
        .collect();
    let mut left = u64::from(total) - out.iter().map(|(_, q, _)| q).sum::<u64>();
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(out[i].2));
    for i in order {
        if left == 0 {
            break;
        }
        out[i].1 += 1;
        left -= 1;
    }
    out.into_iter().map(|(n, q, _)| (n, q as u32)).collect()
}

/// Deadlines, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub boot_timeout_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Drain before terminating on scale down; 0: terminate at once.
    pub drain_ms: u64,
    /// A terminated instance still running this long after the request is
    /// asked again.
    pub reterminate_ms: u64,
    /// A node whose instance has never been listed is not taken for gone
    /// before this long after its launch (listings are eventually
    /// consistent: a new instance can run, and its agent enroll, before
    /// DescribeInstances shows it).
    pub listing_grace_ms: u64,
}

/// What the provider says about a node's instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instance {
    /// Running (or pending) at the provider.
    Alive,
    /// Terminated, stopped, or exited.
    Gone,
    /// Not in the provider's listing (may be too new to be visible).
    NotListed,
}

/// One node as the decision function sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: String,
    pub role: Role,
    /// Slave pool (the master's is `master`).
    pub pool: String,
    /// An interruption or rebalance notice was received for it.
    pub interrupted: bool,
    /// Runs on-demand (not spot).
    pub on_demand: bool,
    /// On-demand while its pool is back on spot: replaced by a spot node
    /// (launched first), then terminated.
    pub superseded: bool,
    pub state: StateKind,
    /// Creation order (larger = newer).
    pub seq: u64,
    pub since_launch_ms: u64,
    /// Since the last message from its agent; `None` if never heard from.
    pub since_heartbeat_ms: Option<u64>,
    /// Since it started draining (state `Draining`).
    pub since_drain_ms: Option<u64>,
    /// Since its instance was last asked to terminate (state `Terminating`).
    pub since_terminate_ms: Option<u64>,
    pub instance: Instance,
    /// Its instance has been in a listing at least once.
    pub listed_before: bool,
    /// Draining, and the engine says it can go now without loss (Disco:
    /// DDFS re-replicated its data); else it goes at the drain timeout.
    pub drained: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Launch `count` new nodes of `role` in `pool`.
    Launch { role: Role, pool: String, count: u32 },
    /// Terminate the node's instance; it is `Terminating` from now on.
    Terminate { id: String, reason: Reason },
    /// Start draining (scale down with an engine): `Draining`.
    Drain { id: String },
    /// The provider shows the instance running: `Requested` -> `Booting`.
    MarkBooting { id: String },
    /// A terminating node whose instance is gone: drop it from the registry.
    Forget { id: String },
    /// A terminating node whose instance still runs [`Limits::reterminate_ms`]
    /// after it was asked to terminate (the call failed, or was lost):
    /// ask again.
    Reterminate { id: String },
    /// A live instance tagged for this cluster that no node owns.
    TerminateOrphan { instance_id: String, node_id: Option<String> },
    /// Spend passed 80% of the cap: say so (once).
    WarnSpend,
    /// Spend reached the cap with `on_budget = "stop-launching"`.
    StopLaunching,
    /// Destroy the cluster, then stop the controller.
    Destroy { reason: StopReason },
    /// The adaptive size's decision (`scale MIN..MAX`) and the engine's
    /// target it followed (in slaves): its memory is kept, and the size set
    /// when it differs.
    Resize { decision: crate::autoscale::Decision, target: Option<u32>, range: (u32, u32) },
}

/// Everything `decide` weighs: the nodes (when the provider could be
/// listed this tick) and the cluster's policies.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub desired: &'a Desired,
    /// `None`: no fresh listing (nothing is decided about nodes on stale
    /// data; the policies still are: a spend cap or a max runtime does not
    /// wait for the provider's API).
    pub nodes: Option<&'a [NodeView]>,
    /// Live instances tagged for this cluster that no node owns.
    pub orphans: &'a [crate::model::Observed],
    pub limits: Limits,
    pub policy: Policy,
}

/// The cluster-level facts, observed by the caller.
#[derive(Debug, Clone)]
pub struct Policy {
    pub lifecycle: Lifecycle,
    pub budget: Budget,
    pub on_budget: OnBudget,
    /// The cluster has been idle for `autostop_idle_mins`.
    pub autostop_due: bool,
    /// `max_runtime_mins` has passed since the first launch.
    pub max_runtime_passed: bool,
    /// `scale MIN..MAX` in force.
    pub adaptive: Option<AdaptiveInput>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lifecycle: Lifecycle::Running,
            budget: Budget::Off,
            on_budget: OnBudget::Destroy,
            autostop_due: false,
            max_runtime_passed: false,
            adaptive: None,
        }
    }
}

/// What the adaptive size decides from (see `autoscale::decide`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveInput {
    pub current: u32,
    /// The engine's target, in slaves.
    pub target: Option<u32>,
    pub bounds: crate::autoscale::Bounds,
    pub lower_since_ms: Option<u64>,
    pub now_ms: u64,
    pub cooldown_ms: u64,
}

/// Computes everything the reconcile loop does this tick: the nodes'
/// actions (`decide_nodes`), the orphans to terminate, the cluster's
/// lifecycle (spend cap, max runtime, autostop) and the adaptive size.
/// Launches are left out when the lifecycle allows none (the cap reached,
/// a destroy under way).
pub fn decide(i: &Inputs<'_>) -> Vec<Action> {
    let p = &i.policy;
    let mut actions = Vec::new();
    let launching = p.lifecycle.launches() && p.budget != Budget::Reached;
    if let Some(nodes) = i.nodes {
        actions.extend(
            decide_nodes(i.desired, nodes, i.limits)
                .into_iter()
                .filter(|a| launching || !matches!(a, Action::Launch { .. })),
        );
        actions.extend(i.orphans.iter().map(|o| Action::TerminateOrphan {
            instance_id: o.instance_id.clone(),
            node_id: o.node_id.clone(),
        }));
    }
    let life = p.lifecycle;
    // The warning comes before the cap even when one tick's spend passed
    // both (a slow tick, a price that jumped): the cap is never the first
    // word of it.
    if matches!(p.budget, Budget::Warning | Budget::Reached) && life.on(LifeEvent::SpendWarning).is_some() {
        actions.push(Action::WarnSpend);
    }
    if p.budget == Budget::Reached
        && p.on_budget == OnBudget::StopLaunching
        && life.on(LifeEvent::SpendReached { destroy: false }).is_some()
    {
        actions.push(Action::StopLaunching)
    }
    // The cluster's end, the most pressing reason first.
    let stop = if p.budget == Budget::Reached && p.on_budget == OnBudget::Destroy {
        Some(StopReason::SpendCap)
    } else if p.max_runtime_passed {
        Some(StopReason::MaxRuntime)
    } else if p.autostop_due {
        Some(StopReason::Autostop)
    } else {
        None
    };
    if let Some(reason) = stop
        && life.on(LifeEvent::Stop(reason)).is_some()
    {
        actions.push(Action::Destroy { reason });
        return actions;
    }
    if life.ticks()
        && let Some(a) = p.adaptive
    {
        let d = crate::autoscale::decide(
            a.current,
            a.target,
            a.bounds,
            a.lower_since_ms,
            a.now_ms,
            a.cooldown_ms,
        );
        actions.push(Action::Resize { decision: d, target: a.target, range: (a.bounds.min, a.bounds.max) });
    }
    actions
}

/// Computes what to do to move the observed nodes towards `desired`.
/// Long by design: the module's guarantees in the order they apply (losses,
/// failures, the master, the slaves per pool, surplus), read top to bottom.
pub fn decide_nodes(desired: &Desired, nodes: &[NodeView], limits: Limits) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut live: Vec<&NodeView> = Vec::new();
    let mut noticed: Vec<&NodeView> = Vec::new();

    for n in nodes {
        if n.state == StateKind::Terminating {
            if n.instance != Instance::Alive {
                actions.push(Action::Forget { id: n.id.clone() });
            } else if n.since_terminate_ms.unwrap_or(u64::MAX) >= limits.reterminate_ms {
                // Terminations always finish: until the instance is gone.
                actions.push(Action::Reterminate { id: n.id.clone() });
            }
            continue;
        }
        if let Some(reason) = loss(n, limits) {
            actions.push(Action::Terminate { id: n.id.clone(), reason });
            continue;
        }
        if n.state == StateKind::Failed {
            actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::Failed });
            continue;
        }
        if n.state == StateKind::Requested && n.instance == Instance::Alive {
            actions.push(Action::MarkBooting { id: n.id.clone() });
        }
        if n.state == StateKind::Draining {
            if n.drained || n.since_drain_ms.unwrap_or(u64::MAX) >= limits.drain_ms {
                let reason = if n.superseded { Reason::BackToSpot } else { Reason::ScaleDown };
                actions.push(Action::Terminate { id: n.id.clone(), reason });
            }
            continue;
        }
        if n.interrupted || n.superseded {
            noticed.push(n);
        } else {
            live.push(n);
        }
    }

    // The master: exactly one.
    let mut masters: Vec<&NodeView> = live.iter().copied().filter(|n| n.role == Role::Master).collect();
    match masters.len() {
        0 => actions.push(Action::Launch {
            role: Role::Master,
            pool: crate::config::MASTER_POOL.into(),
            count: 1,
        }),
        1 => {}
        _ => {
            masters.sort_by_key(|n| removal_rank(n));
            for n in &masters[1..] {
                actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::ExtraMaster });
            }
        }
    }
    let master_ready = masters.first().is_some_and(|m| m.state == StateKind::Ready);

    // Slaves, pool by pool (pools no longer wanted count as wanting 0).
    let mut pools: BTreeMap<&str, Vec<&NodeView>> =
        desired.pools.keys().map(|p| (p.as_str(), Vec::new())).collect();
    for n in live.iter().copied().filter(|n| n.role == Role::Slave) {
        pools.entry(n.pool.as_str()).or_default().push(n);
    }
    let mut pool_ready: BTreeMap<&str, bool> = BTreeMap::new();
    for (pool, mut slaves) in pools {
        let want = u64::from(desired.pools.get(pool).copied().unwrap_or(0));
        let have = slaves.len() as u64;
        if have < want {
            actions.push(Action::Launch {
                role: Role::Slave,
                pool: pool.to_string(),
                count: (want - have) as u32,
            });
        } else if have > want {
            slaves.sort_by_key(|n| removal_rank(n));
            for n in &slaves[want as usize..] {
                // Only ready slaves have work to drain.
                if limits.drain_ms > 0 && n.state == StateKind::Ready {
                    actions.push(Action::Drain { id: n.id.clone() });
                } else {
                    actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::ScaleDown });
                }
            }
        }
        let ready = slaves.iter().filter(|n| n.state == StateKind::Ready).count() as u64;
        pool_ready.insert(pool, ready >= want);
    }

    // Noticed nodes go once their replacements are ready.
    for n in noticed {
        let replaced = match n.role {
            Role::Master => master_ready,
            Role::Slave => pool_ready.get(n.pool.as_str()).copied().unwrap_or(true),
        };
        if !replaced {
            continue;
        }
        if n.interrupted {
            actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::Interrupted });
        } else if limits.drain_ms > 0 && n.state == StateKind::Ready {
            // A superseded node is not in a hurry: its work drains first.
            actions.push(Action::Drain { id: n.id.clone() });
        } else {
            actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::BackToSpot });
        }
    }
    // Held roles launch nothing (their failed nodes still go).
    actions.retain(|a| !matches!(a, Action::Launch { role, .. } if desired.hold.contains(role)));
    actions
}

/// At a scale change: which on-demand slaves to replace with spot ones,
/// in pools where `spot_again(pool)` says spot launches work again. Only
/// those the new size keeps (the others go with the scale down anyway).
pub fn supersede(desired: &Desired, nodes: &[NodeView], spot_again: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for (pool, want) in &desired.pools {
        let counted: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| {
                n.role == Role::Slave
                    && &n.pool == pool
                    && !n.interrupted
                    && !n.superseded
                    && !matches!(n.state, StateKind::Terminating | StateKind::Draining)
            })
            .collect();
        let spot = counted.iter().filter(|n| !n.on_demand).count();
        // On-demand slaves the new size still needs: replace them by spot.
        let to_replace = (*want as usize).saturating_sub(spot);
        if to_replace == 0 || !spot_again(pool) {
            continue;
        }
        let mut od: Vec<&&NodeView> = counted.iter().filter(|n| n.on_demand).collect();
        od.sort_by_key(|n| n.seq);
        out.extend(od.into_iter().take(to_replace).map(|n| n.id.clone()));
    }
    out
}

/// Milliseconds until the first deadline among `nodes` passes: a heartbeat
/// or boot timeout, or the end of a drain. `None`: nothing is pending (the
/// loop then waits its usual interval).
pub fn next_deadline_ms(nodes: &[NodeView], limits: Limits) -> Option<u64> {
    nodes
        .iter()
        .filter_map(|n| match &n.state {
            StateKind::Terminating => None,
            StateKind::Requested | StateKind::Booting => {
                Some(limits.boot_timeout_ms.saturating_sub(n.since_launch_ms))
            }
            StateKind::Draining => Some(limits.drain_ms.saturating_sub(n.since_drain_ms.unwrap_or(0))),
            s if s.is_enrolled() => {
                let silent = n.since_heartbeat_ms.unwrap_or(n.since_launch_ms);
                Some(limits.heartbeat_timeout_ms.saturating_sub(silent))
            }
            _ => None,
        })
        .min()
}

/// Below this 1-minute load average per core a node counts as idle.
pub const IDLE_LOAD_PER_CORE: f64 = 0.1;

/// Is the cluster idle? `loads`: (reported load x 1000, cores) of every
/// ready node. Idle when there is at least one and each has reported a load
/// below [`IDLE_LOAD_PER_CORE`] per core (no report: not idle).
pub fn idle(loads: &[(Option<u32>, u32)]) -> bool {
    !loads.is_empty()
        && loads.iter().all(|(load, cores)| {
            load.is_some_and(|l| f64::from(l) / 1000.0 < IDLE_LOAD_PER_CORE * f64::from((*cores).max(1)))
        })
}

/// Why this node counts as lost, if it does.
fn loss(n: &NodeView, limits: Limits) -> Option<Reason> {
    match n.instance {
        Instance::Gone => return Some(Reason::InstanceGone),
        // Too new to be listed is fine while booting, and for a while
        // after the launch; otherwise it vanished.
        Instance::NotListed
            if n.state != StateKind::Requested
                && (n.listed_before || n.since_launch_ms > limits.listing_grace_ms) =>
        {
            return Some(Reason::InstanceGone);
        }
        _ => {}
    }
    match &n.state {
        StateKind::Requested | StateKind::Booting => {
            (n.since_launch_ms > limits.boot_timeout_ms).then_some(Reason::BootTimeout)
        }
        s if s.is_enrolled() => {
            let silent = n.since_heartbeat_ms.unwrap_or(n.since_launch_ms);
            (silent > limits.heartbeat_timeout_ms).then_some(Reason::HeartbeatTimeout { silent_ms: silent })
        }
        _ => None,
    }
}

/// Sort key: smaller = keep first. Ready and old nodes are the most useful;
/// spot ones before on-demand ones of the same state (cheaper).
fn removal_rank(n: &NodeView) -> (u8, bool, u64) {
    let group = match n.state {
        StateKind::Ready => 0,
        StateKind::Provisioning => 1,
        StateKind::Enrolled => 2,
        StateKind::Booting => 3,
        StateKind::Requested => 4,
        StateKind::Failed => 5,
        StateKind::Draining | StateKind::Terminating => 6,
    };
    // Older (smaller seq) first: keep them; the newest are removed first.
    (group, n.on_demand, n.seq)
}

#[cfg(test)]
mod tests {
    use super::decide_nodes as decide;
    use super::*;

    const LIMITS: Limits = Limits {
        boot_timeout_ms: 60_000,
        heartbeat_timeout_ms: 15_000,
        drain_ms: 0,
        reterminate_ms: 30_000,
        listing_grace_ms: 120_000,
    };

    fn node(id: &str, role: Role, state: StateKind, seq: u64) -> NodeView {
        NodeView {
            id: id.into(),
            role,
            pool: if role == Role::Master { "master".into() } else { "default".into() },
            interrupted: false,
            on_demand: false,
            superseded: false,
            state,
            seq,
            since_launch_ms: 1_000,
            since_heartbeat_ms: Some(1_000),
            since_drain_ms: None,
            since_terminate_ms: None,
            instance: Instance::Alive,
            listed_before: true,
            drained: false,
        }
    }

    fn ready(id: &str, role: Role, seq: u64) -> NodeView {
        node(id, role, StateKind::Ready, seq)
    }

    fn terminated(actions: &[Action]) -> Vec<(&str, &Reason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Terminate { id, reason } => Some((id.as_str(), reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_next_deadline_is_the_first_timeout_to_pass() {
        let mut a = ready("a", Role::Slave, 1);
        a.since_heartbeat_ms = Some(4_000);
        let mut b = ready("b", Role::Slave, 2);
        b.since_heartbeat_ms = Some(12_500);
        let mut c = node("c", Role::Slave, StateKind::Booting, 3);
        c.since_launch_ms = 50_000;
        let gone = node("d", Role::Slave, StateKind::Terminating, 4);
        // b is silent for 12.5 s of 15: 2.5 s left; c boots for 10 s more.
        assert_eq!(next_deadline_ms(&[a.clone(), b.clone(), c.clone(), gone.clone()], LIMITS), Some(2_500));
        assert_eq!(next_deadline_ms(&[a, c], LIMITS), Some(10_000));
        assert_eq!(next_deadline_ms(&[gone], LIMITS), None);
        let mut draining = node("e", Role::Slave, StateKind::Draining, 5);
        draining.since_drain_ms = Some(100);
        let drain = Limits { drain_ms: 1_000, ..LIMITS };
        assert_eq!(next_deadline_ms(&[draining], drain), Some(900));
    }

    /// A draining slave goes at the drain timeout, or as soon as the
    /// engine says nothing would be lost (Disco: DDFS re-replicated it).
    #[test]
    fn a_drained_slave_goes_before_the_drain_timeout() {
        let master = node("m", Role::Master, StateKind::Ready, 1);
        let mut draining = node("s", Role::Slave, StateKind::Draining, 2);
        draining.since_drain_ms = Some(100);
        let limits = Limits { drain_ms: 60_000, ..LIMITS };
        let d = Desired::slaves(0);
        assert_eq!(decide(&d, &[master.clone(), draining.clone()], limits), vec![]);
        draining.drained = true;
        assert_eq!(
            decide(&d, &[master, draining], limits),
            vec![Action::Terminate { id: "s".into(), reason: Reason::ScaleDown }]
        );
    }

    #[test]
    fn empty_cluster_launches_master_and_slaves_together() {
        let a = decide(&Desired::slaves(3), &[], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Launch { role: Role::Master, pool: "master".into(), count: 1 },
                Action::Launch { role: Role::Slave, pool: "default".into(), count: 3 },
            ]
        );
    }

    #[test]
    fn steady_state_does_nothing() {
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1)];
        assert!(decide(&Desired::slaves(1), &nodes, LIMITS).is_empty());
    }

    #[test]
    fn scale_up_launches_only_the_difference() {
        let mut s2 = node("s2", Role::Slave, StateKind::Requested, 2);
        s2.instance = Instance::NotListed;
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1), s2];
        assert_eq!(
            decide(&Desired::slaves(5), &nodes, LIMITS),
            vec![Action::Launch { role: Role::Slave, pool: "default".into(), count: 3 }]
        );
    }

    #[test]
    fn scale_down_removes_unready_then_newest_ready() {
        let nodes = [
            ready("m", Role::Master, 0),
            ready("s-old", Role::Slave, 1),
            ready("s-new", Role::Slave, 5),
            node("s-boot", Role::Slave, StateKind::Booting, 2),
            node("s-prov", Role::Slave, StateKind::Provisioning, 3),
        ];
        let ids = |n| {
            terminated(&decide(&Desired::slaves(n), &nodes, LIMITS))
                .into_iter()
                .map(|(id, r)| {
                    assert_eq!(*r, Reason::ScaleDown);
                    id.to_string()
                })
                .collect::<Vec<String>>()
        };
        assert_eq!(ids(4), Vec::<String>::new());
        assert_eq!(ids(3), vec!["s-boot"]);
        assert_eq!(ids(1), vec!["s-new", "s-prov", "s-boot"]);
        assert_eq!(ids(0).len(), 4);
        // The master is never a scale-down victim.
        assert!(!ids(0).contains(&"m".to_string()));
    }

    #[test]
    fn silent_slave_is_terminated_and_replaced_in_the_same_tick() {
        let mut s = ready("s1", Role::Slave, 1);
        s.since_heartbeat_ms = Some(15_001);
        let nodes = [ready("m", Role::Master, 0), s, ready("s2", Role::Slave, 2)];
        let a = decide(&Desired::slaves(2), &nodes, LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "s1".into(), reason: Reason::HeartbeatTimeout { silent_ms: 15_001 } },
                Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 },
            ]
        );
        // Exactly at the timeout is still alive.
        let mut s = ready("s1", Role::Slave, 1);
        s.since_heartbeat_ms = Some(15_000);
        assert!(decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS).is_empty());
    }

    #[test]
    fn gone_instance_is_replaced() {
        let mut s = ready("s1", Role::Slave, 1);
        s.instance = Instance::Gone;
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "s1".into(), reason: Reason::InstanceGone },
                Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 },
            ]
        );
    }

    #[test]
    fn master_loss_launches_a_new_master_and_keeps_slaves() {
        let mut m = ready("m", Role::Master, 0);
        m.since_heartbeat_ms = Some(20_000);
        let a = decide(&Desired::slaves(1), &[m, ready("s1", Role::Slave, 1)], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "m".into(), reason: Reason::HeartbeatTimeout { silent_ms: 20_000 } },
                Action::Launch { role: Role::Master, pool: "master".into(), count: 1 },
            ]
        );
    }

    #[test]
    fn boot_deadline() {
        let mut s = node("s1", Role::Slave, StateKind::Booting, 1);
        s.since_launch_ms = 60_001;
        s.since_heartbeat_ms = None;
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::BootTimeout)]);
    }

    #[test]
    fn requested_but_not_yet_listed_is_waited_for() {
        let mut s = node("s1", Role::Slave, StateKind::Requested, 1);
        s.instance = Instance::NotListed;
        assert!(decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s.clone()], LIMITS).is_empty());
        // ...but a booted node missing from the listing has vanished.
        s.state = StateKind::Booting;
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::InstanceGone)]);
    }

    #[test]
    fn an_enrolled_node_never_listed_yet_is_given_the_listing_grace() {
        // Listings lag: the agent enrolled before its instance was listed.
        let mut s = ready("s1", Role::Slave, 1);
        s.instance = Instance::NotListed;
        s.listed_before = false;
        s.since_launch_ms = 5_000;
        assert!(decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s.clone()], LIMITS).is_empty());
        // Listed once, then missing: gone.
        let mut seen = s.clone();
        seen.listed_before = true;
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), seen], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::InstanceGone)]);
        // Never listed long after its launch: gone.
        s.since_launch_ms = LIMITS.listing_grace_ms + 1;
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::InstanceGone)]);
    }

    #[test]
    fn requested_and_running_becomes_booting() {
        let s = node("s1", Role::Slave, StateKind::Requested, 1);
        let a = decide(&Desired::slaves(1), &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(a, vec![Action::MarkBooting { id: "s1".into() }]);
    }

    #[test]
    fn terminating_nodes_are_forgotten_once_gone_and_not_counted() {
        let mut t = node("s1", Role::Slave, StateKind::Terminating, 1);
        t.since_terminate_ms = Some(1_000);
        let nodes = [ready("m", Role::Master, 0), t.clone()];
        // Still alive: wait, but do not count it (the replacement is launched).
        assert_eq!(
            decide(&Desired::slaves(1), &nodes, LIMITS),
            vec![Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 }]
        );
        // Still alive long after: asked again (a failed or lost call).
        let mut late = t.clone();
        late.since_terminate_ms = Some(LIMITS.reterminate_ms);
        assert_eq!(
            decide(&Desired::slaves(0), &[ready("m", Role::Master, 0), late], LIMITS),
            vec![Action::Reterminate { id: "s1".into() }]
        );
        t.instance = Instance::Gone;
        assert_eq!(
            decide(&Desired::slaves(0), &[ready("m", Role::Master, 0), t], LIMITS),
            vec![Action::Forget { id: "s1".into() }]
        );
    }

    #[test]
    fn a_failed_node_is_terminated_and_replaced_unless_its_role_is_held() {
        let f = node("s1", Role::Slave, StateKind::Failed, 1);
        let nodes = [ready("m", Role::Master, 0), f];
        assert_eq!(
            decide(&Desired::slaves(1), &nodes, LIMITS),
            vec![
                Action::Terminate { id: "s1".into(), reason: Reason::Failed },
                Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 },
            ]
        );
        // The failure budget holds slaves: it still goes, nothing comes.
        let held = Desired { hold: [Role::Slave].into(), ..Desired::slaves(1) };
        assert_eq!(
            decide(&held, &nodes, LIMITS),
            vec![Action::Terminate { id: "s1".into(), reason: Reason::Failed }]
        );
        // A failed master: replaced too (a held slave role does not stop it).
        let fm = node("m", Role::Master, StateKind::Failed, 0);
        let acts = decide(&held, &[fm, ready("s2", Role::Slave, 2)], LIMITS);
        assert!(
            acts.contains(&Action::Launch { role: Role::Master, pool: "master".into(), count: 1 }),
            "{acts:?}"
        );
    }

    #[test]
    fn pools_are_reconciled_separately_and_unwanted_pools_drained() {
        let mut a = ready("a1", Role::Slave, 1);
        a.pool = "a".into();
        let mut b1 = ready("b1", Role::Slave, 2);
        b1.pool = "b".into();
        let mut old = ready("o1", Role::Slave, 3);
        old.pool = "gone".into();
        let desired =
            Desired { pools: BTreeMap::from([("a".into(), 2), ("b".into(), 1)]), ..Default::default() };
        let acts = decide(&desired, &[ready("m", Role::Master, 0), a, b1, old], LIMITS);
        assert_eq!(
            acts,
            vec![
                Action::Launch { role: Role::Slave, pool: "a".into(), count: 1 },
                Action::Terminate { id: "o1".into(), reason: Reason::ScaleDown },
            ]
        );
    }

    #[test]
    fn interrupted_node_is_replaced_first_and_terminated_once_replaced() {
        let mut s1 = ready("s1", Role::Slave, 1);
        s1.interrupted = true;
        let m = ready("m", Role::Master, 0);
        // Notice: replacement launched, the noticed node stays for now.
        assert_eq!(
            decide(&Desired::slaves(1), &[m.clone(), s1.clone()], LIMITS),
            vec![Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 }]
        );
        // Replacement booting: nothing more.
        let s2 = node("s2", Role::Slave, StateKind::Booting, 2);
        assert!(decide(&Desired::slaves(1), &[m.clone(), s1.clone(), s2], LIMITS).is_empty());
        // Replacement ready: the noticed node is terminated.
        let s2 = ready("s2", Role::Slave, 2);
        assert_eq!(
            decide(&Desired::slaves(1), &[m, s1, s2], LIMITS),
            vec![Action::Terminate { id: "s1".into(), reason: Reason::Interrupted }]
        );
    }

    #[test]
    fn on_demand_slaves_go_first_on_scale_down_and_superseded_ones_are_replaced_first() {
        let m = ready("m", Role::Master, 0);
        let mut od = ready("od", Role::Slave, 1);
        od.on_demand = true;
        let sp = ready("sp", Role::Slave, 2);
        // Scale 2 -> 1: the on-demand slave goes although it is older.
        assert_eq!(
            terminated(&decide(&Desired::slaves(1), &[m.clone(), od.clone(), sp.clone()], LIMITS)),
            vec![("od", &Reason::ScaleDown)]
        );
        // Superseded: a spot replacement first, the on-demand node once it is ready.
        od.superseded = true;
        assert_eq!(
            decide(&Desired::slaves(2), &[m.clone(), od.clone(), sp.clone()], LIMITS),
            vec![Action::Launch { role: Role::Slave, pool: "default".into(), count: 1 }]
        );
        let new = ready("new", Role::Slave, 3);
        assert_eq!(
            decide(&Desired::slaves(2), &[m.clone(), od.clone(), sp.clone(), new.clone()], LIMITS),
            vec![Action::Terminate { id: "od".into(), reason: Reason::BackToSpot }]
        );
        // With draining on, it drains first, then goes (as "back to spot").
        let drain = Limits { drain_ms: 5_000, ..LIMITS };
        assert_eq!(
            decide(&Desired::slaves(2), &[m.clone(), od.clone(), sp.clone(), new.clone()], drain),
            vec![Action::Drain { id: "od".into() }]
        );
        od.state = StateKind::Draining;
        od.since_drain_ms = Some(6_000);
        assert_eq!(
            decide(&Desired::slaves(2), &[m, od, sp, new], drain),
            vec![Action::Terminate { id: "od".into(), reason: Reason::BackToSpot }]
        );
    }

    #[test]
    fn only_kept_on_demand_slaves_of_pools_back_on_spot_are_superseded() {
        let od = |id: &str, seq| {
            let mut n = ready(id, Role::Slave, seq);
            n.on_demand = true;
            n
        };
        let nodes = [ready("m", Role::Master, 0), od("od1", 1), od("od2", 2), ready("sp", Role::Slave, 3)];
        // Size 3: both on-demand slaves stay, so both are replaced by spot.
        assert_eq!(supersede(&Desired::slaves(3), &nodes, |_| true), vec!["od1", "od2"]);
        // Size 2: one goes with the scale down; the other is replaced.
        assert_eq!(supersede(&Desired::slaves(2), &nodes, |_| true), vec!["od1"]);
        // Size 1: the spot slave is enough; scale down removes both.
        assert!(supersede(&Desired::slaves(1), &nodes, |_| true).is_empty());
        // Spot still failing: nothing.
        assert!(supersede(&Desired::slaves(3), &nodes, |_| false).is_empty());
    }

    #[test]
    fn idle_means_every_ready_node_reported_a_low_load() {
        assert!(idle(&[(Some(50), 1), (Some(150), 2)]));
        assert!(!idle(&[(Some(50), 1), (Some(250), 2)]));
        assert!(!idle(&[(Some(0), 2), (None, 2)]), "a node without a report is not known idle");
        assert!(!idle(&[]));
    }

    #[test]
    fn scale_down_drains_ready_slaves_first_then_terminates() {
        let limits = Limits { drain_ms: 5_000, ..LIMITS };
        let nodes = [
            ready("m", Role::Master, 0),
            ready("s1", Role::Slave, 1),
            ready("s2", Role::Slave, 2),
            node("s3", Role::Slave, StateKind::Booting, 3),
        ];
        let a = decide(&Desired::slaves(1), &nodes, limits);
        assert_eq!(
            a,
            vec![
                Action::Drain { id: "s2".into() },
                Action::Terminate { id: "s3".into(), reason: Reason::ScaleDown },
            ]
        );
        // While draining it is not counted and not replaced; then it goes.
        let mut d = ready("s2", Role::Slave, 2);
        d.state = StateKind::Draining;
        d.since_drain_ms = Some(4_999);
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1), d.clone()];
        assert!(decide(&Desired::slaves(1), &nodes, limits).is_empty());
        d.since_drain_ms = Some(5_000);
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1), d];
        assert_eq!(
            decide(&Desired::slaves(1), &nodes, limits),
            vec![Action::Terminate { id: "s2".into(), reason: Reason::ScaleDown }]
        );
    }

    #[test]
    fn distribute_keeps_proportions() {
        let w = |v: &[(&str, u32)]| v.iter().map(|(n, c)| (n.to_string(), *c)).collect::<Vec<_>>();
        let d = distribute(20, &w(&[("a", 10), ("b", 10)]));
        assert_eq!((d["a"], d["b"]), (10, 10));
        let d = distribute(5, &w(&[("a", 2), ("b", 1)]));
        assert_eq!((d["a"], d["b"]), (3, 2));
        let d = distribute(3, &w(&[("a", 0), ("b", 0)]));
        assert_eq!(d["a"] + d["b"], 3);
        let d = distribute(7, &w(&[("a", 1)]));
        assert_eq!(d["a"], 7);
        let d = distribute(0, &w(&[("a", 3), ("b", 1)]));
        assert_eq!((d["a"], d["b"]), (0, 0));
    }

    #[test]
    fn extra_master_is_removed_keeping_the_ready_one() {
        let nodes = [node("m2", Role::Master, StateKind::Booting, 3), ready("m1", Role::Master, 0)];
        let a = decide(&Desired::slaves(0), &nodes, LIMITS);
        assert_eq!(terminated(&a), vec![("m2", &Reason::ExtraMaster)]);
    }

    fn inputs<'a>(nodes: Option<&'a [NodeView]>, desired: &'a Desired, policy: Policy) -> Inputs<'a> {
        Inputs { desired, nodes, orphans: &[], limits: LIMITS, policy }
    }

    /// Issue 23: the cluster's end is decided here too. A cap that only
    /// stops launching leaves autostop and the max runtime in force (the
    /// bug: autostop never fired after it); a cap that destroys wins over
    /// both; nothing is launched once the cap is reached, even in the tick
    /// that finds it; no listing, still a decision.
    #[test]
    fn the_cluster_s_end_is_decided_with_its_nodes() {
        use crate::lifecycle::{Lifecycle, StopReason};
        let d = Desired::slaves(2);
        let nodes = [ready("m", Role::Master, 1)];
        let stop_launching = Policy {
            lifecycle: Lifecycle::LaunchingStopped,
            budget: Budget::Reached,
            on_budget: OnBudget::StopLaunching,
            autostop_due: true,
            ..Default::default()
        };
        let a = super::decide(&inputs(Some(&nodes), &d, stop_launching.clone()));
        assert!(!a.iter().any(|a| matches!(a, Action::Launch { .. })), "{a:?}");
        assert!(a.contains(&Action::Destroy { reason: StopReason::Autostop }), "{a:?}");
        let runtime = Policy { autostop_due: false, max_runtime_passed: true, ..stop_launching.clone() };
        let a = super::decide(&inputs(None, &d, runtime));
        assert_eq!(a, vec![Action::Destroy { reason: StopReason::MaxRuntime }]);
        // The tick that finds the cap (the 80% warning said already):
        // launches dropped, the cap said once.
        let found = Policy { autostop_due: false, lifecycle: Lifecycle::CapWarned, ..stop_launching };
        let a = super::decide(&inputs(Some(&nodes), &d, found.clone()));
        assert_eq!(a, vec![Action::StopLaunching]);
        let destroy = Policy { on_budget: OnBudget::Destroy, max_runtime_passed: true, ..found };
        assert_eq!(
            super::decide(&inputs(Some(&nodes), &d, destroy)),
            vec![Action::Destroy { reason: StopReason::SpendCap }]
        );
        // Under way: nothing decided twice.
        let stopping = Policy {
            lifecycle: Lifecycle::Stopping(StopReason::Autostop),
            autostop_due: true,
            budget: Budget::Warning,
            ..Default::default()
        };
        assert_eq!(super::decide(&inputs(None, &d, stopping)), vec![]);
        // The warning once: not again from CapWarned.
        let warn = Policy { budget: Budget::Warning, ..Default::default() };
        assert_eq!(super::decide(&inputs(None, &d, warn.clone())), vec![Action::WarnSpend]);
        let warned = Policy { lifecycle: Lifecycle::CapWarned, ..warn };
        assert_eq!(super::decide(&inputs(None, &d, warned)), vec![]);
        // A tick that passed 80% and the cap at once warns, then acts.
        let both =
            Policy { budget: Budget::Reached, on_budget: OnBudget::StopLaunching, ..Default::default() };
        assert_eq!(super::decide(&inputs(None, &d, both)), vec![Action::WarnSpend, Action::StopLaunching]);
        let both = Policy { budget: Budget::Reached, on_budget: OnBudget::Destroy, ..Default::default() };
        assert_eq!(
            super::decide(&inputs(None, &d, both)),
            vec![Action::WarnSpend, Action::Destroy { reason: StopReason::SpendCap }]
        );
    }

    /// Orphans and the adaptive size are actions of the same decision.
    #[test]
    fn orphans_and_the_adaptive_size_are_decided_here() {
        let d = Desired::slaves(1);
        let nodes = [ready("m", Role::Master, 1), ready("s", Role::Slave, 2)];
        let orphan = crate::model::Observed {
            instance_id: "i-9".into(),
            node_id: None,
            batch: None,
            alive: true,
            foreign: false,
        };
        let adaptive = AdaptiveInput {
            current: 1,
            target: Some(3),
            bounds: crate::autoscale::Bounds { min: 1, max: 4 },
            lower_since_ms: None,
            now_ms: 1,
            cooldown_ms: 5_000,
        };
        let i = Inputs {
            desired: &d,
            nodes: Some(&nodes),
            orphans: std::slice::from_ref(&orphan),
            limits: LIMITS,
            policy: Policy { adaptive: Some(adaptive), ..Default::default() },
        };
        let a = super::decide(&i);
        assert!(a.contains(&Action::TerminateOrphan { instance_id: "i-9".into(), node_id: None }), "{a:?}");
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::Resize { decision, target: Some(3), range: (1, 4) } if decision.slaves == 3)),
            "{a:?}"
        );
        // Without a listing, no orphan is judged.
        let a = super::decide(&Inputs { nodes: None, ..i });
        assert!(!a.iter().any(|a| matches!(a, Action::TerminateOrphan { .. })), "{a:?}");
    }
}
