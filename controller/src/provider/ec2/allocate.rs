//! Where a launch goes: every (instance type, subnet) candidate of a pool
//! considered together, ranked by spot price per vCPU, with capacity
//! learned from EC2's answers (a candidate without capacity cools down, one
//! whose nodes got spot notices goes last) and, with `spread = "zones"`,
//! the zone holding the fewest of the role's nodes first. Plain functions
//! over plain data: the provider gathers prices, vCPUs and placements, and
//! walks the ranking in order (see `launch.rs`).

use crate::config::Spread;
use std::collections::HashMap;

/// One place a batch could launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub itype: String,
    /// `None`: EC2 picks the subnet (no default VPC found).
    pub subnet: Option<String>,
    /// The subnet's zone, when known.
    pub zone: Option<String>,
    /// 0: the pool's own types (for the master, its own type); 1: another
    /// pool's types, tried only after every own one (overflow).
    pub tier: u8,
}

/// What is known of a candidate when ranking.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quote {
    /// Newest spot price of its (type, zone), USD per hour.
    pub price: Option<f64>,
    pub vcpus: Option<u32>,
}

impl Quote {
    /// USD per vCPU-hour (a type of unknown vCPUs counts as one vCPU, so
    /// it never looks cheaper than it is).
    pub fn per_vcpu(&self) -> Option<f64> {
        Some(self.price? / f64::from(self.vcpus.unwrap_or(1).max(1)))
    }
}

/// A candidate in its place in the ranking, and why it is there.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub candidate: Candidate,
    pub quote: Quote,
    /// Why it ranks where it does (status shows it for the nodes it gets).
    pub why: String,
}

/// What the ranking weighs besides the candidates.
pub struct Weights<'a> {
    pub spread: Spread,
    /// The role's live nodes per zone (for `spread`).
    pub in_zone: &'a HashMap<String, usize>,
    /// `max_bid`: a candidate whose spot price is above it would be refused
    /// (EC2's `SpotMaxPriceTooLow`): ranked last.
    pub max_bid: Option<f64>,
}

/// Ranks the candidates: own pool before overflow; with `spread =
/// "zones"` the zone with the fewest of the role's nodes first; then the
/// lowest spot price per vCPU; candidates without a known price after the
/// priced ones, in config order (the order given). Candidates priced above
/// `max_bid` go last. Stable: equal candidates keep the config order.
pub fn rank(candidates: Vec<(Candidate, Quote)>, w: &Weights) -> Vec<Ranked> {
    let zone_count = |c: &Candidate| c.zone.as_ref().map_or(0, |z| w.in_zone.get(z).copied().unwrap_or(0));
    let above_bid = |q: &Quote| matches!((q.price, w.max_bid), (Some(p), Some(b)) if p > b);
    let spread = w.spread == Spread::Zones;
    let mut order: Vec<(Candidate, Quote)> = candidates;
    order.sort_by(|(a, qa), (b, qb)| {
        let key = |c: &Candidate, q: &Quote| (above_bid(q), c.tier, if spread { zone_count(c) } else { 0 });
        key(a, qa).cmp(&key(b, qb)).then_with(|| match (qa.per_vcpu(), qb.per_vcpu()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        })
    });
    let priced = order.iter().filter(|(_, q)| q.price.is_some()).count();
    let total = order.len();
    let mut by_price = 0;
    order
        .into_iter()
        .map(|(c, q)| {
            let mut why = Vec::new();
            if above_bid(&q) {
                why.push(format!(
                    "spot price ${:.4}/hour is above max_bid ${:.4}: tried last",
                    q.price.unwrap_or(0.0),
                    w.max_bid.unwrap_or(0.0)
                ));
            } else {
                if c.tier > 0 {
                    why.push("overflow: another pool's type, tried after every one of its own".to_string());
                }
                if spread && let Some(z) = &c.zone {
                    why.push(format!("spread over zones: {z} held {} of the role's nodes", zone_count(&c)));
                }
                match q.per_vcpu() {
                    Some(v) => {
                        by_price += 1;
                        why.push(format!(
                            "{} by spot price of {priced} priced candidates (${v:.4}/vCPU-hour, ${:.4}/hour)",
                            ordinal(by_price),
                            q.price.unwrap_or(0.0)
                        ));
                    }
                    None => why.push("no spot price known: in config order".to_string()),
                }
            }
            let mut why = why.join("; ");
            if priced < total {
                why.push_str(&format!(" ({total} candidates)"));
            }
            Ranked { candidate: c, quote: q, why }
        })
        .collect()
}

/// With `spread = "zones"`: how many of `want` nodes one call may put in a
/// zone that holds `here` of the role's `total` nodes: up to its even
/// share of `total + want` over `zones` zones, at least 1 (the zone asked
/// holds the fewest, so the zones end up within one node of each other;
/// the rest are launched at the next tick, in the zones then holding
/// fewest).
pub fn spread_cap(want: usize, here: usize, total: usize, zones: usize) -> usize {
    if zones <= 1 {
        return want;
    }
    let share = (total + want) / zones;
    share.saturating_sub(here).clamp(1, want.max(1))
}

fn ordinal(n: usize) -> String {
    match n {
        1 => "cheapest".into(),
        2 => "2nd".into(),
        3 => "3rd".into(),
        n => format!("{n}th"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(t: &str, zone: &str, tier: u8) -> Candidate {
        Candidate { itype: t.into(), subnet: Some(format!("subnet-{zone}")), zone: Some(zone.into()), tier }
    }

    fn quote(price: Option<f64>, vcpus: u32) -> Quote {
        Quote { price, vcpus: Some(vcpus) }
    }

    fn names(r: &[Ranked]) -> Vec<String> {
        r.iter()
            .map(|r| format!("{}@{}", r.candidate.itype, r.candidate.zone.as_deref().unwrap_or("-")))
            .collect()
    }

    #[test]
    fn the_cheapest_per_vcpu_goes_first_and_unpriced_ones_keep_config_order_after() {
        let none = HashMap::new();
        let w = Weights { spread: Spread::None, in_zone: &none, max_bid: None };
        let r = rank(
            vec![
                (cand("c5.large", "a", 0), quote(Some(0.040), 2)),
                (cand("c5.xlarge", "a", 0), quote(Some(0.060), 4)), // 0.015 per vCPU
                (cand("m5.large", "b", 0), quote(None, 2)),
                (cand("c5.large", "b", 0), quote(Some(0.034), 2)),
                (cand("r5.large", "a", 0), quote(None, 2)),
            ],
            &w,
        );
        assert_eq!(names(&r), ["c5.xlarge@a", "c5.large@b", "c5.large@a", "m5.large@b", "r5.large@a"]);
        assert!(
            r[0].why.starts_with("cheapest by spot price of 3 priced candidates ($0.0150/vCPU-hour"),
            "{}",
            r[0].why
        );
        assert!(r[3].why.contains("no spot price known"), "{}", r[3].why);
    }

    #[test]
    fn the_pools_own_types_come_before_overflow_and_prices_above_max_bid_last() {
        let none = HashMap::new();
        let w = Weights { spread: Spread::None, in_zone: &none, max_bid: Some(0.05) };
        let r = rank(
            vec![
                (cand("m5.large", "a", 1), quote(Some(0.010), 2)),
                (cand("c5.large", "a", 0), quote(Some(0.080), 2)),
                (cand("c5.large", "b", 0), quote(Some(0.040), 2)),
            ],
            &w,
        );
        assert_eq!(names(&r), ["c5.large@b", "m5.large@a", "c5.large@a"]);
        assert!(r[1].why.contains("overflow"), "{}", r[1].why);
        assert!(r[2].why.contains("above max_bid"), "{}", r[2].why);
    }

    #[test]
    fn spread_puts_the_emptiest_zone_first_and_caps_what_one_call_puts_there() {
        let in_zone: HashMap<String, usize> = [("a".to_string(), 3), ("b".to_string(), 1)].into();
        let w = Weights { spread: Spread::Zones, in_zone: &in_zone, max_bid: None };
        let r = rank(
            vec![
                (cand("c5.large", "a", 0), quote(Some(0.01), 2)),
                (cand("c5.large", "b", 0), quote(Some(0.03), 2)),
                (cand("c5.large", "c", 0), quote(Some(0.05), 2)),
            ],
            &w,
        );
        assert_eq!(names(&r), ["c5.large@c", "c5.large@b", "c5.large@a"]);
        assert!(r[0].why.contains("c held 0"), "{}", r[0].why);
        // 10 nodes over 3 empty zones: 3, 3, 3, then 1 (4/3/3).
        assert_eq!(spread_cap(10, 0, 0, 3), 3);
        assert_eq!(spread_cap(7, 0, 3, 3), 3);
        assert_eq!(spread_cap(4, 0, 6, 3), 3);
        assert_eq!(spread_cap(1, 3, 9, 3), 1);
        // 6 over 5: one each, then the sixth (2/1/1/1/1), never 2/2/2.
        assert_eq!(spread_cap(6, 0, 0, 5), 1);
        assert_eq!(spread_cap(1, 1, 5, 5), 1);
        // A zone already over its share still takes one (progress).
        assert_eq!(spread_cap(1, 5, 6, 3), 1);
        // One zone, or no spread: all at once.
        assert_eq!(spread_cap(10, 0, 0, 1), 10);
    }
}
