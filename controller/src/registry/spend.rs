//! Spend accounting: what every priced node cost, counted as time passes.

use super::Registry;
use std::collections::HashMap;

impl Registry {
    /// Adds what every priced node cost since it was last counted.
    pub fn account(&mut self, now_unix_ms: u64) {
        let mut spent = 0.0;
        for e in self.nodes.values_mut() {
            let from = e.rec.accounted_unix_ms.max(e.rec.launched_unix_ms);
            if now_unix_ms > from {
                spent += e.rec.price_per_hour * (now_unix_ms - from) as f64 / 3_600_000.0;
                e.rec.accounted_unix_ms = now_unix_ms;
            }
        }
        self.spent_usd += spent;
    }

    /// New prices by instance id; the time so far is counted at the old
    /// prices first.
    pub fn set_prices(&mut self, prices: &HashMap<String, f64>, now_unix_ms: u64) {
        self.account(now_unix_ms);
        for e in self.nodes.values_mut() {
            if let Some(p) = e.rec.instance_id.as_ref().and_then(|i| prices.get(i)) {
                e.rec.price_per_hour = *p;
                self.dirty = true;
            }
        }
    }

    /// USD per hour of the nodes present now.
    pub fn cost_per_hour(&self) -> f64 {
        self.nodes.values().map(|e| e.rec.price_per_hour).sum()
    }
}
