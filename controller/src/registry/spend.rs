//! Spend accounting: what every priced node cost, counted as time passes.

use super::Registry;
use std::collections::HashMap;

/// The price a node is counted at: its own, or, unpriced (EC2's price
/// list could not say, e.g. on-demand without `pricing:GetProducts`), the
/// highest price known in the cluster: the spend cap is never blind to a
/// node, and errs on the side of stopping early.
pub fn counted_price(own: f64, highest_known: f64) -> f64 {
    if own > 0.0 { own } else { highest_known }
}

impl Registry {
    /// The highest price of a node now present (0 when none is priced).
    fn highest_price(&self) -> f64 {
        self.nodes.values().map(|e| e.rec.price_per_hour).fold(0.0, f64::max)
    }

    /// Adds what every node cost since it was last counted (unpriced ones at
    /// the highest known price, `counted_price`).
    pub fn account(&mut self, now_unix_ms: u64) {
        let mut spent = 0.0;
        let highest = self.highest_price();
        for e in self.nodes.values_mut() {
            let from = e.rec.accounted_unix_ms.max(e.rec.launched_unix_ms);
            if now_unix_ms > from {
                let price = counted_price(e.rec.price_per_hour, highest);
                spent += price * (now_unix_ms - from) as f64 / 3_600_000.0;
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

    /// USD per hour of the nodes present now (unpriced ones at the highest
    /// known price).
    pub fn cost_per_hour(&self) -> f64 {
        let highest = self.highest_price();
        self.nodes.values().map(|e| counted_price(e.rec.price_per_hour, highest)).sum()
    }

    /// Nodes present whose price is not known while another's is (EC2
    /// on-demand nodes without the price list): counted at the highest.
    pub fn unpriced(&self) -> usize {
        if self.highest_price() == 0.0 {
            return 0;
        }
        self.nodes.values().filter(|e| e.rec.price_per_hour == 0.0).count()
    }
}
