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
//! - Failed nodes are kept (and counted) so the operator can read the failed
//!   step; replacing them would repeat the same failure in a loop.

use crate::model::{NodeState, Role};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desired {
    pub slaves: u32,
}

/// Deadlines, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub boot_timeout_ms: u64,
    pub heartbeat_timeout_ms: u64,
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
    pub state: NodeState,
    /// Creation order (larger = newer).
    pub seq: u64,
    pub since_launch_ms: u64,
    /// Since the last message from its agent; `None` if never heard from.
    pub since_heartbeat_ms: Option<u64>,
    pub instance: Instance,
}

/// Why a node is terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    InstanceGone,
    BootTimeout,
    HeartbeatTimeout { silent_ms: u64 },
    ScaleDown,
    ExtraMaster,
}

impl Reason {
    /// Is this a loss (to be reported and replaced), not a choice?
    pub fn is_loss(&self) -> bool {
        matches!(self, Reason::InstanceGone | Reason::BootTimeout | Reason::HeartbeatTimeout { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Reason::InstanceGone => "its instance is gone".into(),
            Reason::BootTimeout => "its agent did not enroll before the boot deadline".into(),
            Reason::HeartbeatTimeout { silent_ms } => {
                format!("no heartbeat for {:.1}s", *silent_ms as f64 / 1000.0)
            }
            Reason::ScaleDown => "scale down".into(),
            Reason::ExtraMaster => "more than one master".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch `count` new nodes of `role`.
    Launch { role: Role, count: u32 },
    /// Terminate the node's instance; it is `Terminating` from now on.
    Terminate { id: String, reason: Reason },
    /// The provider shows the instance running: `Requested` -> `Booting`.
    MarkBooting { id: String },
    /// A terminating node whose instance is gone: drop it from the registry.
    Forget { id: String },
}

/// Computes what to do to move the observed nodes towards `desired`.
pub fn decide(desired: Desired, nodes: &[NodeView], limits: Limits) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut live: Vec<&NodeView> = Vec::new();

    for n in nodes {
        if n.state == NodeState::Terminating {
            if n.instance != Instance::Alive {
                actions.push(Action::Forget { id: n.id.clone() });
            }
            continue;
        }
        if let Some(reason) = loss(n, limits) {
            actions.push(Action::Terminate { id: n.id.clone(), reason });
            continue;
        }
        if n.state == NodeState::Requested && n.instance == Instance::Alive {
            actions.push(Action::MarkBooting { id: n.id.clone() });
        }
        live.push(n);
    }

    let (mut masters, mut slaves): (Vec<&NodeView>, Vec<&NodeView>) =
        live.into_iter().partition(|n| n.role == Role::Master);

    match masters.len() {
        0 => actions.push(Action::Launch { role: Role::Master, count: 1 }),
        1 => {}
        _ => {
            masters.sort_by_key(|n| removal_rank(n));
            for n in &masters[1..] {
                actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::ExtraMaster });
            }
        }
    }

    let have = slaves.len() as u64;
    let want = u64::from(desired.slaves);
    if have < want {
        actions.push(Action::Launch { role: Role::Slave, count: (want - have) as u32 });
    } else if have > want {
        // Most useful first; the tail is removed.
        slaves.sort_by_key(|n| removal_rank(n));
        for n in &slaves[want as usize..] {
            actions.push(Action::Terminate { id: n.id.clone(), reason: Reason::ScaleDown });
        }
    }
    actions
}

/// Why this node counts as lost, if it does.
fn loss(n: &NodeView, limits: Limits) -> Option<Reason> {
    match n.instance {
        Instance::Gone => return Some(Reason::InstanceGone),
        // Too new to be listed is fine while booting; otherwise it vanished.
        Instance::NotListed if n.state != NodeState::Requested => {
            return Some(Reason::InstanceGone);
        }
        _ => {}
    }
    match &n.state {
        NodeState::Lost => Some(Reason::InstanceGone),
        NodeState::Requested | NodeState::Booting => {
            (n.since_launch_ms > limits.boot_timeout_ms).then_some(Reason::BootTimeout)
        }
        s if s.is_enrolled() => {
            let silent = n.since_heartbeat_ms.unwrap_or(n.since_launch_ms);
            (silent > limits.heartbeat_timeout_ms).then_some(Reason::HeartbeatTimeout { silent_ms: silent })
        }
        _ => None,
    }
}

/// Sort key: smaller = keep first. Ready and old nodes are the most useful.
fn removal_rank(n: &NodeView) -> (u8, u64) {
    let group = match n.state {
        NodeState::Ready => 0,
        NodeState::Provisioning { .. } => 1,
        NodeState::Enrolled => 2,
        NodeState::Booting => 3,
        NodeState::Requested => 4,
        NodeState::Failed { .. } => 5,
        NodeState::Lost | NodeState::Terminating => 6,
    };
    // Older (smaller seq) first: keep them; the newest are removed first.
    (group, n.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { boot_timeout_ms: 60_000, heartbeat_timeout_ms: 15_000 };

    fn node(id: &str, role: Role, state: NodeState, seq: u64) -> NodeView {
        NodeView {
            id: id.into(),
            role,
            state,
            seq,
            since_launch_ms: 1_000,
            since_heartbeat_ms: Some(1_000),
            instance: Instance::Alive,
        }
    }

    fn ready(id: &str, role: Role, seq: u64) -> NodeView {
        node(id, role, NodeState::Ready, seq)
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
    fn empty_cluster_launches_master_and_slaves_together() {
        let a = decide(Desired { slaves: 3 }, &[], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Launch { role: Role::Master, count: 1 },
                Action::Launch { role: Role::Slave, count: 3 },
            ]
        );
    }

    #[test]
    fn steady_state_does_nothing() {
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1)];
        assert!(decide(Desired { slaves: 1 }, &nodes, LIMITS).is_empty());
    }

    #[test]
    fn scale_up_launches_only_the_difference() {
        let mut s2 = node("s2", Role::Slave, NodeState::Requested, 2);
        s2.instance = Instance::NotListed;
        let nodes = [ready("m", Role::Master, 0), ready("s1", Role::Slave, 1), s2];
        assert_eq!(
            decide(Desired { slaves: 5 }, &nodes, LIMITS),
            vec![Action::Launch { role: Role::Slave, count: 3 }]
        );
    }

    #[test]
    fn scale_down_removes_failed_then_unready_then_newest_ready() {
        let nodes = [
            ready("m", Role::Master, 0),
            ready("s-old", Role::Slave, 1),
            ready("s-new", Role::Slave, 5),
            node("s-boot", Role::Slave, NodeState::Booting, 2),
            node("s-prov", Role::Slave, NodeState::Provisioning { step: 0, of: 3 }, 3),
            node("s-fail", Role::Slave, NodeState::Failed { step: "pip".into() }, 4),
        ];
        let ids = |n| {
            terminated(&decide(Desired { slaves: n }, &nodes, LIMITS))
                .into_iter()
                .map(|(id, r)| {
                    assert_eq!(*r, Reason::ScaleDown);
                    id.to_string()
                })
                .collect::<Vec<String>>()
        };
        assert_eq!(ids(4), vec!["s-fail"]);
        assert_eq!(ids(3), vec!["s-boot", "s-fail"]);
        assert_eq!(ids(1), vec!["s-new", "s-prov", "s-boot", "s-fail"]);
        assert_eq!(ids(0).len(), 5);
        // The master is never a scale-down victim.
        assert!(!ids(0).contains(&"m".to_string()));
    }

    #[test]
    fn silent_slave_is_terminated_and_replaced_in_the_same_tick() {
        let mut s = ready("s1", Role::Slave, 1);
        s.since_heartbeat_ms = Some(15_001);
        let nodes = [ready("m", Role::Master, 0), s, ready("s2", Role::Slave, 2)];
        let a = decide(Desired { slaves: 2 }, &nodes, LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "s1".into(), reason: Reason::HeartbeatTimeout { silent_ms: 15_001 } },
                Action::Launch { role: Role::Slave, count: 1 },
            ]
        );
        // Exactly at the timeout is still alive.
        let mut s = ready("s1", Role::Slave, 1);
        s.since_heartbeat_ms = Some(15_000);
        assert!(decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s], LIMITS).is_empty());
    }

    #[test]
    fn gone_instance_is_replaced() {
        let mut s = ready("s1", Role::Slave, 1);
        s.instance = Instance::Gone;
        let a = decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "s1".into(), reason: Reason::InstanceGone },
                Action::Launch { role: Role::Slave, count: 1 },
            ]
        );
    }

    #[test]
    fn master_loss_launches_a_new_master_and_keeps_slaves() {
        let mut m = ready("m", Role::Master, 0);
        m.since_heartbeat_ms = Some(20_000);
        let a = decide(Desired { slaves: 1 }, &[m, ready("s1", Role::Slave, 1)], LIMITS);
        assert_eq!(
            a,
            vec![
                Action::Terminate { id: "m".into(), reason: Reason::HeartbeatTimeout { silent_ms: 20_000 } },
                Action::Launch { role: Role::Master, count: 1 },
            ]
        );
    }

    #[test]
    fn boot_deadline() {
        let mut s = node("s1", Role::Slave, NodeState::Booting, 1);
        s.since_launch_ms = 60_001;
        s.since_heartbeat_ms = None;
        let a = decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::BootTimeout)]);
    }

    #[test]
    fn requested_but_not_yet_listed_is_waited_for() {
        let mut s = node("s1", Role::Slave, NodeState::Requested, 1);
        s.instance = Instance::NotListed;
        assert!(decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s.clone()], LIMITS).is_empty());
        // ...but a booted node missing from the listing has vanished.
        s.state = NodeState::Booting;
        let a = decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(terminated(&a), vec![("s1", &Reason::InstanceGone)]);
    }

    #[test]
    fn requested_and_running_becomes_booting() {
        let s = node("s1", Role::Slave, NodeState::Requested, 1);
        let a = decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), s], LIMITS);
        assert_eq!(a, vec![Action::MarkBooting { id: "s1".into() }]);
    }

    #[test]
    fn terminating_nodes_are_forgotten_once_gone_and_not_counted() {
        let mut t = node("s1", Role::Slave, NodeState::Terminating, 1);
        let nodes = [ready("m", Role::Master, 0), t.clone()];
        // Still alive: wait, but do not count it (the replacement is launched).
        assert_eq!(
            decide(Desired { slaves: 1 }, &nodes, LIMITS),
            vec![Action::Launch { role: Role::Slave, count: 1 }]
        );
        t.instance = Instance::Gone;
        assert_eq!(
            decide(Desired { slaves: 0 }, &[ready("m", Role::Master, 0), t], LIMITS),
            vec![Action::Forget { id: "s1".into() }]
        );
    }

    #[test]
    fn failed_nodes_are_kept_and_counted() {
        let f = node("s1", Role::Slave, NodeState::Failed { step: "post_init".into() }, 1);
        assert!(decide(Desired { slaves: 1 }, &[ready("m", Role::Master, 0), f], LIMITS).is_empty());
    }

    #[test]
    fn extra_master_is_removed_keeping_the_ready_one() {
        let nodes = [node("m2", Role::Master, NodeState::Booting, 3), ready("m1", Role::Master, 0)];
        let a = decide(Desired { slaves: 0 }, &nodes, LIMITS);
        assert_eq!(terminated(&a), vec![("m2", &Reason::ExtraMaster)]);
    }
}
