//! An attribute (name, value) from an enrolled node, handed to the
//! registry's transition: no panic whatever the bytes (the crash of issue
//! 22 was a cut inside a character of the name), and a stored value is
//! one line.
#![no_main]
use ddisco_controller::plan::{Plan, Step, StepKind};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|input: (String, String)| {
    let (name, value) = input;
    let plan = Plan::new(vec![Step {
        name: "collect".into(),
        kind: StepKind::Collect { attribute: "ssh_host_key".into(), path: "/k.pub".into() },
    }]);
    let (mut r, id) = common::registry_with_node(&plan);
    for n in [name.as_str(), "ssh_host_key"] {
        if r.on_attribute(&id, n, &value).is_ok() {
            let kept = &r.get(&id).unwrap().rec.attributes;
            assert!(kept.values().all(|v| !v.contains(['\n', '\r'])));
        }
    }
});
