//! One reconcile pass: observe the provider, decide (`reconcile::decide`),
//! apply the actions to the registry (its transitions), then carry out what
//! is left for the provider (terminate, launch). Also the per-tick chores:
//! spot prices, and replacing on-demand slaves once the cluster is idle.

use super::Cluster;
use crate::lifecycle::StopReason;
use crate::model::Role;
use crate::pki;
use crate::provider::{LaunchBatch, ProviderError, Target};
use crate::reconcile::{Action, AdaptiveInput, Desired, Inputs, NodeView, Policy, decide};
use crate::registry::{Effect, NewNode, Registry, unix_ms};
use crate::userdata::{Bootstrap, Slot, Userdata};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What the reconcile loop does each time: observe, decide (everything:
/// `reconcile::decide`), carry out; then prices and the dashboard's
/// sample. Serialised with `destroy` by `tick_lock`. (Directives are
/// published by their own loop, `serve::publish_loop`.)
///
/// Returns how long until the next node deadline (heartbeat, boot, drain)
/// expires, if one is pending: the loop wakes then, so a silent node is
/// declared lost when its timeout passes, not up to an interval later.
pub async fn pass(sh: &Arc<Cluster>) -> Option<Duration> {
    let _guard = sh.tick_lock.lock().await;
    let t0 = std::time::Instant::now();
    let res = tick(sh).await;
    crate::metrics::Metrics::inc(&sh.metrics.reconcile_ticks);
    sh.metrics.reconcile_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    let next = match res {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!("reconcile: {e:#}; trying again next tick");
            None
        }
    };
    // Beside the loop: a price list that answers slowly (an EC2 endpoint
    // busy listing a thousand instances) must not hold loss detection.
    let s = sh.clone();
    tokio::spawn(async move { refresh_prices(&s).await });
    record_history(sh);
    // Measured from when the views were taken, less the time since.
    next.map(|ms| Duration::from_millis(ms).saturating_sub(t0.elapsed()))
}

/// One reconcile pass: observe (the provider's listing, the registry, the
/// policies' state), decide, act. Returns the milliseconds until the next
/// node deadline (`reconcile::next_deadline_ms`).
pub async fn tick(sh: &Arc<Cluster>) -> anyhow::Result<Option<u64>> {
    // Without a fresh listing nothing is decided about nodes: stale data
    // could kill healthy nodes or launch duplicates. The policies (spend
    // cap, max runtime) are decided anyway.
    let listing = observe(sh).await.map_err(|e| anyhow::anyhow!("listing the cluster's instances: {e}"));
    sh.registry.lock().account(unix_ms());
    let policy = observe_policy(sh);
    let mut next_deadline = None;
    let (to_terminate, launches, lifecycle_actions, acted);
    {
        let mut reg = sh.registry.lock();
        let observed = listing.as_ref().ok().map(|o| reg.match_observed(o));
        let mut views = Vec::new();
        let mut orphans = Vec::new();
        if let Some((alive, o)) = observed {
            views = reg.views(&alive, sh.clock.now_ms(), unix_ms());
            if supersede_when_idle(sh, &mut reg, &views) {
                views = reg.views(&alive, sh.clock.now_ms(), unix_ms());
            }
            orphans = o;
            next_deadline = crate::reconcile::next_deadline_ms(&views, sh.limits());
        }
        let hold = announce_hold(sh, &mut reg);
        let desired = Desired { pools: reg.desired.clone(), hold: hold.map(|h| h.roles).unwrap_or_default() };
        let nodes = listing.is_ok().then_some(views.as_slice());
        let inputs = Inputs { desired: &desired, nodes, orphans: &orphans, limits: sh.limits(), policy };
        let actions = decide(&inputs);
        // Only removals change what engines see (new nodes join when
        // ready): they wake the publisher. Nothing here wakes this loop but
        // terminations (to forget them soon): a launch that fails is
        // retried next tick, not in a hot loop.
        if actions
            .iter()
            .any(|a| matches!(a, Action::Terminate { .. } | Action::Drain { .. } | Action::Forget { .. }))
        {
            sh.membership_changed();
        }
        // (The adaptive size's decision comes every tick; it saves what it
        // changes itself.)
        acted = actions.iter().any(|a| !matches!(a, Action::Resize { .. }));
        (to_terminate, launches, lifecycle_actions) = apply_actions(sh, &mut reg, actions);
    }
    carry_out_policy(sh, lifecycle_actions);
    listing?;
    if !acted {
        return Ok(next_deadline);
    }
    if !to_terminate.is_empty() {
        terminate_off_tick(sh, to_terminate);
    }
    launch(sh, launches).await?;
    sh.changed();
    Ok(next_deadline)
}

/// How long a tick waits for a listing under way before it decides on the
/// newest finished one (the local provider answers in microseconds: its
/// ticks always wait for a fresh one).
const LISTING_WAIT: Duration = Duration::from_secs(1);
/// A listing older than this (from when it was asked for) decides nothing
/// about nodes: with no fresher one the tick decides nothing about them,
/// as when every listing fails.
const LISTING_MAX_AGE: Duration = Duration::from_secs(60);

/// What one listing said (the error as text: it is kept and shown again).
type Listing = Result<Vec<crate::model::Observed>, String>;

/// The provider's listings, taken beside the loop: at most one under way.
#[derive(Default)]
pub struct Listings {
    /// The listing under way: when it was asked for, its task, and whether
    /// a tick stopped waiting for it (then it wakes the loop when done).
    inflight:
        Option<(std::time::Instant, tokio::task::JoinHandle<Listing>, Arc<std::sync::atomic::AtomicBool>)>,
    /// The newest listing that answered: when it was asked for, and what
    /// it said.
    good: Option<(std::time::Instant, Vec<crate::model::Observed>)>,
    /// Whether any listing finished yet (the first one is waited for).
    finished: bool,
}

/// This tick's view of the cluster's instances. A listing is asked for if
/// none is under way, and waited for up to `LISTING_WAIT`; a slower one
/// (an 8 s `DescribeInstances` at a thousand instances) goes on beside the
/// loop, waking it when done. The tick decides on the newest listing that
/// answered, if it was asked for within `LISTING_MAX_AGE`, also when the
/// latest one failed (throttled, timed out: logged). Safe because what a
/// listing decides tolerates its age: a node never listed has its grace
/// (listing lag), one listed and then missing is gone (a later listing
/// cannot un-list it), and heartbeats and deadlines do not come from it.
/// With none that recent, the tick decides nothing about nodes.
async fn observe(sh: &Arc<Cluster>) -> Listing {
    let mut l = sh.listings.lock().await;
    let (asked, mut task, abandoned) = match l.inflight.take() {
        Some(t) => t,
        None => {
            let (s, abandoned) = (sh.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
            let a = abandoned.clone();
            let task = tokio::spawn(async move {
                let r = s.provider.list().await.map_err(|e| e.to_string());
                // Only a listing no tick waited for wakes the loop (one a
                // tick took needs no other pass: no listing storm).
                if a.load(Ordering::Relaxed) {
                    s.wake.notify_one();
                }
                r
            });
            (std::time::Instant::now(), task, abandoned)
        }
    };
    // Nothing listed yet (the controller just started): wait for it, as
    // there is nothing older to decide on.
    let wait = if l.finished { LISTING_WAIT } else { LISTING_MAX_AGE };
    let fresh_error = match tokio::time::timeout(wait, &mut task).await {
        Ok(done) => {
            l.finished = true;
            match done.unwrap_or_else(|e| Err(format!("the listing task failed: {e}"))) {
                Ok(o) => {
                    l.good = Some((asked, o.clone()));
                    return Ok(o);
                }
                Err(e) => Some(e),
            }
        }
        Err(_) => {
            abandoned.store(true, Ordering::Relaxed);
            l.inflight = Some((asked, task, abandoned));
            None
        }
    };
    match (&l.good, fresh_error) {
        (Some((at, o)), e) if at.elapsed() < LISTING_MAX_AGE => {
            if let Some(e) = e {
                tracing::warn!(
                    "listing the cluster's instances: {e}; deciding on the one of {:.0}s ago",
                    at.elapsed().as_secs_f64()
                );
            }
            Ok(o.clone())
        }
        (_, Some(e)) => Err(e),
        (Some((at, _)), None) => Err(format!(
            "the newest listing is {:.0}s old and the next one is still under way ({:.0}s)",
            at.elapsed().as_secs_f64(),
            asked.elapsed().as_secs_f64()
        )),
        (None, None) => Err(format!("no listing has answered yet ({:.0}s)", asked.elapsed().as_secs_f64())),
    }
}

/// Terminations run off the reconcile tick: a slow `TerminateInstances`
/// (30 s is seen at a thousand instances) must not hold loss detection or
/// launches. One task per tick's targets, never two at once for one
/// instance; a failure is logged and the reconcile loop terminates again
/// (`Reterminate`) until the instance is gone. Done: the loop looks again
/// at once, to forget what is gone.
fn terminate_off_tick(sh: &Arc<Cluster>, targets: Vec<Target>) {
    let targets: Vec<Target> = {
        let mut inflight = sh.terminations.lock();
        targets
            .into_iter()
            .filter(|t| t.instance_id.as_ref().is_none_or(|i| inflight.insert(i.clone())))
            .collect()
    };
    if targets.is_empty() {
        return;
    }
    let sh = sh.clone();
    tokio::spawn(async move {
        let r = sh.provider.terminate(&targets).await;
        {
            let mut inflight = sh.terminations.lock();
            for i in targets.iter().filter_map(|t| t.instance_id.as_ref()) {
                inflight.remove(i);
            }
        }
        match r {
            Ok(()) => sh.wake.notify_one(),
            Err(e) => {
                let names: Vec<&str> = targets
                    .iter()
                    .filter_map(|t| t.node_id.as_deref().or(t.instance_id.as_deref()))
                    .take(5)
                    .collect();
                tracing::warn!(
                    "terminating {} instance(s) ({}{}) failed: {e:#}; the reconcile loop terminates them again",
                    targets.len(),
                    names.join(", "),
                    if targets.len() > names.len() { ", ..." } else { "" }
                );
            }
        }
    });
}

/// The node actions, each a registry transition (`apply`); what is left:
/// instances to terminate, launches to make, and the cluster-level
/// actions for `carry_out_policy`.
#[allow(clippy::type_complexity)]
fn apply_actions(
    sh: &Cluster,
    reg: &mut Registry,
    actions: Vec<Action>,
) -> (Vec<Target>, Vec<(Role, String, u32)>, Vec<Action>) {
    let (mut to_terminate, mut launches, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    let drain_secs = sh.cfg.drain_timeout.as_secs_f64();
    for action in actions {
        match action {
            Action::TerminateOrphan { instance_id, node_id } => {
                reg.event(format!(
                    "terminating orphan instance {instance_id}: tagged for this cluster but unknown to it"
                ));
                to_terminate.push(Target { node_id, instance_id: Some(instance_id) });
            }
            a @ (Action::WarnSpend
            | Action::StopLaunching
            | Action::Destroy { .. }
            | Action::Resize { .. }) => rest.push(a),
            node_action => match reg.apply(node_action, drain_secs) {
                // A decision the node's state no longer allows (it moved
                // meanwhile): refused inside the lock, changed nothing.
                Err(e) => tracing::debug!("reconcile: {e}"),
                Ok(Effect::Nothing | Effect::Ready) => {}
                Ok(Effect::Terminate { target, loss }) => {
                    if loss {
                        crate::metrics::Metrics::inc(&sh.metrics.replacements);
                    }
                    to_terminate.push(target);
                }
                Ok(Effect::Launch { role, pool, count }) => launches.push((role, pool, count)),
            },
        }
    }
    (to_terminate, launches, rest)
}

/// Records, saves, then starts the launches (beside the loop).
async fn launch(sh: &Arc<Cluster>, launches: Vec<(Role, String, u32)>) -> anyhow::Result<()> {
    // Every batch is recorded, then saved once, then launched: a crash
    // cannot leak what the calls start, and a large scale-up writes the
    // state once, not once per batch.
    let mut batches = Vec::new();
    for (role, pool, count) in launches {
        if let Err(e) = sh.provider.can_launch(role, &pool) {
            let mut reg = sh.registry.lock();
            reg.event_once(format!("launches of pool {pool} held back: {e}"));
            continue;
        }
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(sh.provider.max_batch().max(1));
            left -= n;
            batches.push(record_batch(sh, role, &pool, n));
        }
    }
    if !batches.is_empty()
        && let Err(e) = sh.save()
    {
        // Never launch what is not on disk; these are dropped and
        // launched next tick.
        let mut reg = sh.registry.lock();
        for b in &batches {
            reg.on_launched(&b.nodes, &[]);
        }
        return Err(e.context("saving cluster.json before a launch"));
    }
    // The launches run beside the loop: walking candidates can take many
    // calls (seconds each on EC2), and the next tick must still decide on
    // time (a heartbeat loss, a notice). Their nodes are recorded, so no
    // tick launches them twice; `destroy` waits for launches in flight.
    // One after the other, the master first: with capacity or an account
    // quota for only some nodes, the master gets it.
    if !batches.is_empty() {
        batches.sort_by_key(|b| b.role != Role::Master);
        let sh2 = sh.clone();
        let in_flight = sh.launches.clone().read_owned().await;
        tokio::spawn(async move {
            for b in batches {
                launch_batch(&sh2, b).await;
                sh2.changed();
            }
            drop(in_flight);
        });
    }
    Ok(())
}

/// The failure budget's hold, announced once per change (an event).
fn announce_hold(sh: &Cluster, reg: &mut Registry) -> Option<crate::failures::Hold> {
    let hold = crate::failures::hold(
        &reg.failures(),
        unix_ms(),
        sh.cfg.failure_budget,
        sh.cfg.failure_window.as_millis() as u64,
    );
    let mut p = sh.policies.lock();
    if hold.as_ref().map(|h| (&h.step, &h.nodes)) != p.announced_hold.as_ref().map(|h| (&h.step, &h.nodes)) {
        if let Some(h) = &hold {
            tracing::warn!("{}", crate::failures::event(h));
            reg.event(crate::failures::event(h));
        }
        p.announced_hold.clone_from(&hold);
    }
    hold
}

/// The policies' facts for `decide`: the spend against the cap, whether
/// the max runtime passed, the idle clock (kept up to date here), the
/// adaptive size's inputs. Takes the registry's lock, then the policies'.
fn observe_policy(sh: &Cluster) -> Policy {
    let now = unix_ms();
    // The O(nodes) facts only for the policies in force: a tick costs
    // what it did before they were decided here.
    let autostop = !sh.cfg.autostop_idle.is_zero();
    let (spent, started, settled, current, (master_workers, per_slave), bounds) = {
        let reg = sh.registry.lock();
        let bounds = reg.adaptive_bounds();
        (
            reg.spent_usd,
            reg.started_unix_ms(),
            autostop && reg.settled(),
            reg.desired_slaves(),
            if bounds.is_some() { reg.workers_per_node() } else { (0, 1) },
            bounds,
        )
    };
    let mut p = sh.policies.lock();
    p.idle_since_ms = crate::autostop::idle_since(p.engine_busy, settled, p.idle_since_ms, now);
    let limit = sh.cfg.max_runtime.as_millis() as u64;
    Policy {
        lifecycle: p.lifecycle,
        budget: crate::budget::budget(spent, sh.cfg.max_spend_usd),
        on_budget: sh.cfg.on_budget,
        autostop_due: crate::autostop::due(p.idle_since_ms, now, sh.cfg.autostop_idle.as_millis() as u64),
        max_runtime_passed: limit > 0 && started.is_some_and(|t| now.saturating_sub(t) >= limit),
        adaptive: bounds.map(|(min, max)| AdaptiveInput {
            current,
            target: p.engine_target.map(|t| crate::autoscale::slaves_for(t, master_workers, per_slave)),
            bounds: crate::autoscale::Bounds { min, max },
            lower_since_ms: p.adaptive.lower_since_ms,
            now_ms: now,
            cooldown_ms: sh.cfg.adaptive_cooldown.as_millis() as u64,
        }),
    }
}

/// Carries out the cluster-level decisions: the lifecycle's transitions
/// (each said once, as an event), the end of the cluster (`stop_for`), the
/// adaptive size.
fn carry_out_policy(sh: &Arc<Cluster>, actions: Vec<Action>) {
    use crate::lifecycle::LifeEvent;
    for action in actions {
        match action {
            Action::WarnSpend => {
                if move_lifecycle(sh, LifeEvent::SpendWarning) {
                    let (spent, cap) = (sh.registry.lock().spent_usd, sh.cfg.max_spend_usd);
                    sh.registry.lock().event(format!("spend ${spent:.4} is 80% of max_spend_usd ${cap:.4}"));
                }
            }
            Action::StopLaunching => {
                if move_lifecycle(sh, LifeEvent::SpendReached { destroy: false }) {
                    let (spent, cap) = (sh.registry.lock().spent_usd, sh.cfg.max_spend_usd);
                    sh.registry.lock().event(format!(
                        "SPEND CAP REACHED: ${spent:.4} of max_spend_usd ${cap:.4}: nothing more is launched"
                    ));
                }
            }
            Action::Destroy { reason } => stop_for(sh, reason),
            Action::Resize { decision: d, target, range } => {
                let current = sh.registry.lock().desired_slaves();
                {
                    let mut p = sh.policies.lock();
                    p.adaptive.lower_since_ms = d.lower_since_ms;
                    p.adaptive.why = d.why.clone();
                    p.adaptive.target_slaves = target;
                }
                if d.slaves != current {
                    match crate::cluster::ops::adapt_size(sh, d.slaves, range) {
                        Ok(Some(_)) => sh
                            .registry
                            .lock()
                            .event(format!("adaptive: {current} -> {} slaves: {}", d.slaves, d.why)),
                        // The operator changed the range meanwhile: theirs wins.
                        Ok(None) => {}
                        Err(e) => tracing::warn!("adaptive: cannot set the size: {e}"),
                    }
                }
            }
            other => tracing::error!("not a cluster-level action: {other:?} (a bug)"),
        }
    }
}

/// Moves the lifecycle by `event`; false when it changed nothing.
fn move_lifecycle(sh: &Cluster, event: crate::lifecycle::LifeEvent) -> bool {
    let mut p = sh.policies.lock();
    match p.lifecycle.on(event) {
        Some(next) => {
            p.lifecycle = next;
            true
        }
        None => false,
    }
}

/// On-demand slaves of pools back on spot are replaced by spot ones once
/// the cluster has been idle for `on_demand_idle_replace` (the other
/// occasion is a scale change, `ops::scale`).
/// Returns whether it marked any.
fn supersede_when_idle(sh: &Cluster, reg: &mut Registry, views: &[NodeView]) -> bool {
    let wait = sh.cfg.on_demand_idle_replace;
    let mut policies = sh.policies.lock();
    let since = &mut policies.supersede_idle_since;
    let desired = Desired { pools: reg.desired.clone(), ..Default::default() };
    let spot_again = |pool: &str| sh.provider.spot_again(Role::Slave, pool);
    let candidates = crate::reconcile::supersede(&desired, views, spot_again);
    let loads: Vec<(Option<u32>, u32)> = reg
        .entries()
        .filter(|e| e.rec.state().is(crate::model::StateKind::Ready))
        .map(|e| (e.live.load_milli(), e.rec.facts.as_ref().map_or(1, |f| f.logical_cores)))
        .collect();
    if wait.is_zero() || candidates.is_empty() || !crate::reconcile::idle(&loads) {
        *since = None;
        return false;
    }
    let now = sh.clock.now_ms();
    let start = *since.get_or_insert(now);
    if now.saturating_sub(start) < wait.as_millis() as u64 {
        return false;
    }
    let idle_for = format!("cluster idle for {:.0}s: ", now.saturating_sub(start) as f64 / 1000.0);
    reg.supersede(&candidates, &idle_for);
    *since = None;
    true
}

/// A batch recorded in the registry, about to be launched in one call.
struct Batch {
    batch_id: String,
    role: Role,
    pool: String,
    nodes: Vec<String>,
    addresses: Vec<String>,
    /// The bootstrap tokens, in node order (only their hashes are kept).
    secrets: Vec<String>,
}

/// Records `n` new nodes of one batch and mints their tokens.
fn record_batch(sh: &Cluster, role: Role, pool: &str, n: usize) -> Batch {
    let batch_id = format!("b{}", hex::encode(rand::random::<[u8; 8]>()));
    let expires = unix_ms() + sh.cfg.token_ttl.as_millis() as u64;
    let mut secrets = Vec::with_capacity(n);
    let mut nodes = Vec::with_capacity(n);
    let mut addresses = Vec::with_capacity(n);
    let mut reg = sh.registry.lock();
    for i in 0..n {
        let (secret, token_hash) = pki::mint_token();
        let new = NewNode {
            role,
            pool: pool.to_string(),
            batch: Some((batch_id.clone(), i as u32)),
            token_hash,
            token_expires_unix_ms: expires,
        };
        let id = reg.add_node(new, |seq| sh.provider.address_for(seq));
        addresses.push(reg.get(&id).map(|e| e.rec.address.clone()).unwrap_or_default());
        nodes.push(id);
        secrets.push(secret);
    }
    reg.event(format!("launching {} ({role}, pool {pool})", nodes.join(", ")));
    Batch { batch_id, role, pool: pool.to_string(), nodes, addresses, secrets }
}

/// Launches a recorded (and saved) batch in one provider call.
async fn launch_batch(sh: &Arc<Cluster>, b: Batch) {
    let Batch { batch_id, role, pool, nodes, addresses, secrets } = b;
    let pool = pool.as_str();
    let ca_sha = sh.pki.ca_fingerprint();
    let userdata = Userdata {
        bootstrap: Bootstrap {
            controller: &sh.endpoints.grpc_url,
            server_name: pki::SERVER_NAME,
            ca_sha256: &ca_sha,
            imds: sh.provider.imds_url(),
            slots: nodes.iter().zip(&secrets).map(|(node_id, token)| Slot { node_id, token }).collect(),
            orphan_timeout_secs: sh.cfg.orphan_timeout.as_secs(),
            orphan_action: sh.provider.orphan_action(),
        },
        ca_pem: sh.pki.ca_pem(),
        agent_url: &sh.endpoints.agent_url,
        agent_sha256: &sh.endpoints.agent_sha256,
        agent_arm64: sh.endpoints.agent_arm64.as_ref().map(|(u, s)| (u.as_str(), s.as_str())),
        default_home: "/var/lib/ddisco",
    }
    .render();
    drop(secrets);
    let batch =
        LaunchBatch { batch_id, role, pool: pool.to_string(), nodes: nodes.clone(), addresses, userdata };
    let result = sh.provider.launch(batch).await;
    let mut reg = sh.registry.lock();
    match result {
        Ok(launched) => {
            sh.metrics.launches.fetch_add(launched.len() as u64, Ordering::Relaxed);
            if launched.len() < nodes.len() {
                let dropped: Vec<&str> = nodes
                    .iter()
                    .filter(|n| !launched.iter().any(|l| &l.node_id == *n))
                    .map(String::as_str)
                    .collect();
                reg.event(format!(
                    "{} of {} launched in pool {pool} (EC2 had no more capacity or quota there); {} not \
                     launched, retried next tick",
                    launched.len(),
                    nodes.len(),
                    dropped.join(", ")
                ));
            }
            reg.on_launched(&nodes, &launched);
        }
        Err(e) => {
            crate::metrics::Metrics::inc(&sh.metrics.launch_failures);
            reg.on_launched(&nodes, &[]);
            match &e {
                ProviderError::Config { .. } => tracing::error!("launch blocked: {e}"),
                _ => tracing::warn!("launch of {} failed: {e}", nodes.join(", ")),
            }
            reg.event_once(format!("launch in pool {pool} failed: {e}; will retry"));
        }
    }
}

/// Fetches spot prices every 10 minutes, or sooner (at most every 10 s)
/// while a node has none yet. Failures only delay the next try.
async fn refresh_prices(sh: &Arc<Cluster>) {
    // One refresh at a time: a tick that finds one under way leaves it.
    let Ok(mut at) = sh.prices_at.try_lock() else { return };
    let (ids, unpriced) = {
        let reg = sh.registry.lock();
        let live: Vec<&crate::registry::Entry> = reg
            .entries()
            .filter(|e| {
                !e.rec.state().is(crate::model::StateKind::Terminating) && e.rec.instance_id.is_some()
            })
            .collect();
        let unpriced = live.iter().any(|e| e.rec.price_per_hour == 0.0);
        (live.iter().filter_map(|e| e.rec.instance_id.clone()).collect::<Vec<_>>(), unpriced)
    };
    let now = tokio::time::Instant::now();
    let due = match *at {
        None => true,
        Some(t) => now - t >= Duration::from_secs(600) || (unpriced && now - t >= Duration::from_secs(10)),
    };
    if ids.is_empty() || !due {
        return;
    }
    *at = Some(now);
    match sh.provider.prices(&ids).await {
        Ok(prices) if !prices.is_empty() => {
            sh.registry.lock().set_prices(&prices, unix_ms());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot refresh spot prices: {e}"),
    }
}

/// One sample of the cluster for the dashboard's charts.
fn record_history(sh: &Arc<Cluster>) {
    let adaptive = sh.registry.lock().adaptive_bounds();
    let target = adaptive.and(sh.policies.lock().adaptive.target_slaves);
    let sample = {
        let reg = sh.registry.lock();
        let (mut nodes, mut ready, mut failed) = (0, 0, 0);
        for e in reg.entries() {
            nodes += 1;
            ready += u32::from(e.rec.state().is(crate::model::StateKind::Ready));
            failed += u32::from(e.rec.state().is(crate::model::StateKind::Failed));
        }
        crate::history::Sample {
            unix_ms: unix_ms(),
            desired: reg.desired_slaves() + 1,
            nodes,
            ready,
            failed,
            losses: sh.metrics.replacements.load(Ordering::Relaxed),
            cost_per_hour: reg.cost_per_hour(),
            spent_usd: reg.spent_usd,
            target,
        }
    };
    sh.history.lock().push(sample);
}

/// Why the controller is about to destroy the cluster and stop by itself,
/// in `<state_dir>/stop-reason` (`run` reads it when its controller goes
/// away; the next `serve` removes it).
fn record_stop_reason(sh: &Cluster, why: &str) {
    if let Err(e) = crate::pki::write_private(&sh.cfg.state_dir.join(STOP_REASON), why) {
        tracing::warn!("cannot record why the controller stops: {e}");
    }
}

/// The file `record_stop_reason` writes.
pub const STOP_REASON: &str = "stop-reason";

/// How the max runtime's event and stop reason begin (`run` reads it).
pub const MAX_RUNTIME_REACHED: &str = "MAX RUNTIME REACHED";

/// The one way the controller ends its own cluster (spend cap, autostop,
/// max runtime): the lifecycle moves to `Stopping(reason)` (once: a stop
/// under way is not started again), the reason is said (an event, the
/// `stop-reason` file `run` reads), and beside the loop the cluster is
/// destroyed (destroy waits for the tick in progress), then the
/// controller stops, but only once the destroy is verified: until then it
/// tries again (10 s, doubling to 5 min), says so in status and as an
/// event, and the controller keeps watching its nodes.
pub fn stop_for(sh: &Arc<Cluster>, reason: StopReason) {
    if !move_lifecycle(sh, crate::lifecycle::LifeEvent::Stop(reason)) {
        return;
    }
    let why = match reason {
        StopReason::SpendCap => {
            let (spent, cap) = (sh.registry.lock().spent_usd, sh.cfg.max_spend_usd);
            format!("SPEND CAP REACHED: ${spent:.4} of max_spend_usd ${cap:.4}: destroying the cluster")
        }
        StopReason::MaxRuntime => format!(
            "{MAX_RUNTIME_REACHED}: the cluster has run for {} (max_runtime_mins): destroying it",
            crate::model::span(sh.cfg.max_runtime.as_secs_f64())
        ),
        StopReason::Autostop => format!(
            "autostop: no work for {} min (autostop_idle_mins): destroying the cluster",
            sh.cfg.autostop_idle.as_secs_f64() / 60.0
        ),
    };
    tracing::warn!("{why}");
    sh.registry.lock().event(why.clone());
    record_stop_reason(sh, &why);
    let what = reason.name();
    let sh = sh.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(10);
        loop {
            match crate::cluster::ops::destroy(&sh).await {
                Ok(d) => {
                    tracing::warn!(nodes = d.terminated.len(), "{what}: cluster destroyed");
                    break;
                }
                Err(e) => {
                    let msg = format!(
                        "{what}: destroy incomplete ({e:#}); trying again in {}s; the controller keeps running \
                         until every instance is gone",
                        wait.as_secs()
                    );
                    tracing::error!("{msg}");
                    sh.registry.lock().event(msg);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(300));
                }
            }
        }
        sh.stop();
    });
}
