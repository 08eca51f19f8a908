//! Engines: what turns a node of a role into a Disco or Dask node. Each
//! engine lives in one module and is a set of plain functions:
//!
//! - `steps`: one-shot provisioning added to the node's plan (install,
//!   key generation, collecting a public key for the controller);
//! - `directives`: the engine's desired state on one node as a function of
//!   the whole membership (services to run, files to own, HTTP posts to
//!   make). The controller recomputes it on every membership change and the
//!   agent converges on it;
//! - `endpoints` / `lines`: how to reach the engine, for `status`.
//!
//! **Architecture Invariant:** engine knowledge lives here, one module per
//! engine; the agent only knows the generic primitives (steps, services,
//! managed files, posts).

pub mod dask;
pub mod disco;

use crate::model::Role;
use crate::plan::{NodeLayout, Step};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// A node as engines see it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Member {
    pub id: String,
    pub role: Option<Role>,
    /// Address engines bind to and peers dial.
    pub address: String,
    /// Short host name (first label).
    pub hostname: String,
    pub workers: u32,
    /// Its plan finished.
    pub ready: bool,
    /// Being drained before removal, or interrupted: engines stop giving it
    /// work.
    pub leaving: bool,
    /// Values its agent collected (public keys...).
    pub attributes: BTreeMap<String, String>,
}

impl Member {
    pub fn is_master(&self) -> bool {
        self.role == Some(Role::Master)
    }
}

/// The ready master that is not leaving, if any.
pub fn master(members: &[Member]) -> Option<&Member> {
    members.iter().find(|m| m.is_master() && m.ready && !m.leaving && !m.address.is_empty())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DirectiveKind {
    Service {
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        workdir: String,
        grace_ms: u32,
    },
    File {
        path: String,
        content: String,
        mode: u32,
        owner: String,
        marker: String,
    },
    Post {
        url: String,
        body: String,
        content_type: String,
    },
    /// A local URL the agent reads about once a second; the body comes
    /// back (`Engine::probed`) whenever it changes.
    Probe {
        url: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Directive {
    pub name: String,
    #[serde(flatten)]
    pub kind: DirectiveKind,
}

/// What a probe's answer tells the controller (`None`: nothing about it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probed {
    /// Leaving hosts that hold nothing only they have.
    pub safe_to_remove: Option<Vec<String>>,
    /// The engine has work (jobs, tasks, clients).
    pub busy: Option<bool>,
    /// Worker processes the engine's backlog asks for (adaptive size).
    pub target_workers: Option<u32>,
}

pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// Does a node leaving need draining first (its work moved away)?
    fn drains(&self) -> bool {
        true
    }
    /// Provisioning steps for a node of `role` (run after packages and pip,
    /// before management keys and POST_INIT).
    fn steps(&self, role: Role, workers: u32, layout: &NodeLayout) -> Vec<Step>;
    /// The shell steps of `steps` that leave only machine state, the same
    /// on every node (installs, users, folders): a baked image may hold
    /// them (`plan::is_image_step`). Never a step that makes a secret.
    fn image_steps(&self) -> &'static [&'static str] {
        &[]
    }
    /// The desired engine state on `me`, given every member.
    fn directives(&self, me: &Member, members: &[Member], layout: &NodeLayout) -> Vec<Directive>;
    /// What the master's probe `name` answered (untrusted: the body comes
    /// from a node), read: which leaving hosts can go now without loss,
    /// whether the engine has work. `Err` for a probe this engine never
    /// asked for or a body it cannot read.
    fn probed(&self, name: &str, _body: &str) -> Result<Probed, String> {
        Err(format!("probe {name:?} is not one the {} engine asks for", self.name()))
    }
    /// Do a node's directives depend only on the node itself and the
    /// masters (then a change to one slave recomputes only that slave's)?
    fn partial(&self) -> bool {
        false
    }
    /// A fingerprint of everything in the membership that a node's
    /// directives depend on besides the node itself. While it stays the
    /// same, only the nodes that changed are recomputed. The default (the
    /// whole membership) recomputes every node on any change.
    fn shared_key(&self, members: &[Member]) -> String {
        let mut h = Sha256::new();
        for m in members {
            h.update(format!("{m:?}\n").as_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }
    /// When the engine's directives next change with time alone (its
    /// certificates' renewal): the controller publishes again then. `None`:
    /// never.
    fn renews_at(&self) -> Option<std::time::SystemTime> {
        None
    }
    /// Named addresses (`scheduler`, `dashboard`, `master`...).
    fn endpoints(&self, members: &[Member]) -> BTreeMap<String, String>;
    /// Lines for humans: tunnels, links.
    fn lines(&self, members: &[Member]) -> Vec<String>;
}

/// No engine: nodes are provisioned and kept, nothing more.
pub struct NoEngine;

impl Engine for NoEngine {
    fn name(&self) -> &'static str {
        "none"
    }
    fn drains(&self) -> bool {
        false
    }
    fn partial(&self) -> bool {
        true
    }
    fn shared_key(&self, _: &[Member]) -> String {
        String::new()
    }
    fn steps(&self, _: Role, _: u32, _: &NodeLayout) -> Vec<Step> {
        vec![]
    }
    fn directives(&self, _: &Member, _: &[Member], _: &NodeLayout) -> Vec<Directive> {
        vec![]
    }
    fn endpoints(&self, _: &[Member]) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    fn lines(&self, _: &[Member]) -> Vec<String> {
        vec![]
    }
}

/// The engine named by the configuration.
pub fn from_config(
    cfg: &crate::config::Config,
    cookie: String,
    pki: std::sync::Arc<crate::pki::Pki>,
    disco_bundle: Option<disco::Bundle>,
) -> Box<dyn Engine> {
    match cfg.engine {
        crate::config::EngineKind::None => Box::new(NoEngine),
        crate::config::EngineKind::Dask => Box::new(dask::Dask::from_config(cfg, pki)),
        crate::config::EngineKind::Disco => Box::new(disco::Disco::from_config(cfg, cookie, disco_bundle)),
    }
}

/// One node's directives, with their content hash as id (an agent that
/// has this id has them all).
#[derive(Debug, Clone, PartialEq)]
pub struct DirectiveSet {
    pub id: String,
    pub items: Vec<Directive>,
    /// Bytes serialised to compute the id (work accounting).
    pub json_len: usize,
}

impl DirectiveSet {
    pub fn new(items: Vec<Directive>) -> DirectiveSet {
        let json = serde_json::to_vec(&items).expect("directives serialize");
        DirectiveSet { id: hex::encode(&Sha256::digest(&json)[..12]), items, json_len: json.len() }
    }
}

/// `path` inside the node's root (the local provider gives each node its own).
pub fn under(layout: &NodeLayout, path: &str) -> String {
    layout.root.join(path.trim_start_matches('/')).display().to_string()
}
