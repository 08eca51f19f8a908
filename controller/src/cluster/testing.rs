//! Clusters for unit tests: the record provider (starts nothing) in a temp
//! dir, nodes put in place through the registry's transitions.

use super::*;
use crate::config::{Config, EngineKind};
use crate::plan::Plan;
use crate::registry::{Hello, NewNode, Outbound};
use tokio::sync::mpsc;

/// A cluster with the record provider (starts nothing) in a temp dir.
pub(crate) fn cluster(dir: &std::path::Path, engine: EngineKind) -> Cluster {
    let cfg = Config { state_dir: dir.to_path_buf(), engine, ..Config::default() };
    let pki = std::sync::Arc::new(Pki::load_or_create(dir, "test", &["127.0.0.1".to_string()]).expect("pki"));
    let engine = crate::engine::from_config(&cfg, "COOKIE".into(), pki.clone(), None);
    let provider = Arc::new(crate::provider::record::RecordProvider::new(dir).expect("record provider"));
    Cluster::new(Parts {
        registry: Registry::new(BTreeMap::from([("default".into(), 0)])),
        clock: Clock::new(),
        pki,
        provider,
        endpoints: Endpoints {
            grpc_url: String::new(),
            agent_url: String::new(),
            agent_sha256: String::new(),
            agent_arm64: None,
        },
        cluster_id: "c-000000000000".into(),
        fd_limit: u64::MAX,
        python_envs: vec![],
        engine,
        cfg,
    })
}

/// Adds a node that enrolled, said hello with an empty plan (so it is
/// ready at once) and has an open session; returns its session's receiver.
pub(crate) fn ready_node(sh: &Cluster, role: Role, i: usize) -> (String, mpsc::Receiver<Outbound>) {
    let mut reg = sh.registry.lock();
    let new = NewNode {
        role,
        pool: "default".into(),
        batch: None,
        token_hash: format!("h{i}"),
        token_expires_unix_ms: u64::MAX,
    };
    let id = reg.add_node(new, |seq| format!("10.0.{}.{}", seq / 250, seq % 250 + 1));
    let facts = Facts { logical_cores: 2, hostname: format!("ip-{i}"), ..Default::default() };
    reg.complete_enrollment(&id, facts.clone(), 1, "fp");
    reg.on_hello(&id, Hello { facts, ..Default::default() }, 2, &Plan::new(vec![]), false).unwrap();
    let (tx, rx) = mpsc::channel(64);
    reg.get(&id).unwrap().live.set_push(tx);
    (id, rx)
}
