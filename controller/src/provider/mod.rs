//! Where nodes run. The controller only sees this interface; each provider
//! knows its own infrastructure (the local provider: processes; EC2: the AWS
//! SDK) and nothing else does.
//!
//! **Architecture Invariant:** providers carry out decisions, they do not make
//! them. What to launch or terminate is decided in `reconcile::decide`.

pub mod local;

use crate::model::Role;
use crate::plan::NodeLayout;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// One node to start.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub node_id: String,
    pub role: Role,
    /// The boot script (see `userdata`); holds the node's bootstrap token.
    pub userdata: String,
    /// Address chosen by `Provider::address_for` (may be empty).
    pub address: String,
}

#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Where a node's files live (home for management keys, virtualenv).
    fn layout(&self, node_id: &str) -> NodeLayout;

    /// The address a node will have, when the provider chooses it up front
    /// (the local provider's loopback IPs); empty otherwise.
    fn address_for(&self, seq: u64) -> String;

    /// Starts the nodes. One result per request, in order: the instance id.
    async fn launch(&self, requests: Vec<LaunchRequest>) -> Vec<Result<String, ProviderError>>;

    /// Every instance of this cluster the provider knows: node id -> alive.
    async fn list(&self) -> Result<HashMap<String, bool>, ProviderError>;

    /// Terminates the nodes' instances (idempotent: gone ones are skipped).
    async fn terminate(&self, node_ids: &[String]) -> Result<(), ProviderError>;
}
