//! What the operator does to a running cluster: `scale` (the admin API's
//! Scale) and `destroy` (its Destroy). The admin edge converts the request
//! and calls these.

use super::Cluster;
use crate::config::Pool;
use crate::model::Role;
use crate::reconcile::{Desired, distribute};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Most slaves one cluster may ask for.
pub const MAX_SLAVES: u32 = 100_000;

/// The result of `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaled {
    pub previous: u32,
    pub desired: u32,
    pub pools: BTreeMap<String, u32>,
}

/// The result of `destroy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Destroyed {
    /// Node ids (and instance ids of orphans) terminated.
    pub terminated: Vec<String>,
    pub spent_usd: f64,
}

/// Why a scale request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("the cluster is being destroyed")]
    Destroying,
    #[error("pools: {name:?} is not a configured pool (configured: {configured})")]
    UnknownPool { name: String, configured: String },
    #[error("slaves: {0} is more than {MAX_SLAVES}")]
    TooMany(u32),
    #[error("slaves: {min}..{max} is not a range of slaves (MIN..MAX, MIN <= MAX, without pools)")]
    BadRange { min: u32, max: u32 },
}

/// The slaves wanted per pool after a request: `slaves` spread over the
/// configured pools in proportion to their counts, or `by_pool` set by name
/// over `current`. Plain data; pools no longer configured are dropped.
pub fn desired_for(
    slaves: u32,
    by_pool: &HashMap<String, u32>,
    configured: &[Pool],
    current: &BTreeMap<String, u32>,
) -> Result<BTreeMap<String, u32>, ScaleError> {
    let mut desired = if by_pool.is_empty() {
        let weights: Vec<(String, u32)> = configured.iter().map(|p| (p.name.clone(), p.count)).collect();
        distribute(slaves, &weights)
    } else {
        let mut d = current.clone();
        for (name, n) in by_pool {
            if !configured.iter().any(|p| &p.name == name) {
                let names: Vec<&str> = configured.iter().map(|p| p.name.as_str()).collect();
                return Err(ScaleError::UnknownPool { name: name.clone(), configured: names.join(", ") });
            }
            d.insert(name.clone(), *n);
        }
        d
    };
    desired.retain(|name, _| configured.iter().any(|p| &p.name == name));
    let total: u64 = desired.values().map(|n| u64::from(*n)).sum();
    if total > u64::from(MAX_SLAVES) {
        return Err(ScaleError::TooMany(total.min(u64::from(u32::MAX)) as u32));
    }
    Ok(desired)
}

/// Sets the desired size. On-demand slaves of pools back on spot are marked
/// for replacement by spot ones (the other occasion is an idle cluster, in
/// `tick`).
pub fn scale(
    sh: &Cluster,
    slaves: u32,
    by_pool: &HashMap<String, u32>,
    max: Option<u32>,
) -> Result<Scaled, ScaleError> {
    if sh.destroying.load(Ordering::Relaxed) {
        return Err(ScaleError::Destroying);
    }
    let mut adaptive = sh.adaptive.lock().expect("adaptive lock");
    let Some(max) = max else {
        *adaptive = None;
        sh.registry.lock().expect("registry lock").set_adaptive_bounds(None);
        return set_size(sh, slaves, by_pool);
    };
    if !by_pool.is_empty() || max < slaves {
        return Err(ScaleError::BadRange { min: slaves, max });
    }
    if max > MAX_SLAVES {
        return Err(ScaleError::TooMany(max));
    }
    let bounds = crate::autoscale::Bounds { min: slaves, max };
    let current = {
        let mut reg = sh.registry.lock().expect("registry lock");
        reg.set_adaptive_bounds(Some((slaves, max)));
        reg.desired_slaves()
    };
    *adaptive = Some(crate::cluster::Adaptive {
        bounds,
        lower_since_ms: None,
        target_slaves: None,
        why: "waiting for the engine's target".into(),
    });
    drop(adaptive);
    set_size(sh, current.clamp(slaves, max), &HashMap::new())
}

/// Sets the desired size (an operator's `scale`, or an adaptive decision).
pub fn set_size(sh: &Cluster, slaves: u32, by_pool: &HashMap<String, u32>) -> Result<Scaled, ScaleError> {
    let scaled = {
        let mut reg = sh.registry.lock().expect("registry lock");
        let desired = desired_for(slaves, by_pool, &sh.cfg.pools(), &reg.desired)?;
        let previous = reg.set_desired(desired.clone());
        let views = reg.views(&Default::default(), 0, 0);
        let ids = crate::reconcile::supersede(&Desired { pools: desired.clone() }, &views, |pool| {
            sh.provider.spot_again(Role::Slave, pool)
        });
        reg.supersede(&ids, "");
        Scaled { previous, desired: desired.values().sum(), pools: desired }
    };
    // What the operator asked for is on disk before the answer.
    if let Err(e) = sh.save() {
        tracing::error!("cannot save the new size: {e:#}; it is kept in memory and saved at the next change");
    }
    sh.wake.notify_one();
    Ok(scaled)
}

/// Terminates every node of the cluster (and tagged orphans), cancels what
/// the provider left open, checks nothing is still running, and forgets the
/// nodes. No launch happens from the moment it starts.
pub async fn destroy(sh: &Arc<Cluster>) -> anyhow::Result<Destroyed> {
    sh.destroying.store(true, Ordering::Relaxed);
    let _guard = sh.tick_lock.lock().await;
    // Launches in flight end first: what they start is terminated too.
    let _launches = sh.launches.write().await;
    let observed = sh.provider.list().await?;
    let (targets, mut names) = {
        let mut reg = sh.registry.lock().expect("registry lock");
        let (_, orphans) = reg.match_observed(&observed);
        let mut targets = reg.terminate_all();
        let mut names: Vec<String> = targets.iter().filter_map(|t| t.node_id.clone()).collect();
        for o in orphans {
            names.push(o.node_id.clone().unwrap_or_else(|| o.instance_id.clone()));
            targets.push(crate::provider::Target { node_id: o.node_id, instance_id: Some(o.instance_id) });
        }
        (targets, names)
    };
    sh.provider.terminate(&targets).await?;
    let cancelled = sh.provider.cleanup().await?;
    let still: Vec<String> =
        sh.provider.list().await?.into_iter().filter(|o| o.alive).map(|o| o.instance_id).collect();
    anyhow::ensure!(still.is_empty(), "still running after terminate: {}", still.join(", "));
    let spent_usd = {
        let mut reg = sh.registry.lock().expect("registry lock");
        reg.forget_all();
        reg.event(format!("cluster destroyed: {} nodes terminated", names.len()));
        if !cancelled.is_empty() {
            reg.event(format!("cancelled open spot requests: {}", cancelled.join(", ")));
        }
        reg.spent_usd
    };
    sh.save()?;
    names.sort();
    Ok(Destroyed { terminated: names, spent_usd })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Vec<Pool> {
        vec![
            Pool { name: "a".into(), instance_types: vec!["x".into()], count: 2 },
            Pool { name: "b".into(), instance_types: vec!["y".into()], count: 1 },
        ]
    }

    #[test]
    fn a_total_is_spread_and_pools_are_set_by_name() {
        let d = desired_for(6, &HashMap::new(), &pools(), &BTreeMap::new()).unwrap();
        assert_eq!(d, BTreeMap::from([("a".into(), 4), ("b".into(), 2)]));
        let by = HashMap::from([("b".to_string(), 5)]);
        let d = desired_for(0, &by, &pools(), &d).unwrap();
        assert_eq!(d, BTreeMap::from([("a".into(), 4), ("b".into(), 5)]));
    }

    #[test]
    fn unknown_pools_and_huge_sizes_are_refused() {
        let by = HashMap::from([("c".to_string(), 1)]);
        assert!(matches!(
            desired_for(0, &by, &pools(), &BTreeMap::new()),
            Err(ScaleError::UnknownPool { .. })
        ));
        let by = HashMap::from([("a".to_string(), u32::MAX), ("b".to_string(), u32::MAX)]);
        assert!(matches!(desired_for(0, &by, &pools(), &BTreeMap::new()), Err(ScaleError::TooMany(_))));
        assert_eq!(
            desired_for(MAX_SLAVES + 1, &HashMap::new(), &pools(), &BTreeMap::new()),
            Err(ScaleError::TooMany(MAX_SLAVES + 1))
        );
    }
}
