//! `cluster.json`: the file format, and what restoring it re-creates
//! (liveness with a grace period, the token index, the claims).

use super::{Entry, Liveness, NodeRecord, Registry, claims_of};
use crate::model::Market;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Serialize, Deserialize, Default)]
struct ClusterFile {
    /// Slaves wanted per pool.
    desired: BTreeMap<String, u32>,
    /// USD spent since the cluster was created (replaced nodes included).
    #[serde(default)]
    spent_usd: f64,
    /// `scale MIN..MAX` in force: [MIN, MAX].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adaptive: Option<[u32; 2]>,
    next_seq: u64,
    nodes: Vec<NodeRecord>,
    /// Failed nodes already terminated: what they reported is kept.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    failed_nodes: VecDeque<NodeRecord>,
    /// When its first node was launched (`max_runtime_mins` counts from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_unix_ms: Option<u64>,
}

impl Registry {
    /// Restores a saved registry. Every node counts as heard from `seen_ms`
    /// (may lie in the future: a grace period), so agents get time to
    /// reconnect to a restarted controller before anything is declared lost.
    pub fn from_json(text: &str, seen_ms: u64) -> Result<Registry, serde_json::Error> {
        let file: ClusterFile = serde_json::from_str(text)?;
        let mut reg = Registry {
            desired: file.desired,
            spent_usd: file.spent_usd,
            next_seq: file.next_seq,
            adaptive_bounds: file.adaptive.map(|[min, max]| (min, max)),
            failed_nodes: file.failed_nodes,
            started_unix_ms: file.started_unix_ms,
            ..Default::default()
        };
        for mut rec in file.nodes {
            // Before the market was a field it was a suffix of the type.
            if let Some(t) = rec.instance_type.strip_suffix(" on-demand") {
                rec.instance_type = t.to_string();
                rec.market = Market::OnDemand;
            }
            let live = Arc::new(Liveness::default());
            live.touch(seen_ms);
            reg.token_index.insert(rec.token_hash.clone(), rec.id.clone());
            rec.pin_first_session = rec.token_used && rec.cert_sha256.is_none();
            for c in claims_of(&rec) {
                reg.claims.insert(c, rec.id.clone());
            }
            reg.nodes.insert(rec.id.clone(), Entry { rec, live });
        }
        Ok(reg)
    }

    pub fn to_json(&self) -> String {
        let file = ClusterFile {
            desired: self.desired.clone(),
            spent_usd: self.spent_usd,
            adaptive: self.adaptive_bounds.map(|(min, max)| [min, max]),
            next_seq: self.next_seq,
            nodes: self.nodes.values().map(|e| e.rec.clone()).collect(),
            failed_nodes: self.failed_nodes.clone(),
            started_unix_ms: self.started_unix_ms,
        };
        serde_json::to_string(&file).expect("registry serializes")
    }
}
