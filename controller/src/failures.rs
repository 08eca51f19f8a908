//! The failure budget, as plain functions: a failed node is terminated and
//! replaced (a failed node must not bill for nothing), but the same step
//! failing on `failure_budget` nodes within `failure_window_mins` is a
//! crash loop: replacements of the roles it hit are held, the cluster stays
//! short, and status says why, until the oldest of those failures leaves
//! the window (then one more try), like a crash-loop back-off, or until the
//! controller is restarted (failures are not saved: a fixed configuration
//! starts afresh).

use crate::model::{Role, span};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One node that failed (kept in the registry, bounded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub unix_ms: u64,
    pub node: String,
    pub role: Role,
    /// The step that failed (or what was refused: `hello`, `attribute`...).
    pub step: String,
}

/// Failures kept (older ones cannot matter to a budget of at most this).
pub const MAX_FAILURES: usize = 64;

/// Replacements held back by the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub step: String,
    /// The roles whose launches wait.
    pub roles: BTreeSet<Role>,
    /// The nodes that failed it within the window, oldest first.
    pub nodes: Vec<String>,
    /// When the oldest of them leaves the window (unix ms).
    pub until_unix_ms: u64,
}

/// The hold in force at `now`, if a step failed on `budget` nodes (or
/// more) within `window_ms`; `budget = 0`: never.
pub fn hold(failures: &[Failure], now_unix_ms: u64, budget: u32, window_ms: u64) -> Option<Hold> {
    if budget == 0 {
        return None;
    }
    let recent: Vec<&Failure> =
        failures.iter().filter(|f| now_unix_ms.saturating_sub(f.unix_ms) < window_ms).collect();
    let steps: BTreeSet<&str> = recent.iter().map(|f| f.step.as_str()).collect();
    steps.into_iter().find_map(|step| {
        let of: Vec<&&Failure> = recent.iter().filter(|f| f.step == step).collect();
        (of.len() >= budget as usize).then(|| Hold {
            step: step.to_string(),
            roles: of.iter().map(|f| f.role).collect(),
            nodes: of.iter().map(|f| f.node.clone()).collect(),
            until_unix_ms: of.iter().map(|f| f.unix_ms).min().unwrap_or(now_unix_ms) + window_ms,
        })
    })
}

/// The event when a hold starts (no time in it: said once).
pub fn event(h: &Hold) -> String {
    let roles: Vec<String> = h.roles.iter().map(|r| r.to_string()).collect();
    format!(
        "FAILURE BUDGET: step {} failed on {} nodes ({}) within failure_window_mins: failed {} nodes are \
         terminated but not replaced for now; see status",
        h.step,
        h.nodes.len(),
        h.nodes.join(", "),
        roles.join(" and "),
    )
}

/// The status line of a hold.
pub fn note(h: &Hold, now_unix_ms: u64) -> String {
    let roles: Vec<String> = h.roles.iter().map(|r| r.to_string()).collect();
    format!(
        "FAILURE BUDGET: step {} failed on {} nodes ({}) within failure_window_mins: no {} is launched for {} \
         (then one more try); see `ddisco-controller logs {}`, fix the step, and restart serve (the budget \
         starts afresh)",
        h.step,
        h.nodes.len(),
        h.nodes.join(", "),
        roles.join(" or "),
        span(h.until_unix_ms.saturating_sub(now_unix_ms) as f64 / 1000.0),
        h.nodes.last().map(String::as_str).unwrap_or("NODE"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(unix_ms: u64, node: &str, role: Role, step: &str) -> Failure {
        Failure { unix_ms, node: node.into(), role, step: step.into() }
    }

    const MIN: u64 = 60_000;

    #[test]
    fn the_same_step_failing_on_three_nodes_in_the_window_holds_their_role() {
        let fs = vec![
            f(0, "slave-0002", Role::Slave, "post_init"),
            f(MIN, "slave-0003", Role::Slave, "post_init"),
            f(2 * MIN, "slave-0004", Role::Slave, "apt"),
        ];
        // Two of one step: under the budget.
        assert_eq!(hold(&fs, 3 * MIN, 3, 30 * MIN), None);
        let mut fs = fs;
        fs.push(f(3 * MIN, "slave-0005", Role::Slave, "post_init"));
        let h = hold(&fs, 4 * MIN, 3, 30 * MIN).expect("held");
        assert_eq!(h.step, "post_init");
        assert_eq!(h.roles, BTreeSet::from([Role::Slave]));
        assert_eq!(h.nodes, ["slave-0002", "slave-0003", "slave-0005"]);
        assert_eq!(h.until_unix_ms, 30 * MIN);
        // The oldest leaves the window: one more try is allowed.
        assert_eq!(hold(&fs, 30 * MIN, 3, 30 * MIN), None);
        // Off.
        assert_eq!(hold(&fs, 4 * MIN, 0, 30 * MIN), None);
    }

    #[test]
    fn the_note_says_what_failed_where_and_for_how_long() {
        let fs: Vec<Failure> =
            (0..3).map(|i| f(i * MIN, &format!("slave-000{}", i + 2), Role::Slave, "post_init")).collect();
        let h = hold(&fs, 3 * MIN, 3, 30 * MIN).unwrap();
        let n = note(&h, 3 * MIN);
        assert!(n.contains("step post_init failed on 3 nodes (slave-0002, slave-0003, slave-0004)"), "{n}");
        assert!(n.contains("27 min") && n.contains("logs slave-0004"), "{n}");
    }
}
