//! The recording provider, for benchmarks and tests: launching writes each
//! batch (node ids + userdata) to `<state_dir>/launches/<batch>.json` (0600)
//! and starts nothing; whoever reads the file plays the nodes (the benchmark
//! runs simulated agents with real connections). Instances live until
//! terminated.

use super::{LaunchBatch, Launched, Observed, Provider, ProviderError, Target};
use crate::plan::NodeLayout;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct RecordProvider {
    dir: PathBuf,
    /// node id -> instance id; std mutex, never held across `.await`.
    live: Mutex<BTreeMap<String, String>>,
}

impl RecordProvider {
    pub fn new(state_dir: &Path) -> std::io::Result<RecordProvider> {
        let dir = state_dir.join("launches");
        std::fs::create_dir_all(&dir)?;
        Ok(RecordProvider { dir, live: Mutex::default() })
    }
}

#[async_trait::async_trait]
impl Provider for RecordProvider {
    fn name(&self) -> &'static str {
        "record"
    }

    fn layout(&self, node_id: &str) -> NodeLayout {
        let root = self.dir.join("nodes").join(node_id);
        NodeLayout {
            home: root.join("home"),
            venv: root.join("venv"),
            root,
            owner: None,
            install_packages: false,
            system: false,
            scratch: None,
        }
    }

    fn address_for(&self, _seq: u64) -> String {
        String::new()
    }

    fn max_batch(&self) -> usize {
        1000
    }

    async fn launch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
        let record = serde_json::json!({
            "batch": batch.batch_id,
            "role": batch.role.to_string(),
            "pool": batch.pool,
            "nodes": batch.nodes,
            "launched_unix_ms": crate::model::unix_ms(),
            "userdata": batch.userdata,
        });
        let path = self.dir.join(format!("{}.json", batch.batch_id));
        crate::pki::write_private(&path, &record.to_string())
            .map_err(|e| ProviderError::Other(e.to_string()))?;
        let mut live = self.live.lock();
        Ok(batch
            .nodes
            .iter()
            .map(|n| {
                let instance_id = format!("rec-{n}");
                live.insert(n.clone(), instance_id.clone());
                Launched {
                    node_id: n.clone(),
                    instance_id,
                    instance_type: "record".into(),
                    market: crate::model::Market::Spot,
                    on_demand_why: None,
                    placement: String::new(),
                }
            })
            .collect())
    }

    async fn list(&self) -> Result<Vec<Observed>, ProviderError> {
        let live = self.live.lock();
        Ok(live
            .iter()
            .map(|(n, i)| Observed {
                instance_id: i.clone(),
                node_id: Some(n.clone()),
                batch: None,
                alive: true,
                foreign: false,
            })
            .collect())
    }

    async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError> {
        let mut live = self.live.lock();
        for t in targets {
            if let Some(n) = &t.node_id {
                live.remove(n);
            }
        }
        Ok(())
    }
}
