//! What the operator does to a running cluster: `scale` (the admin API's
//! Scale) and `destroy` (its Destroy). The admin edge converts the request
//! and calls these.

use super::Cluster;
use crate::config::Pool;
use crate::model::Role;
use crate::provider::{Observed, Provider, Target};
use crate::reconcile::{Desired, distribute};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
    if !sh.policies.lock().lifecycle.ticks() {
        return Err(ScaleError::Destroying);
    }
    let Some(max) = max else {
        sh.registry.lock().set_adaptive_bounds(None);
        return set_size(sh, slaves, by_pool);
    };
    if !by_pool.is_empty() || max < slaves {
        return Err(ScaleError::BadRange { min: slaves, max });
    }
    if max > MAX_SLAVES {
        return Err(ScaleError::TooMany(max));
    }
    // The range is the registry's (saved with it); the policies keep the
    // adaptive size's memory, started afresh.
    sh.policies.lock().adaptive = Default::default();
    let current = {
        let mut reg = sh.registry.lock();
        reg.set_adaptive_bounds(Some((slaves, max)));
        reg.desired_slaves()
    };
    set_size(sh, current.clamp(slaves, max), &HashMap::new())
}

/// Sets the desired size (an operator's `scale`, or an adaptive decision).
pub fn set_size(sh: &Cluster, slaves: u32, by_pool: &HashMap<String, u32>) -> Result<Scaled, ScaleError> {
    set_size_if(sh, slaves, by_pool, None).map(|s| s.expect("no range to check"))
}

/// An adaptive decision's size, taken only while the range it was decided
/// in is still in force (checked under the registry's lock: an operator's
/// `scale` in between wins). `None`: the range changed, nothing done.
pub fn adapt_size(sh: &Cluster, slaves: u32, range: (u32, u32)) -> Result<Option<Scaled>, ScaleError> {
    set_size_if(sh, slaves, &HashMap::new(), Some(range))
}

fn set_size_if(
    sh: &Cluster,
    slaves: u32,
    by_pool: &HashMap<String, u32>,
    range: Option<(u32, u32)>,
) -> Result<Option<Scaled>, ScaleError> {
    let scaled = {
        let mut reg = sh.registry.lock();
        if range.is_some() && reg.adaptive_bounds() != range {
            return Ok(None);
        }
        let desired = desired_for(slaves, by_pool, &sh.cfg.pools(), &reg.desired)?;
        let previous = reg.set_desired(desired.clone());
        let views = reg.views(&Default::default(), 0, 0);
        let ids = crate::reconcile::supersede(
            &Desired { pools: desired.clone(), ..Default::default() },
            &views,
            |pool| sh.provider.spot_again(Role::Slave, pool),
        );
        reg.supersede(&ids, "");
        Scaled { previous, desired: desired.values().sum(), pools: desired }
    };
    // What the operator asked for is on disk before the answer.
    if let Err(e) = sh.save() {
        tracing::error!("cannot save the new size: {e:#}; it is kept in memory and saved at the next change");
    }
    sh.wake.notify_one();
    Ok(Some(scaled))
}

/// How long `destroy` keeps terminating and listing before it says what
/// is left (EC2 moves a terminated instance out of "running" in seconds).
pub const DESTROY_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Terminates every node of the cluster (and its tagged orphans), cancels
/// its open spot requests, and lists again until none of its instances is
/// left alive (`terminate_verified`); only then forgets the nodes. No
/// launch happens from the moment it starts. Only this cluster's
/// instances are touched or waited for: another cluster's with the same
/// `tag_key` never are. On failure the nodes stay recorded (terminating),
/// so a later `destroy` (or the reconcile loop) finishes the job; the
/// error names what is still running.
pub async fn destroy(sh: &Arc<Cluster>) -> anyhow::Result<Destroyed> {
    {
        let mut p = sh.policies.lock();
        if let Some(next) = p.lifecycle.on(crate::lifecycle::LifeEvent::Destroy) {
            p.lifecycle = next;
        }
    }
    let _guard = sh.tick_lock.lock().await;
    // Launches in flight end first: what they start is terminated too.
    let _launches = sh.launches.write().await;
    let observed = sh.provider.list().await?;
    let (targets, mut names) = {
        let mut reg = sh.registry.lock();
        let (_, orphans) = reg.match_observed(&observed);
        let mut targets = reg.terminate_all();
        let mut names: Vec<String> = targets.iter().filter_map(|t| t.node_id.clone()).collect();
        for o in orphans {
            names.push(o.node_id.clone().unwrap_or_else(|| o.instance_id.clone()));
            targets.push(crate::provider::Target { node_id: o.node_id, instance_id: Some(o.instance_id) });
        }
        (targets, names)
    };
    sh.changed();
    let cancelled = match terminate_verified(sh.provider.as_ref(), targets, DESTROY_WITHIN).await {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("DESTROY INCOMPLETE: {e:#}");
            tracing::error!("{msg}");
            sh.registry.lock().event(msg.clone());
            sh.policies.lock().destroy_error = Some(msg);
            return Err(e);
        }
    };
    sh.policies.lock().destroy_error = None;
    let spent_usd = {
        let mut reg = sh.registry.lock();
        reg.forget_all();
        reg.event(format!("cluster destroyed: {} nodes terminated", names.len()));
        if !cancelled.is_empty() {
            reg.event(format!("cancelled open spot requests: {}", cancelled.join(", ")));
        }
        reg.spent_usd
    };
    sh.save()?;
    retire_pki(&sh.cfg.state_dir);
    names.sort();
    Ok(Destroyed { terminated: names, spent_usd })
}

/// After a completed destroy: the cluster's CAs are retired (`pki::retire`),
/// so nothing issued to its nodes or users is trusted by the next cluster
/// of this state directory. A failure is logged; the destroy stands.
pub fn retire_pki(state_dir: &std::path::Path) {
    match crate::pki::retire(state_dir) {
        Ok(gone) if !gone.is_empty() => {
            tracing::info!(
                "the cluster's CAs are retired: nothing they issued is trusted by the next cluster"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::error!(
            "cannot retire the destroyed cluster's CAs ({e}); remove ca.* and engine-ca.* from the state directory \
             before the next serve, or it trusts what this cluster issued"
        ),
    }
}

/// Which listed instances a destroy must see gone: this cluster's own
/// (`!foreign`), and any instance recorded for one of its nodes (an
/// instance from before clusters were tagged with their id), alive.
pub fn left_alive(observed: &[Observed], targets: &[Target]) -> Vec<Target> {
    observed
        .iter()
        .filter(|o| o.alive)
        .filter(|o| {
            !o.foreign || targets.iter().any(|t| t.instance_id.as_deref() == Some(o.instance_id.as_str()))
        })
        .map(|o| Target {
            node_id: targets
                .iter()
                .find(|t| t.instance_id.as_deref() == Some(o.instance_id.as_str()))
                .and_then(|t| t.node_id.clone())
                .or_else(|| o.node_id.clone()),
            instance_id: Some(o.instance_id.clone()),
        })
        .collect()
}

/// Terminates `targets`, cancels the cluster's open spot requests, and
/// lists until none of the cluster's instances is alive, terminating what
/// is left again, with backoff (0.5 s doubling to 10 s), for at most
/// `within`. Returns the cancelled spot requests; the error names every
/// instance still running and the last failure. Failed calls (throttling,
/// a network blip) are retried, not final.
pub async fn terminate_verified(
    p: &dyn Provider,
    targets: Vec<Target>,
    within: std::time::Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut wait = std::time::Duration::from_millis(500);
    let mut pending = targets.clone();
    let mut cancelled = Vec::new();
    loop {
        let mut failure = None;
        if !pending.is_empty()
            && let Err(e) = p.terminate(&pending).await
        {
            failure = Some(format!("terminating: {e}"));
        }
        match p.cleanup().await {
            Ok(c) => cancelled.extend(c),
            Err(e) => failure = Some(format!("cancelling open spot requests: {e}")),
        }
        match p.list().await {
            Ok(observed) => {
                pending = left_alive(&observed, &targets);
                if pending.is_empty() && failure.is_none() {
                    cancelled.sort();
                    cancelled.dedup();
                    return Ok(cancelled);
                }
            }
            Err(e) => failure = Some(format!("listing the cluster's instances: {e}")),
        }
        if tokio::time::Instant::now() + wait > deadline {
            let names: Vec<String> = pending
                .iter()
                .map(|t| match (&t.node_id, &t.instance_id) {
                    (Some(n), Some(i)) => format!("{n} ({i})"),
                    (None, Some(i)) => i.clone(),
                    (Some(n), None) => n.clone(),
                    (None, None) => "?".into(),
                })
                .collect();
            let left = if names.is_empty() {
                "could not check that every instance is gone".to_string()
            } else {
                format!("still running after {}s of terminating: {}", within.as_secs(), names.join(", "))
            };
            anyhow::bail!(
                "{left}{}; run `ddisco-controller destroy --yes` again, or terminate them in the provider's \
                 console",
                failure.map(|f| format!(" (last failure: {f})")).unwrap_or_default()
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NodeLayout;
    use crate::provider::{LaunchBatch, Launched, ProviderError};
    use parking_lot::Mutex;
    use std::time::Duration;

    /// Stands in for EC2 as a destroy sees it: terminations take effect
    /// only after some listings (eventual consistency), a call may be
    /// throttled, and another cluster with the same tag_key has instances
    /// in the same listing.
    #[derive(Default)]
    struct Slow {
        /// instance id -> (foreign, listings left while alive after a terminate).
        instances: Mutex<Vec<(String, bool, Option<u32>)>>,
        throttle_terminates: Mutex<u32>,
        terminated: Mutex<Vec<String>>,
        stuck: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Provider for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn layout(&self, _: &str) -> NodeLayout {
            unimplemented!("not used by destroy")
        }
        fn address_for(&self, _: u64) -> String {
            String::new()
        }
        fn max_batch(&self) -> usize {
            1
        }
        async fn launch(&self, _: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
            Err(ProviderError::Other("no launches here".into()))
        }
        async fn list(&self) -> Result<Vec<Observed>, ProviderError> {
            let mut v = self.instances.lock();
            Ok(v.iter_mut()
                .map(|(id, foreign, left)| {
                    let alive = match left {
                        None => true,
                        Some(0) => self.stuck.lock().contains(id),
                        Some(n) => {
                            *n -= 1;
                            true
                        }
                    };
                    Observed { instance_id: id.clone(), node_id: None, batch: None, alive, foreign: *foreign }
                })
                .collect())
        }
        async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError> {
            let mut t = self.throttle_terminates.lock();
            if *t > 0 {
                *t -= 1;
                return Err(ProviderError::Throttled("RequestLimitExceeded".into()));
            }
            for target in targets {
                let id = target.instance_id.clone().unwrap();
                self.terminated.lock().push(id.clone());
                for (i, _, left) in self.instances.lock().iter_mut() {
                    if *i == id && left.is_none() {
                        *left = Some(2);
                    }
                }
            }
            Ok(())
        }
    }

    fn target(id: &str) -> Target {
        Target { node_id: Some(format!("node-{id}")), instance_id: Some(id.into()) }
    }

    /// Issue 22, item 3: a destroy waits until its own instances are gone
    /// (throttled calls and slow listings retried), never for another
    /// cluster's, and never terminates those.
    #[tokio::test]
    async fn a_destroy_is_verified_on_its_own_instances_only() {
        let p = Slow::default();
        *p.instances.lock() =
            vec![("i-a1".into(), false, None), ("i-a2".into(), false, None), ("i-b1".into(), true, None)];
        *p.throttle_terminates.lock() = 1;
        terminate_verified(&p, vec![target("i-a1"), target("i-a2")], Duration::from_secs(20)).await.unwrap();
        let listed = p.list().await.unwrap();
        assert!(listed.iter().filter(|o| !o.foreign).all(|o| !o.alive), "{listed:?}");
        assert!(listed.iter().any(|o| o.foreign && o.alive));
        assert!(!p.terminated.lock().contains(&"i-b1".to_string()));
    }

    /// What will not go is named, with the node, after the deadline.
    #[tokio::test]
    async fn an_instance_that_will_not_go_is_named() {
        let p = Slow::default();
        *p.instances.lock() = vec![("i-a1".into(), false, None), ("i-a2".into(), false, None)];
        p.stuck.lock().push("i-a2".into());
        let e = terminate_verified(&p, vec![target("i-a1"), target("i-a2")], Duration::from_secs(4))
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("node-i-a2 (i-a2)") && !e.contains("i-a1"), "{e}");
        assert!(e.contains("destroy --yes"), "{e}");
        // It kept trying: more than one terminate of the stuck one.
        assert!(p.terminated.lock().iter().filter(|i| *i == "i-a2").count() >= 3);
    }

    #[test]
    fn a_foreign_instance_counts_only_when_it_is_a_nodes_own() {
        let o = |id: &str, foreign| Observed {
            instance_id: id.into(),
            node_id: None,
            batch: None,
            alive: true,
            foreign,
        };
        let left = left_alive(&[o("i-1", false), o("i-2", true), o("i-3", true)], &[target("i-3")]);
        let ids: Vec<_> = left.iter().map(|t| t.instance_id.clone().unwrap()).collect();
        assert_eq!(ids, ["i-1", "i-3"]);
        assert_eq!(left[1].node_id.as_deref(), Some("node-i-3"));
    }

    fn pools() -> Vec<Pool> {
        vec![
            Pool { name: "a".into(), instance_types: vec!["x".into()], count: 2, ..Pool::default() },
            Pool { name: "b".into(), instance_types: vec!["y".into()], count: 1, ..Pool::default() },
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

    /// An adaptive decision made under a range the operator has since
    /// changed (`scale N` between the tick's decision and its carry-out)
    /// changes nothing: the operator's size stands.
    #[tokio::test]
    async fn an_adaptive_size_yields_to_the_operator_s_scale() {
        let dir = tempfile::tempdir().unwrap();
        let sh = crate::cluster::testing::cluster(dir.path(), crate::config::EngineKind::None);
        scale(&sh, 1, &HashMap::new(), Some(4)).unwrap();
        assert!(adapt_size(&sh, 3, (1, 4)).unwrap().is_some());
        assert_eq!(sh.registry.lock().desired_slaves(), 3);
        // The operator fixes the size; a decision of the old range arrives.
        scale(&sh, 2, &HashMap::new(), None).unwrap();
        assert!(adapt_size(&sh, 4, (1, 4)).unwrap().is_none());
        assert_eq!(sh.registry.lock().desired_slaves(), 2);
        // ...or sets another range.
        scale(&sh, 2, &HashMap::new(), Some(5)).unwrap();
        assert!(adapt_size(&sh, 4, (1, 4)).unwrap().is_none());
        assert_eq!(sh.registry.lock().desired_slaves(), 2);
    }
}
