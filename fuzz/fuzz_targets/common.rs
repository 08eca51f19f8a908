//! What several targets start from: a registry with one enrolled slave
//! that said hello with `plan`.
use ddisco_controller::plan::Plan;
use ddisco_controller::registry::{Hello, NewNode, Registry};

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
    r.complete_enrollment(&id, Default::default(), 1, "fp");
    let mut hello = Hello::default();
    hello.facts.hostname = "node-1".into();
    let _ = r.on_hello(&id, hello, 1, plan, false);
    (r, id)
}
