//! Where nodes run. The controller only sees this interface; each provider
//! knows its own infrastructure (the local provider: processes; EC2: the AWS
//! SDK) and nothing else does.
//!
//! **Architecture Invariant:** providers carry out decisions, they do not make
//! them. What to launch or terminate is decided in `reconcile::decide`. A
//! provider may only choose *how* (which instance type or subnet of a pool,
//! when to back off).
//!
//! **Architecture Invariant:** only `provider/ec2.rs` knows about the AWS SDK.

pub mod ec2;
pub mod fallback;
pub mod images;
pub mod local;
pub mod record;
pub mod security_group;

use crate::model::Role;
use crate::plan::NodeLayout;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No capacity (or price too low) in any candidate of the pool.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The API throttles us; launches wait for the backoff.
    #[error("throttled: {0}")]
    Throttled(String),
    /// An account quota is used up: launches of that market wait.
    #[error("account quota: {0}")]
    Quota(String),
    /// The configuration is wrong (bad AMI, key, group, type...): launches
    /// stop until it is fixed.
    #[error("config key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Nodes to start in one provider call. `Debug` leaves the userdata out
/// (it holds the bootstrap tokens).
#[derive(Clone)]
pub struct LaunchBatch {
    /// Unique per launch: the idempotency token and the `ddisco:batch` tag.
    pub batch_id: String,
    pub role: Role,
    pub pool: String,
    /// Node ids in launch-index order (instance `i` of the call is node `i`).
    pub nodes: Vec<String>,
    /// Addresses from `Provider::address_for` (may be empty strings).
    pub addresses: Vec<String>,
    /// The boot script (see `userdata`): one slot per node.
    pub userdata: String,
}

impl std::fmt::Debug for LaunchBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchBatch")
            .field("batch_id", &self.batch_id)
            .field("role", &self.role)
            .field("pool", &self.pool)
            .field("nodes", &self.nodes)
            .field("addresses", &self.addresses)
            .field("userdata", &format_args!("<{} bytes, redacted: bootstrap tokens>", self.userdata.len()))
            .finish()
    }
}

// Plain data shared with the registry and the reconciler (which know no
// provider): defined in `model`.
pub use crate::model::{Launched, Observed, Target};

#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Where a node's files live (home for management keys, virtualenv).
    fn layout(&self, node_id: &str) -> NodeLayout;

    /// The address a node will have, when the provider chooses it up front
    /// (the local provider's loopback IPs); empty otherwise.
    fn address_for(&self, seq: u64) -> String;

    /// Most nodes one `launch` call takes.
    fn max_batch(&self) -> usize;

    /// How agents prove which instance they run on (EC2: the signed
    /// instance identity document); `None`: instances are not attested
    /// (local nodes are processes of this machine's user).
    fn attestor(&self) -> Option<&crate::attest::Attestor> {
        None
    }

    /// The instance metadata service nodes query (launch index, notices),
    /// if the provider has one.
    fn imds_url(&self) -> Option<&'static str> {
        None
    }

    /// How a node shuts itself down when its dead man's switch fires
    /// (`orphan_timeout_secs`): `exit` ends the node's processes (the local
    /// provider), `poweroff` powers the machine off (EC2, where the launch
    /// asks for termination on shutdown).
    fn orphan_action(&self) -> &'static str {
        "exit"
    }

    /// Checks the configuration against the provider before anything runs.
    async fn preflight(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The host names node `node_id` may have, where the provider knows
    /// them (`address`: its attested or assigned address; `instance_id`:
    /// its instance); empty when it cannot tell.
    fn host_names(&self, _node_id: &str, _address: &str, _instance_id: Option<&str>) -> Vec<String> {
        vec![]
    }

    /// How many cores an instance of this type has, where the provider
    /// knows (EC2: its vCPUs): a node's claim is held to it.
    fn cores_of(&self, _instance_type: &str) -> Option<u32> {
        None
    }

    /// Where its images live (EC2: the region); `None`: it has none.
    fn region(&self) -> Option<String> {
        None
    }

    /// Launch from these baked images (architecture -> image id) instead
    /// of the configured one; called before `preflight`, which drops those
    /// it cannot use.
    fn use_images(&self, _by_arch: HashMap<String, String>) {}

    /// Makes an image of a sealed node's machine (`bake`); returns its id.
    async fn create_image(&self, _instance_id: &str, _name: &str) -> Result<String, ProviderError> {
        Err(ProviderError::Config {
            key: "provider".into(),
            message: format!(
                "the {} provider has no machine images to bake: `bake` makes EC2 images (provider = \"ec2\"); \
                 local nodes take their packages from the controller's cache already",
                self.name()
            ),
        })
    }

    /// Is the image made by `create_image` ready to launch from? `Ok(false)`
    /// while it is pending.
    async fn image_ready(&self, _image_id: &str) -> Result<bool, ProviderError> {
        Ok(false)
    }

    /// `Err` without any API call while launches of `pool` cannot succeed
    /// (throttling backoff, configuration error, account quota).
    fn can_launch(&self, _role: Role, _pool: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Starts the batch; returns the instances started: possibly fewer
    /// than asked (EC2 launches what capacity and quotas allow), the first
    /// ones of `batch.nodes`; the others are not launched.
    async fn launch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError>;

    /// Every instance of this cluster the provider knows.
    async fn list(&self) -> Result<Vec<Observed>, ProviderError>;

    /// Terminates instances (idempotent: gone ones are skipped).
    async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError>;

    /// After `destroy`: release what is left (open spot requests).
    async fn cleanup(&self) -> Result<Vec<String>, ProviderError> {
        Ok(vec![])
    }

    /// A spot node of `pool` got a notice: an interruption (feeds the
    /// on-demand fallback) or a rebalance recommendation. Its replacement
    /// goes to another (type, zone) where the configuration has one.
    fn noticed(
        &self,
        _role: Role,
        _pool: &str,
        _node_id: &str,
        _instance_id: Option<&str>,
        _kind: crate::model::Notice,
    ) {
    }

    /// Would a new node of `pool` launch on spot now? (An on-demand node of
    /// a pool that is back on spot is replaced at the next scale change.)
    fn spot_again(&self, _role: Role, _pool: &str) -> bool {
        true
    }

    /// What it launches with, worth showing in status (e.g. the image).
    fn facts(&self) -> Vec<String> {
        vec![]
    }

    /// Conditions worth showing in status (cool-downs, backoff, blocks).
    fn notes(&self) -> Vec<String> {
        vec![]
    }

    /// Current price per hour (USD) of these instances, where known.
    async fn prices(&self, _instance_ids: &[String]) -> Result<HashMap<String, f64>, ProviderError> {
        Ok(HashMap::new())
    }

    /// API calls made so far: (action, calls, errors).
    fn api_calls(&self) -> Vec<(String, u64, u64)> {
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_batch_debug_never_shows_its_userdata() {
        let b = LaunchBatch {
            batch_id: "b1".into(),
            role: Role::Slave,
            pool: "default".into(),
            nodes: vec!["slave-0002".into()],
            addresses: vec![],
            userdata: "\"token\":\"tok-secret-123\"".into(),
        };
        let shown = format!("{b:?}");
        assert!(!shown.contains("tok-secret-123") && shown.contains("slave-0002"), "{shown}");
    }
}
