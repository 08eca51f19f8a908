//! The spend cap (`max_spend_usd`), as plain functions over the spend the
//! registry counts (the estimate `status` shows: every node, replaced and
//! on-demand ones included, at its price, for the time it ran).

use serde::{Deserialize, Serialize};

/// Warned from this fraction of the cap on.
pub const WARN_AT: f64 = 0.8;

/// What `on_budget` does once the cap is reached (launches stop either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBudget {
    /// Terminate every node and stop the controller.
    #[default]
    Destroy,
    /// Keep what runs; launch nothing more (lost nodes are not replaced).
    StopLaunching,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// No cap.
    Off,
    Under,
    /// At `WARN_AT` of the cap or more.
    Warning,
    Reached,
}

pub fn budget(spent_usd: f64, cap_usd: f64) -> Budget {
    if cap_usd <= 0.0 {
        Budget::Off
    } else if spent_usd >= cap_usd {
        Budget::Reached
    } else if spent_usd >= WARN_AT * cap_usd {
        Budget::Warning
    } else {
        Budget::Under
    }
}

/// The line status shows (none without a cap).
pub fn note(spent_usd: f64, cap_usd: f64, on_budget: OnBudget) -> Option<String> {
    let pct = 100.0 * spent_usd / cap_usd;
    let head = format!("spend ${spent_usd:.4} of max_spend_usd ${cap_usd:.4} ({pct:.0}%)");
    match budget(spent_usd, cap_usd) {
        Budget::Off => None,
        Budget::Under => Some(head),
        Budget::Warning => Some(format!(
            "WARNING: {head}: at the cap launches stop{}",
            if on_budget == OnBudget::Destroy { " and the cluster is destroyed" } else { "" }
        )),
        Budget::Reached => Some(match on_budget {
            OnBudget::Destroy => format!("SPEND CAP REACHED: {head}: the cluster is destroyed"),
            OnBudget::StopLaunching => {
                format!(
                    "SPEND CAP REACHED: {head}: nothing more is launched (on_budget = \"stop-launching\")"
                )
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_warns_at_80_percent_and_is_reached_at_100() {
        assert_eq!(budget(5.0, 0.0), Budget::Off);
        assert_eq!(budget(0.79, 1.0), Budget::Under);
        assert_eq!(budget(0.8, 1.0), Budget::Warning);
        assert_eq!(budget(0.999, 1.0), Budget::Warning);
        assert_eq!(budget(1.0, 1.0), Budget::Reached);
        assert_eq!(note(1.0, 0.0, OnBudget::Destroy), None);
        assert_eq!(
            note(0.5, 2.0, OnBudget::Destroy).unwrap(),
            "spend $0.5000 of max_spend_usd $2.0000 (25%)"
        );
        assert!(note(1.7, 2.0, OnBudget::Destroy).unwrap().starts_with("WARNING: spend $1.7000"));
        assert!(note(2.5, 2.0, OnBudget::StopLaunching).unwrap().contains("nothing more is launched"));
    }
}
