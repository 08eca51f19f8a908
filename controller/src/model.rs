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

/// Where a node is in its life. The transitions, all methods of the
/// registry (`registry/transitions.rs`); anything else is a bug:
///
/// ```text
/// Requested -> Booting            the provider lists its instance (apply MarkBooting)
/// Requested | Booting -> Enrolled its agent spent the token (complete_enrollment)
/// Enrolled -> Provisioning(k/n)   hello: the plan starts or resumes (on_hello)
/// Provisioning -> Provisioning    step reports (on_step)
/// Provisioning -> Ready           the last step succeeded (on_step), or a hello
///                                 says the plan is done (on_hello)
/// Provisioning -> Failed          a step failed: kept for diagnosis, not replaced
/// Ready | Failed -> Provisioning  hello with a different plan
/// Ready -> Draining               scale down, or superseded (apply Drain)
/// Draining -> Terminating         after the drain timeout (apply Terminate)
/// any -> Terminating              lost, removed, destroyed (apply Terminate,
///                                 terminate_all); then forgotten once the
///                                 provider no longer lists it alive (apply Forget)
/// ```
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
    /// A provisioning step failed.
    Failed {
        step: String,
    },
    /// Being removed: its engine stops giving it work (Disco blacklist, Dask
    /// retire) until the drain timeout, then it is terminated.
    Draining,
    Terminating,
}

impl NodeState {
    /// Short label for status output.
    pub fn label(&self) -> String {
        match self {
            NodeState::Requested => "requested".into(),
            NodeState::Booting => "booting".into(),
            NodeState::Enrolled => "enrolled".into(),
            NodeState::Provisioning { step, of } => format!("provisioning {}/{}", step + 1, of),
            NodeState::Ready => "ready".into(),
            NodeState::Failed { .. } => "failed".into(),
            NodeState::Draining => "draining".into(),
            NodeState::Terminating => "terminating".into(),
        }
    }

    /// Has the agent enrolled (so heartbeats are expected)?
    pub fn is_enrolled(&self) -> bool {
        matches!(
            self,
            NodeState::Enrolled
                | NodeState::Provisioning { .. }
                | NodeState::Ready
                | NodeState::Failed { .. }
                | NodeState::Draining
        )
    }
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
