//! An attribute (name, value) from an enrolled node, handed to the
//! registry's transition: no panic whatever the bytes (the crash of issue
//! 22 was a cut inside a character of the name), and a stored value is
//! one line.
#![no_main]
use ddisco_controller::plan::{Plan, Step, StepKind};
use ddisco_controller::registry::{Hello, NewNode, Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, String)| {
    let (name, value) = input;
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
    let plan = Plan::new(vec![Step {
        name: "collect".into(),
        kind: StepKind::Collect { attribute: "ssh_host_key".into(), path: "/k.pub".into() },
    }]);
    let mut hello = Hello::default();
    hello.facts.hostname = "node-1".into();
    let _ = r.on_hello(&id, hello, 1, &plan, false);
    for n in [name.as_str(), "ssh_host_key"] {
        if r.on_attribute(&id, n, &value).is_ok() {
            let kept = &r.get(&id).unwrap().rec.attributes;
            assert!(kept.values().all(|v| !v.contains(['\n', '\r'])));
        }
    }
});
