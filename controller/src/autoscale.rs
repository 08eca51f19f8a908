//! Adaptive size (`scale MIN..MAX`): the engine's backlog decides the
//! number of slaves within the bounds. Plain functions: the engine's
//! target (workers) as slaves, and the decision with hysteresis (grow at
//! once up to the target; shrink only after the target stayed lower for a
//! cooldown; never outside the bounds). Shrinking is an ordinary scale
//! down: leaving slaves drain first.

/// The bounds `scale MIN..MAX` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// Slaves that give `target_workers` worker processes, the master's own
/// counted first; `per_slave` workers each (at least 1).
pub fn slaves_for(target_workers: u32, master_workers: u32, per_slave: u32) -> u32 {
    target_workers.saturating_sub(master_workers).div_ceil(per_slave.max(1))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub slaves: u32,
    /// Since when (ms) the target has been below the size, if it is.
    pub lower_since_ms: Option<u64>,
    pub why: String,
}

/// The size to have now, given the current size, the target in slaves
/// (`None`: the engine has not said), when the target went lower, and the
/// cooldown.
pub fn decide(
    current: u32,
    target: Option<u32>,
    b: Bounds,
    lower_since_ms: Option<u64>,
    now_ms: u64,
    cooldown_ms: u64,
) -> Decision {
    let Some(t) = target else {
        let slaves = current.clamp(b.min, b.max);
        return Decision { slaves, lower_since_ms: None, why: "no target from the engine yet".into() };
    };
    let want = t.clamp(b.min, b.max);
    let bounded = if want != t { format!(" (bounded by {}..{})", b.min, b.max) } else { String::new() };
    if want > current {
        return Decision {
            slaves: want,
            lower_since_ms: None,
            why: format!("growing to the engine's target of {t} slaves{bounded}"),
        };
    }
    if want == current {
        return Decision {
            slaves: current,
            lower_since_ms: None,
            why: format!("at the engine's target of {t} slaves{bounded}"),
        };
    }
    let since = lower_since_ms.unwrap_or(now_ms);
    let lower_for = now_ms.saturating_sub(since);
    if lower_for >= cooldown_ms {
        Decision {
            slaves: want,
            lower_since_ms: None,
            why: format!(
                "shrinking to {want}: the engine's target stayed lower for {:.0}s",
                lower_for as f64 / 1000.0
            ),
        }
    } else {
        Decision {
            slaves: current,
            lower_since_ms: Some(since),
            why: format!(
                "the engine's target is {t}{bounded}; shrinking to {want} if it stays lower {:.0}s more",
                (cooldown_ms - lower_for) as f64 / 1000.0
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds { min: 1, max: 4 };

    #[test]
    fn workers_become_slaves() {
        assert_eq!(slaves_for(0, 1, 2), 0);
        assert_eq!(slaves_for(1, 1, 2), 0);
        assert_eq!(slaves_for(6, 1, 2), 3);
        assert_eq!(slaves_for(6, 1, 0), 5);
    }

    #[test]
    fn grows_at_once_shrinks_after_the_cooldown_within_the_bounds() {
        // Grow at once, never above MAX.
        assert_eq!(decide(1, Some(3), B, None, 0, 60_000).slaves, 3);
        let d = decide(1, Some(9), B, None, 0, 60_000);
        assert_eq!(d.slaves, 4);
        assert!(d.why.contains("bounded by 1..4"), "{}", d.why);
        // Lower: wait for the cooldown, then shrink, never below MIN.
        let d = decide(4, Some(0), B, None, 1_000, 60_000);
        assert_eq!((d.slaves, d.lower_since_ms), (4, Some(1_000)));
        let d = decide(4, Some(0), B, Some(1_000), 30_000, 60_000);
        assert_eq!((d.slaves, d.lower_since_ms), (4, Some(1_000)));
        let d = decide(4, Some(0), B, Some(1_000), 61_000, 60_000);
        assert_eq!((d.slaves, d.lower_since_ms), (1, None));
        // A target back up during the cooldown resets it.
        let d = decide(4, Some(4), B, Some(1_000), 30_000, 60_000);
        assert_eq!((d.slaves, d.lower_since_ms), (4, None));
        // No word from the engine: the size within the bounds.
        assert_eq!(decide(7, None, B, None, 0, 1).slaves, 4);
        assert_eq!(decide(0, None, B, None, 0, 1).slaves, 1);
    }
}
