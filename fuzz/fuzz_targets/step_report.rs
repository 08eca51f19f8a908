//! A step report as it arrives (protobuf bytes), converted by `wire` and
//! applied by the registry to a provisioning node: no panic, and what is
//! kept stays within its bounds.
#![no_main]
use ddisco_controller::plan::{Plan, Step, StepKind};
use ddisco_controller::registry::{Hello, NewNode, Registry, StepReport};
use ddisco_proto::v1 as api;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = api::StepReport::decode(data) else { return };
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
    let plan = Plan::new(
        (0..3)
            .map(|i| Step { name: format!("s{i}"), kind: StepKind::Shell { script: "true".into(), env: Default::default() } })
            .collect(),
    );
    let mut hello = Hello::default();
    hello.facts.hostname = "node-1".into();
    let _ = r.on_hello(&id, hello, 1, &plan, false);
    let Ok(mut report) = StepReport::try_from(msg) else { return };
    // Half the time it claims the node's real plan, to get past that check.
    if data.first().is_some_and(|b| b % 2 == 0) {
        report.plan_id = plan.id.clone();
    }
    let _ = r.on_step(&id, report);
    let rec = &r.get(&id).unwrap().rec;
    assert!(rec.steps.len() <= 3);
    assert!(rec.steps.values().all(|l| l.output_tail.len() <= 8 * 1024));
});
