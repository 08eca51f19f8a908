//! ddisco-agent: the small static binary on every node.
//!
//! # Layout
//! - [`model`]: the agent's domain (assignment, plan and steps, engine
//!   directives, reports); [`wire`] converts it from and to the generated
//!   protobuf types, which appear only there, in `session` and `identity`.
//! - [`identity`]: the bootstrap file, enrollment (token -> client
//!   certificate), and the identity kept on disk afterwards.
//! - [`facts`]: what the agent reports about its node (cores, memory, ...).
//! - [`imds`]: the EC2 instance metadata service (instance id, launch index,
//!   spot interruption and rebalance notices).
//! - [`session`]: the long-lived mutual-TLS session: hello, assignment,
//!   heartbeats, step reports, reconnects with backoff and jitter.
//! - [`scratch`]: the `scratch` step: instance-store volumes formatted and
//!   mounted (striped if several) as the node's scratch space.
//! - [`steps`]: runs the plan's steps in order and keeps progress on disk,
//!   so a reconnect never re-runs a finished step.
//! - [`backoff`], [`files`], [`command`]: the primitives the others share:
//!   retry delays, the agent's private files, running a step's process.
//! - [`cgroup`]: services in cgroups (as root, with cgroup v2): stopping a
//!   service kills everything it started, daemons included.
//! - [`orphan`]: the dead man's switch: no session with the controller for
//!   `orphan_timeout_secs`, and the node shuts itself down.
//! - [`bake`]: images baked by `ddisco-controller bake`: the `seal` step
//!   that prepares a node to be imaged, and the record (`baked.json`) by
//!   which a node booted from the image skips the steps it holds.
//! - [`converge`]: applies the engine directives the controller pushes
//!   (supervised services, managed files, HTTP posts) once the plan is done.
//!
//! **Architecture Invariant:** no AWS SDK and no aws-lc in this crate's
//! dependency tree; TLS uses rustls with ring.

pub mod backoff;
pub mod bake;
pub mod cgroup;
pub mod command;
pub mod converge;
pub mod facts;
pub mod files;
pub mod identity;
pub mod imds;
pub mod model;
pub mod orphan;
pub mod pyenv;
pub mod scratch;
pub mod session;
pub mod steps;
pub mod wire;

/// Errors that end the agent: retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("the controller refused enrollment: {0}")]
    EnrollmentRefused(String),
    #[error("the controller refused this node's session: {0}")]
    SessionRefused(String),
    #[error("{0}")]
    Setup(String),
}
