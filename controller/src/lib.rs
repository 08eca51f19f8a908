//! ddisco-controller: the control plane of disposable map/reduce clusters.
//!
//! # Layout
//! - [`config`]: the config file (TOML, or the original `config.json`),
//!   defaults and validation. Errors name the file and the key.
//! - [`model`]: roles, node states, worker counts. Plain data.
//! - [`reconcile`]: the decision function (desired vs observed -> actions).
//!   Plain data in and out, unit-tested without a network.
//! - [`plan`]: the steps a node's agent runs, from config + role + layout.
//! - [`registry`]: the node registry, tokens and events; persisted as
//!   `cluster.json` in the state directory.
//! - [`pki`]: the cluster CA, node certificates, bootstrap tokens.
//! - [`userdata`]: the boot script every node runs.
//! - [`provider`]: where nodes run (`local`: processes on this machine).
//! - [`cluster`]: the running cluster's shared state and what is done to
//!   it: agents' reports, one reconcile pass (`tick`), scale and destroy
//!   (`ops`).
//! - [`serve`]: `serve`'s wiring: listeners, PKI, provider, the loops.
//! - [`status`]: the status model shared by the admin API, the dashboard
//!   and the CLI.
//! - [`wire`]: every protobuf <-> domain conversion.
//! - [`engine`]: Disco and Dask, as plain functions over the membership.
//! - [`grpc`], [`download`], [`admin`], [`dashboard`]: the edges (agents'
//!   gRPC/TLS, agent download over HTTPS, local admin API on a Unix socket,
//!   `/metrics` over HTTP); [`metrics`] renders the Prometheus text.
//! - [`limits`]: the open-file limit `serve` raises, and whether it is
//!   enough for the cluster.
//! - [`cli`]: one module per subcommand.

pub mod admin;
pub mod admission;
pub mod attest;
pub mod autoscale;
pub mod autostop;
pub mod bake;
pub mod budget;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod download;
pub mod engine;
pub mod failures;
pub mod grpc;
pub mod history;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod plan;
pub mod provider;
pub mod pyenv;
pub mod reconcile;
pub mod registry;
pub mod serve;
pub mod state;
pub mod status;
pub mod text;
pub mod userdata;
pub mod wire;

pub use config::Config;
pub use model::{NodeState, Role};
