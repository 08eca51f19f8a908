//! The cluster's own life, as one value ([`Lifecycle`]) with one
//! transition function ([`Lifecycle::on`]), and the policies that move it
//! ([`Policies`]: spend cap, autostop, max runtime, adaptive size). Plain
//! data: `reconcile::decide` reads them, `tick` carries its decisions out.
//!
//! ```text
//! Running --SpendWarning--> CapWarned
//! Running | CapWarned --SpendReached{destroy: false}--> LaunchingStopped
//! Running | CapWarned | LaunchingStopped
//!     --Stop(spend cap | autostop | max runtime)--> Stopping(reason)
//!     --Destroy (the operator's)-----------------> Destroying
//! Stopping(reason) --Destroy--> Stopping(reason)  (the stop destroys itself)
//! ```
//! No launch happens but in `Running` and `CapWarned`; no reconcile tick
//! runs in `Destroying` and `Stopping` (the destroy owns the nodes).

/// Where the cluster is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lifecycle {
    #[default]
    Running,
    /// Spend passed 80% of `max_spend_usd` (said once).
    CapWarned,
    /// Spend reached the cap with `on_budget = "stop-launching"`: the
    /// cluster keeps running, nothing more is launched (nor replaced).
    LaunchingStopped,
    /// The operator's `destroy` is under way (or failed: it is tried
    /// again by the next `destroy`).
    Destroying,
    /// Destroying itself, then the controller stops.
    Stopping(StopReason),
}

/// Why the controller ends its own cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    SpendCap,
    Autostop,
    MaxRuntime,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::SpendCap => "spend cap",
            StopReason::Autostop => "autostop",
            StopReason::MaxRuntime => "max runtime",
        }
    }
}

/// What moves the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeEvent {
    SpendWarning,
    SpendReached { destroy: bool },
    Stop(StopReason),
    Destroy,
}

impl Lifecycle {
    /// The diagram in the module's documentation: the state after `event`,
    /// or `None` when it changes nothing (said once, so an event that
    /// persists across ticks acts once).
    pub fn on(self, event: LifeEvent) -> Option<Lifecycle> {
        use Lifecycle::*;
        match (self, event) {
            (Running, LifeEvent::SpendWarning) => Some(CapWarned),
            (Running | CapWarned, LifeEvent::SpendReached { destroy: false }) => Some(LaunchingStopped),
            (Running | CapWarned | LaunchingStopped, LifeEvent::SpendReached { destroy: true }) => {
                Some(Stopping(StopReason::SpendCap))
            }
            (Running | CapWarned | LaunchingStopped, LifeEvent::Stop(reason)) => Some(Stopping(reason)),
            (Running | CapWarned | LaunchingStopped, LifeEvent::Destroy) => Some(Destroying),
            _ => None,
        }
    }

    /// May nodes be launched (new ones, replacements)?
    pub fn launches(self) -> bool {
        matches!(self, Lifecycle::Running | Lifecycle::CapWarned)
    }

    /// Does the reconcile loop tick (not while a destroy owns the nodes)?
    pub fn ticks(self) -> bool {
        !matches!(self, Lifecycle::Destroying | Lifecycle::Stopping(_))
    }
}

/// The adaptive size's memory between decisions (`scale MIN..MAX`; the
/// bounds themselves are the registry's, saved with it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdaptiveState {
    /// Since when the engine's target has been below the size.
    pub lower_since_ms: Option<u64>,
    /// The target in slaves at the last decision, and why the size is what
    /// it is.
    pub target_slaves: Option<u32>,
    pub why: String,
}

/// The policies' state: what the engine last said, and each policy's
/// memory between ticks. One value behind one lock.
#[derive(Debug, Clone)]
pub struct Policies {
    pub lifecycle: Lifecycle,
    /// The engine's last word on whether it has work (master's probe);
    /// busy until it says otherwise.
    pub engine_busy: bool,
    /// The engine's adaptive target in workers, once it gave one.
    pub engine_target: Option<u32>,
    /// Since when (unix ms) the cluster is idle (autostop).
    pub idle_since_ms: Option<u64>,
    pub adaptive: AdaptiveState,
    /// Since when (controller clock, ms) the cluster has been idle while it
    /// had on-demand slaves to replace.
    pub supersede_idle_since: Option<u64>,
    /// The failure budget's hold last announced (an event once per hold).
    pub announced_hold: Option<crate::failures::Hold>,
    /// Why the last `destroy` did not finish, until one does.
    pub destroy_error: Option<String>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            lifecycle: Lifecycle::Running,
            engine_busy: true,
            engine_target: None,
            idle_since_ms: None,
            adaptive: AdaptiveState { why: "waiting for the engine's target".into(), ..Default::default() },
            supersede_idle_since: None,
            announced_hold: None,
            destroy_error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (state, event) pair, against the diagram.
    #[test]
    fn the_lifecycle_follows_its_diagram() {
        use Lifecycle::*;
        let states = [
            Running,
            CapWarned,
            LaunchingStopped,
            Destroying,
            Stopping(StopReason::Autostop),
            Stopping(StopReason::SpendCap),
        ];
        let events = [
            LifeEvent::SpendWarning,
            LifeEvent::SpendReached { destroy: false },
            LifeEvent::SpendReached { destroy: true },
            LifeEvent::Stop(StopReason::Autostop),
            LifeEvent::Stop(StopReason::MaxRuntime),
            LifeEvent::Destroy,
        ];
        for s in states {
            for e in events {
                let want = match (s, e) {
                    (Running, LifeEvent::SpendWarning) => Some(CapWarned),
                    (Running | CapWarned, LifeEvent::SpendReached { destroy: false }) => {
                        Some(LaunchingStopped)
                    }
                    (Running | CapWarned | LaunchingStopped, LifeEvent::SpendReached { destroy: true }) => {
                        Some(Stopping(StopReason::SpendCap))
                    }
                    // Issue 23's bug: a cap that only stops launching must
                    // not silence autostop or the max runtime.
                    (Running | CapWarned | LaunchingStopped, LifeEvent::Stop(r)) => Some(Stopping(r)),
                    (Running | CapWarned | LaunchingStopped, LifeEvent::Destroy) => Some(Destroying),
                    _ => None,
                };
                assert_eq!(s.on(e), want, "{s:?} + {e:?}");
            }
        }
        assert!(Running.launches() && CapWarned.launches() && !LaunchingStopped.launches());
        assert!(LaunchingStopped.ticks() && !Destroying.ticks() && !Stopping(StopReason::Autostop).ticks());
    }
}
