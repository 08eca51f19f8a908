//! Plain domain types shared by the registry, the reconciler and the API
//! edges. Nothing here does I/O.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's role in the map/reduce cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Master,
    Slave,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Slave => "slave",
        })
    }
}

/// How a node's instance is bought. Local and recorded nodes count as spot
/// (they can be "interrupted" like spot instances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    #[default]
    Spot,
    OnDemand,
}

/// A notice a node's cloud sent about its instance, relayed by its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The spot instance will be reclaimed (two-minute warning).
    #[serde(rename = "spot-interruption")]
    SpotInterruption,
    /// EC2 recommends moving off this instance (elevated risk).
    #[serde(rename = "rebalance-recommendation")]
    Rebalance,
}

impl Notice {
    pub fn label(self) -> &'static str {
        match self {
            Notice::SpotInterruption => "spot-interruption",
            Notice::Rebalance => "rebalance-recommendation",
        }
    }
}

/// Where a node is in its life; each state carries its own data. The
/// transitions are one function, `Registry::transition`
/// (`registry/transitions.rs`), whose `match (state, event)` is this
/// diagram; every other pair is refused (inside the registry's lock):
///
/// ```text
/// Requested -> Booting             Listed: the provider lists its instance
/// Requested | Booting -> Enrolled  Enrolled: its agent spent the token;
///                                  Spent: the journal says so (after a crash)
/// Enrolled | Provisioning | Ready  Hello: the plan starts or resumes
///   | Failed (another plan)          -> Provisioning(k/n), or Ready when done
/// Draining, Failed (same plan)     Hello: kept as they are
/// Provisioning -> Provisioning     Step: running/succeeded
/// Provisioning -> Ready            Step: the last one succeeded
/// Provisioning -> Failed(Step)     Step: failed (kept for diagnosis, then
///                                  terminated and replaced by reconcile)
/// any but Terminating -> Failed(Refused)  Refuse: it sent what no honest
///                                  agent sends (or a message the controller
///                                  could not handle)
/// Ready -> Draining{since, why}    Drain: scale down, or back to spot
/// Draining -> Draining{drained}    Drained: the engine holds nothing only
///                                  it has (it goes now)
/// any but Terminating              Terminate(reason): lost, removed, failed,
///   -> Terminating{sent, reason}     destroyed
/// Terminating -> Terminating       Reterminate: asked again (sent renewed)
/// Terminating | Requested -> gone  Forget: its instance is gone, or the
///                                  launch never started it
/// Terminating + Hello | Step       refused: a terminated node never comes
///                                  back (the hello-vs-terminate race)
/// ```
///
/// Stored flat in `cluster.json` (`"state": "draining"` beside the
/// variant's fields, under the names older controllers wrote them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeState {
    /// Launch asked of the provider.
    Requested,
    /// The instance exists; its agent has not enrolled yet.
    Booting,
    /// The agent holds a client certificate; no assignment acknowledged yet.
    Enrolled,
    /// Running step `step` (0-based) of `of`.
    Provisioning {
        step: u32,
        of: u32,
    },
    Ready,
    /// It failed: a step of its plan, or it was refused.
    Failed(Failure),
    /// Being removed: its engine stops giving it work (Disco blacklist, Dask
    /// retire) until the drain timeout, then it is terminated.
    Draining {
        /// When draining started (unix ms).
        #[serde(rename = "drain_started_unix_ms", default, deserialize_with = "zero_if_null")]
        since_unix_ms: u64,
        #[serde(default)]
        why: DrainWhy,
        /// The engine said it holds nothing only this node has (Disco:
        /// DDFS re-replicated its data): it goes now, not at the timeout.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        drained: bool,
    },
    /// Its instance was asked to terminate.
    Terminating {
        /// When it was last asked (unix ms).
        #[serde(rename = "terminate_sent_unix_ms", default, deserialize_with = "zero_if_null")]
        sent_unix_ms: u64,
        #[serde(default)]
        reason: Reason,
    },
}

/// Older files wrote `null` for a time not set.
fn zero_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

/// The states without their data: what status shows, what the wire
/// carries, what metrics count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    Requested,
    Booting,
    Enrolled,
    Provisioning,
    Ready,
    Failed,
    Draining,
    Terminating,
}

impl StateKind {
    pub const ALL: [StateKind; 8] = [
        StateKind::Requested,
        StateKind::Booting,
        StateKind::Enrolled,
        StateKind::Provisioning,
        StateKind::Ready,
        StateKind::Failed,
        StateKind::Draining,
        StateKind::Terminating,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StateKind::Requested => "requested",
            StateKind::Booting => "booting",
            StateKind::Enrolled => "enrolled",
            StateKind::Provisioning => "provisioning",
            StateKind::Ready => "ready",
            StateKind::Failed => "failed",
            StateKind::Draining => "draining",
            StateKind::Terminating => "terminating",
        }
    }

    pub fn parse(s: &str) -> Option<StateKind> {
        StateKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a node failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Failure {
    /// It sent what no honest agent sends, or a message the controller
    /// could not handle.
    Refused { refused: Refusal },
    /// A step of its plan failed.
    Step { step: String },
}

/// What of a node's was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Its hello (facts invalid, or a name or address another node holds).
    Hello,
    /// An attribute its plan does not collect, or not a valid key.
    Attribute,
    /// A message whose handling panicked (a bug in the controller).
    Unhandled { message: String },
    /// Its enrollment could not be recorded (neither the journal nor the
    /// snapshot reached the disk): no certificate was handed out.
    Unrecorded,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Hello => f.write_str("hello"),
            Refusal::Attribute => f.write_str("attribute"),
            Refusal::Unhandled { message } => write!(f, "{message} message"),
            Refusal::Unrecorded => f.write_str("unrecorded enrollment"),
        }
    }
}

impl Failure {
    /// What failed, in a word or two (the step's name, "hello", ...): the
    /// failure budget groups failures by it.
    pub fn what(&self) -> String {
        match self {
            Failure::Step { step } => step.clone(),
            Failure::Refused { refused } => refused.to_string(),
        }
    }
}

/// Why a node drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainWhy {
    #[default]
    ScaleDown,
    /// On-demand, and its spot replacement is ready.
    BackToSpot,
}

impl DrainWhy {
    pub fn describe(self) -> &'static str {
        match self {
            DrainWhy::ScaleDown => "scale down",
            DrainWhy::BackToSpot => "on-demand, its spot replacement is ready",
        }
    }
}

/// Why a node is terminated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    InstanceGone,
    BootTimeout,
    HeartbeatTimeout {
        silent_ms: u64,
    },
    ScaleDown,
    ExtraMaster,
    /// Interruption notice; its replacement is ready.
    Interrupted,
    /// On-demand node whose spot replacement is ready.
    BackToSpot,
    /// A step of its plan failed (or it sent what no honest agent sends):
    /// it is terminated (its output is kept) and replaced.
    Failed,
    /// The whole cluster is destroyed.
    Destroyed,
    /// Terminated by a controller that did not record why (an older
    /// `cluster.json`).
    #[default]
    Unrecorded,
}

impl Reason {
    /// Is this a loss (to be reported and replaced), not a choice?
    pub fn is_loss(&self) -> bool {
        matches!(
            self,
            Reason::InstanceGone | Reason::BootTimeout | Reason::HeartbeatTimeout { .. } | Reason::Failed
        )
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
            Reason::Interrupted => "interruption notice; its replacement is ready".into(),
            Reason::BackToSpot => {
                "on-demand while spot is available again; its spot replacement is ready".into()
            }
            Reason::Failed => "it failed".into(),
            Reason::Destroyed => "the cluster is destroyed".into(),
            Reason::Unrecorded => "terminated".into(),
        }
    }
}

impl NodeState {
    pub fn kind(&self) -> StateKind {
        match self {
            NodeState::Requested => StateKind::Requested,
            NodeState::Booting => StateKind::Booting,
            NodeState::Enrolled => StateKind::Enrolled,
            NodeState::Provisioning { .. } => StateKind::Provisioning,
            NodeState::Ready => StateKind::Ready,
            NodeState::Failed(_) => StateKind::Failed,
            NodeState::Draining { .. } => StateKind::Draining,
            NodeState::Terminating { .. } => StateKind::Terminating,
        }
    }

    pub fn is(&self, kind: StateKind) -> bool {
        self.kind() == kind
    }

    /// Short label for status output ("provisioning 2/5").
    pub fn label(&self) -> String {
        match self {
            NodeState::Provisioning { step, of } => format!("provisioning {}/{}", step + 1, of),
            other => other.kind().name().to_string(),
        }
    }

    /// Has the agent enrolled (so heartbeats are expected)?
    pub fn is_enrolled(&self) -> bool {
        self.kind().is_enrolled()
    }
}

impl StateKind {
    /// Has the agent enrolled (so heartbeats are expected)?
    pub fn is_enrolled(self) -> bool {
        matches!(
            self,
            StateKind::Enrolled
                | StateKind::Provisioning
                | StateKind::Ready
                | StateKind::Failed
                | StateKind::Draining
        )
    }
}

/// How a step of a node's plan went (as its agent reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    #[default]
    Running,
    Succeeded,
    Skipped,
    Failed,
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl StepStatus {
    pub fn label(self) -> &'static str {
        match self {
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Skipped => "skipped",
            StepStatus::Failed => "failed",
        }
    }
}

// ---- what providers report and are asked (plain data) ----

/// One started instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Launched {
    pub node_id: String,
    pub instance_id: String,
    pub instance_type: String,
    pub market: Market,
    /// Launched on-demand although its role/pool normally runs spot: why.
    pub on_demand_why: Option<String>,
    /// Where it landed and why there (type, market, zone; the ranking).
    pub placement: String,
}

/// One instance of this cluster, as the provider sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub instance_id: String,
    /// Known directly (local provider), else matched by instance id or batch.
    pub node_id: Option<String>,
    /// (`ddisco:batch` tag, launch index).
    pub batch: Option<(String, u32)>,
    /// Running or pending (not stopping, stopped, shutting down, terminated).
    pub alive: bool,
    /// Carries another cluster's id, or none (launched by another
    /// controller with the same `tag_key`): never adopted as an orphan,
    /// never terminated, unless it is a node's own instance.
    pub foreign: bool,
}

/// An instance to terminate.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub node_id: Option<String>,
    pub instance_id: Option<String>,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before
/// it).
pub fn unix_ms() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `workers = max(1, floor(cores x multiplier))`.
pub fn worker_count(cores: u32, multiplier: f64) -> u32 {
    let w = (f64::from(cores) * multiplier).floor();
    if w.is_finite() && w >= 1.0 { w.min(f64::from(u32::MAX)) as u32 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers() {
        assert_eq!(worker_count(4, 1.0), 4);
        assert_eq!(worker_count(4, 1.5), 6);
        assert_eq!(worker_count(3, 0.5), 1);
        assert_eq!(worker_count(1, 0.1), 1);
        assert_eq!(worker_count(0, 2.0), 1);
        assert_eq!(worker_count(8, 0.25), 2);
    }
}

/// Seconds as people say them: "45 s", "10 min", "1.5 h".
pub fn span(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{} min", trim(secs / 60.0))
    } else {
        format!("{} h", trim(secs / 3600.0))
    }
}

/// A duration as people write it: `90s`, `45m`, `2h`, `1d`, or seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let per = match unit {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        _ => return Err(format!("{s:?}: give a duration such as 90s, 45m, 2h or 1d")),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * per < 1e9 => Ok(std::time::Duration::from_secs_f64(v * per)),
        _ => Err(format!("{s:?}: give a positive duration such as 90s, 45m, 2h or 1d")),
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod span_tests {
    #[test]
    fn durations_parse_as_people_write_them() {
        use std::time::Duration;
        assert_eq!(super::parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(super::parse_duration("45m"), Ok(Duration::from_secs(2700)));
        assert_eq!(super::parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(super::parse_duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["", "0m", "-1h", "2 weeks", "h", "1e300s", "NaNs"] {
            assert!(super::parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spans_read_as_people_say_them() {
        assert_eq!(super::span(45.0), "45 s");
        assert_eq!(super::span(3600.0), "60 min");
        assert_eq!(super::span(5400.0), "90 min");
        assert_eq!(super::span(9000.0), "2.5 h");
    }
}
