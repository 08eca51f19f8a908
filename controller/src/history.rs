//! A bounded history of the cluster (for the dashboard's charts): one
//! sample per tick at most every `MIN_INTERVAL_MS`, the last `CAPACITY`
//! kept (at 2 s, 2 hours), so its memory does not grow with time.

use serde::Serialize;
use std::collections::VecDeque;

pub const CAPACITY: usize = 3_600;
pub const MIN_INTERVAL_MS: u64 = 1_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    pub unix_ms: u64,
    pub desired: u32,
    pub nodes: u32,
    pub ready: u32,
    pub failed: u32,
    /// Nodes lost (and replaced) since the controller started.
    pub losses: u64,
    pub cost_per_hour: f64,
    pub spent_usd: f64,
    /// The engine's adaptive target in slaves, when a range is in force.
    pub target: Option<u32>,
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Keeps `s` unless the last sample is younger than `MIN_INTERVAL_MS`;
    /// the oldest goes beyond `CAPACITY`. A sample older than the last (the
    /// wall clock stepped back) is kept: else every sample would be "too
    /// soon" until the clock caught up, and the charts would stop.
    pub fn push(&mut self, s: Sample) {
        if self.samples.back().is_some_and(|l| (l.unix_ms..l.unix_ms + MIN_INTERVAL_MS).contains(&s.unix_ms))
        {
            return;
        }
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_spaced() {
        let mut h = History::default();
        for i in 0..(CAPACITY as u64 + 10) {
            h.push(Sample { unix_ms: i * 1_000, ..Default::default() });
            h.push(Sample { unix_ms: i * 1_000 + 10, ..Default::default() }); // too soon: dropped
        }
        let s = h.samples();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].unix_ms, 10_000);
    }

    #[test]
    fn a_wall_clock_stepped_back_does_not_stop_the_samples() {
        let mut h = History::default();
        h.push(Sample { unix_ms: 100_000, ..Default::default() });
        h.push(Sample { unix_ms: 80_000, ..Default::default() }); // stepped back 20 s
        h.push(Sample { unix_ms: 80_500, ..Default::default() }); // too soon after it
        h.push(Sample { unix_ms: 81_000, ..Default::default() });
        let at: Vec<u64> = h.samples().iter().map(|s| s.unix_ms).collect();
        assert_eq!(at, [100_000, 80_000, 81_000]);
    }
}
