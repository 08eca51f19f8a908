//! A node as `cluster.json` stores it ([`NodeRecord`]), and what older
//! controllers wrote that still loads (the migrations are serde's: field
//! names kept, `notice_compat`, the market suffix in `Registry::from_json`).
//! Its state is private to the registry: only `Registry::transition`
//! changes it.

use crate::model::{Market, NodeState, Notice, Role, StepStatus, unix_ms};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Facts an agent reports about its node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Facts {
    pub instance_id: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub logical_cores: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
    #[serde(default)]
    pub started_unix_ms: u64,
    /// "x86_64", "aarch64" (empty from an older agent).
    #[serde(default)]
    pub arch: String,
}

/// A node as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub role: Role,
    /// Slave pool (`master` for the master).
    #[serde(default)]
    pub pool: String,
    pub seq: u64,
    /// Where it is in its life: read with `state()`, changed only by
    /// `Registry::transition`.
    #[serde(flatten)]
    pub(super) state: NodeState,
    /// (launch batch id, launch index): finds the instance after a crash.
    #[serde(default)]
    pub batch: Option<(String, u32)>,
    #[serde(default)]
    pub instance_type: String,
    /// Spot or on-demand.
    #[serde(default)]
    pub market: Market,
    /// Where it landed and why there (the provider's ranking), if it says.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub placement: String,
    /// Interruption/rebalance notice received, if any.
    #[serde(default, deserialize_with = "notice_compat")]
    pub notice: Option<Notice>,
    /// On-demand while its pool is back on spot: to be replaced by spot.
    #[serde(default)]
    pub superseded: bool,
    /// Values its agent collected for the engine (public keys...).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Problems its engine directives reported, by directive name (a
    /// directive that works again clears its own).
    #[serde(default)]
    pub engine_problems: BTreeMap<String, String>,
    /// When each boot phase began, in order (boot diagnostics).
    #[serde(default)]
    pub phases: Vec<(String, u64)>,
    /// Each step's last report, by step name.
    #[serde(default)]
    pub steps: BTreeMap<String, StepLog>,
    /// Current price, USD per hour (0: unknown or free).
    #[serde(default)]
    pub price_per_hour: f64,
    /// Spend counted up to this time (unix ms).
    #[serde(default)]
    pub accounted_unix_ms: u64,
    /// Its instance was listed once (saved: after a restart, an instance
    /// listed before and missing now is gone at once, as listings leave out
    /// terminated instances).
    #[serde(default)]
    pub listed: bool,
    /// Why the node is in its state (failed step output, loss reason, ...).
    #[serde(default)]
    pub detail: String,
    pub instance_id: Option<String>,
    /// Address the provider gave the node (the local provider's loopback IP).
    #[serde(default)]
    pub address: String,
    pub launched_unix_ms: u64,
    pub token_hash: String,
    pub token_expires_unix_ms: u64,
    pub token_used: bool,
    #[serde(default)]
    pub facts: Option<Facts>,
    #[serde(default)]
    pub workers: u32,
    #[serde(default)]
    pub plan_id: String,
    #[serde(default)]
    pub current_step: String,
    /// The attributes its plan collects (the only ones it may send).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collects: Vec<String>,
    /// Its plan's step names, in order (reports must name these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_names: Vec<String>,
    /// SHA-256 (hex) of the client certificate issued to it: the only one
    /// its sessions may present.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// A renewed certificate, accepted besides the current one until a
    /// session presents it (then it is the current one).
    #[serde(default)]
    pub cert_sha256_next: Option<String>,
    /// Enrolled before certificates were pinned (read from an older
    /// cluster.json): its first session's certificate is pinned.
    #[serde(skip)]
    pub pin_first_session: bool,
}

/// Reads `notice` as written now (null or the kind) and as written before
/// it was typed (a string, empty for none).
fn notice_compat<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Notice>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None | Some("") => Ok(None),
        Some("spot-interruption") => Ok(Some(Notice::SpotInterruption)),
        Some("rebalance-recommendation") => Ok(Some(Notice::Rebalance)),
        Some(other) => Err(serde::de::Error::custom(format!("unknown notice {other:?}"))),
    }
}

/// A step's last report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub status: StepStatus,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub output_tail: String,
}

impl NodeRecord {
    pub fn state(&self) -> &NodeState {
        &self.state
    }

    /// Sets the state without a transition: for tests of code that reads
    /// records (status, metrics), never for the controller itself.
    #[cfg(test)]
    pub fn set_state_for_test(&mut self, state: NodeState) {
        self.state = state;
    }

    /// Its engine problems in one line (empty: none).
    pub fn engine_detail(&self) -> String {
        let parts: Vec<String> =
            self.engine_problems.iter().map(|(name, msg)| format!("engine: {name}: {msg}")).collect();
        parts.join("; ")
    }

    /// Where peers reach it: the provider's address, else the first one its
    /// agent reported.
    pub fn address(&self) -> &str {
        if !self.address.is_empty() {
            return &self.address;
        }
        self.facts.as_ref().and_then(|f| f.addresses.first()).map_or("", String::as_str)
    }

    /// Notes the start of a boot phase (once per name in a row).
    pub fn phase(&mut self, name: impl Into<String>) {
        let name = name.into();
        if self.phases.last().is_some_and(|(n, _)| *n == name) {
            return;
        }
        // Bounded: a node that keeps reconnecting does not grow without end.
        if self.phases.len() < 64 {
            self.phases.push((name, unix_ms()));
        }
    }
}
