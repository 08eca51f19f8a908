//! What several targets start from: a registry with one enrolled slave
//! that said hello with `plan`.
use ddisco_controller::plan::Plan;
use ddisco_controller::registry::{Hello, NewNode, NodeEvent, Registry};

pub fn registry_with_node(plan: &Plan) -> (Registry, String) {
    let mut r = Registry::new(Default::default());
    let id = r.add_node(
        NewNode {
            role: ddisco_controller::model::Role::Slave,
            pool: "default".into(),
            batch: None,
            token_hash: "h".into(),
            token_expires_unix_ms: u64::MAX,
        },
        |_| String::new(),
    );
    let enrolled = NodeEvent::Enrolled { facts: Default::default(), now_ms: 1, cert_sha256: "fp" };
    r.transition(&id, enrolled).expect("a requested node enrolls");
    let mut hello = Hello::default();
    hello.facts.hostname = "node-1".into();
    let _ = r.transition(&id, NodeEvent::Hello { hello, workers: 1, plan, keep_identity: false });
    (r, id)
}
