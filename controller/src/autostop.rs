//! Idle auto-stop (`autostop_idle_mins`), as plain functions: a cluster at
//! its size whose engine has no work, with nothing changing, for that long
//! is destroyed.

/// Since when the cluster counts as idle (unix ms), given the engine's
/// word (`busy`) and whether the cluster is settled (at its size, every
/// node ready): `None` while anything happens.
pub fn idle_since(busy: bool, settled: bool, was: Option<u64>, now_ms: u64) -> Option<u64> {
    if busy || !settled { None } else { Some(was.unwrap_or(now_ms)) }
}

/// Is it time to stop? (`after_ms` 0: never.)
pub fn due(idle_since: Option<u64>, now_ms: u64, after_ms: u64) -> bool {
    after_ms > 0 && idle_since.is_some_and(|t| now_ms.saturating_sub(t) >= after_ms)
}

/// The countdown status shows (none when off).
pub fn note(idle_since: Option<u64>, now_ms: u64, after_ms: u64) -> Option<String> {
    if after_ms == 0 {
        return None;
    }
    let mins = after_ms as f64 / 60_000.0;
    Some(match idle_since {
        None => format!("autostop: after {mins} min idle (the cluster has work or is changing)"),
        Some(t) => {
            let idle = now_ms.saturating_sub(t);
            format!(
                "autostop: idle for {:.0}s; destroyed in {:.0}s (autostop_idle_mins = {mins})",
                idle as f64 / 1000.0,
                after_ms.saturating_sub(idle) as f64 / 1000.0
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_settled_cluster_without_work_counts_as_idle() {
        assert_eq!(idle_since(false, true, None, 100), Some(100));
        assert_eq!(idle_since(false, true, Some(50), 100), Some(50));
        assert_eq!(idle_since(true, true, Some(50), 100), None);
        assert_eq!(idle_since(false, false, Some(50), 100), None);
        assert!(!due(Some(50), 100, 0), "off");
        assert!(!due(Some(50), 100, 60));
        assert!(due(Some(40), 100, 60));
        assert!(!due(None, 100, 60));
        assert_eq!(
            note(Some(40_000), 100_000, 300_000).unwrap(),
            "autostop: idle for 60s; destroyed in 240s (autostop_idle_mins = 5)"
        );
        assert!(note(None, 1, 60_000).unwrap().contains("has work"));
        assert_eq!(note(None, 1, 0), None);
    }
}
