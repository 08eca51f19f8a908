//! On-demand fallback: when a pool keeps failing on the spot market, launch
//! it on-demand for a while. Plain data; the EC2 provider feeds it events
//! and asks it which market to use.
//!
//! # Rules
//! - Per pool (the master is the pool `master`), two kinds of events are
//!   kept for `window`: spot launch failures for capacity or price, and spot
//!   interruptions (notices relayed by agents).
//! - A pool whose role the policy covers launches **on-demand** while it has
//!   at least `failures` failures or `interruptions` interruptions in the
//!   window. The reason names the count and the last event.
//! - It is back on **spot** once the window has passed without new events
//!   (events age out). On-demand launches add no spot failures, so a pool
//!   does not stay on-demand for ever: after a quiet window the next launch
//!   tries spot again, and falls back again only if spot fails again
//!   `failures` times.

use crate::config::FallbackRoles;
use crate::model::Role;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The fallback settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub roles: FallbackRoles,
    pub failures: u32,
    pub interruptions: u32,
    pub window: Duration,
}

/// Where a pool launches now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Market {
    Spot,
    OnDemand { why: String },
}

#[derive(Debug, Default)]
struct History {
    failures: VecDeque<(Instant, String)>,
    interruptions: VecDeque<(Instant, String)>,
    /// When the pool went on-demand (for status); `None` on spot.
    since: Option<Instant>,
}

/// Spot failures and interruptions per pool.
#[derive(Debug, Default)]
pub struct Book {
    pools: HashMap<String, History>,
}

impl Book {
    /// A spot launch of `pool` failed for capacity or price.
    pub fn spot_failed(&mut self, pool: &str, now: Instant, why: String) {
        self.pools.entry(pool.to_string()).or_default().failures.push_back((now, why));
    }

    /// A spot node of `pool` got an interruption notice.
    pub fn interrupted(&mut self, pool: &str, now: Instant, node: &str) {
        self.pools.entry(pool.to_string()).or_default().interruptions.push_back((now, node.to_string()));
    }

    /// Where `pool` (of `role`) launches now.
    pub fn market(&mut self, policy: &Policy, role: Role, pool: &str, now: Instant) -> Market {
        let Some(h) = self.pools.get_mut(pool) else { return Market::Spot };
        for q in [&mut h.failures, &mut h.interruptions] {
            while q.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) >= policy.window) {
                q.pop_front();
            }
        }
        let window = policy.window.as_secs_f64();
        let why = if !policy.roles.covers(role) {
            None
        } else if h.failures.len() >= policy.failures as usize {
            let last = h.failures.back().map(|(_, w)| w.as_str()).unwrap_or("");
            Some(format!(
                "{} in the last {window:.0}s (last: {last})",
                plural(h.failures.len(), "spot launch failure")
            ))
        } else if h.interruptions.len() >= policy.interruptions as usize {
            let last = h.interruptions.back().map(|(_, w)| w.as_str()).unwrap_or("");
            Some(format!(
                "{} in the last {window:.0}s (last: {last})",
                plural(h.interruptions.len(), "spot interruption")
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                h.since.get_or_insert(now);
                Market::OnDemand { why }
            }
            None => {
                h.since = None;
                Market::Spot
            }
        }
    }

    /// Pools on-demand now, with since when and why (for status).
    pub fn on_demand_pools(&mut self, policy: &Policy, now: Instant) -> Vec<(String, Duration, String)> {
        let mut keys: Vec<String> = self.pools.keys().cloned().collect();
        keys.sort();
        let mut out = Vec::new();
        for pool in keys {
            let role = if pool == crate::config::MASTER_POOL { Role::Master } else { Role::Slave };
            if let Market::OnDemand { why } = self.market(policy, role, &pool, now) {
                let since =
                    self.pools[&pool].since.map(|s| now.saturating_duration_since(s)).unwrap_or_default();
                out.push((pool, since, why));
            }
        }
        out
    }
}

/// "1 thing", "2 things".
fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        roles: FallbackRoles::Slaves,
        failures: 3,
        interruptions: 2,
        window: Duration::from_secs(600),
    };

    #[test]
    fn repeated_spot_failures_switch_a_pool_to_on_demand_until_a_quiet_window() {
        let mut b = Book::default();
        let t0 = Instant::now();
        assert_eq!(b.market(&P, Role::Slave, "a", t0), Market::Spot);
        for i in 0..2 {
            b.spot_failed(
                "a",
                t0 + Duration::from_secs(i * 60),
                format!("c5.large: InsufficientInstanceCapacity #{i}"),
            );
        }
        assert_eq!(b.market(&P, Role::Slave, "a", t0 + Duration::from_secs(130)), Market::Spot);
        b.spot_failed("a", t0 + Duration::from_secs(140), "c5.large: SpotMaxPriceTooLow".into());
        let Market::OnDemand { why } = b.market(&P, Role::Slave, "a", t0 + Duration::from_secs(150)) else {
            panic!("not on-demand")
        };
        assert!(why.contains("3 spot launch failures") && why.contains("SpotMaxPriceTooLow"), "{why}");
        // Other pools are not affected.
        assert_eq!(b.market(&P, Role::Slave, "b", t0 + Duration::from_secs(150)), Market::Spot);
        assert_eq!(b.on_demand_pools(&P, t0 + Duration::from_secs(200)).len(), 1);
        // The first failure ages out at 600 s: 2 left, spot again.
        assert_eq!(b.market(&P, Role::Slave, "a", t0 + Duration::from_secs(600)), Market::Spot);
        assert!(b.on_demand_pools(&P, t0 + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn interruptions_count_separately_and_roles_are_respected() {
        let mut b = Book::default();
        let t0 = Instant::now();
        b.interrupted("a", t0, "slave-1");
        b.spot_failed("a", t0, "x".into());
        assert_eq!(b.market(&P, Role::Slave, "a", t0), Market::Spot);
        b.interrupted("a", t0 + Duration::from_secs(1), "slave-2");
        let Market::OnDemand { why } = b.market(&P, Role::Slave, "a", t0 + Duration::from_secs(2)) else {
            panic!("not on-demand")
        };
        assert!(why.contains("2 spot interruptions") && why.contains("slave-2"), "{why}");
        // The policy covers slaves only: the master stays spot whatever happens.
        for i in 0..5 {
            b.spot_failed("master", t0, format!("{i}"));
        }
        assert_eq!(b.market(&P, Role::Master, "master", t0), Market::Spot);
        let both = Policy { roles: FallbackRoles::Both, ..P };
        assert!(matches!(b.market(&both, Role::Master, "master", t0), Market::OnDemand { .. }));
        let none = Policy { roles: FallbackRoles::None, ..P };
        assert_eq!(b.market(&none, Role::Slave, "a", t0), Market::Spot);
    }
}
