//! A step report as it arrives (protobuf bytes), converted by `wire` and
//! applied by the registry to a provisioning node: no panic, and what is
//! kept stays within its bounds.
#![no_main]
use ddisco_controller::plan::{Plan, Step, StepKind};
use ddisco_controller::registry::StepReport;
use ddisco_proto::v1 as api;
use libfuzzer_sys::fuzz_target;
use prost::Message;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = api::StepReport::decode(data) else { return };
    let plan = Plan::new(
        (0..3)
            .map(|i| Step {
                name: format!("s{i}"),
                kind: StepKind::Shell { script: "true".into(), env: Default::default() },
            })
            .collect(),
    );
    let (mut r, id) = common::registry_with_node(&plan);
    let Ok(mut report) = StepReport::try_from(msg) else { return };
    // Half the time it claims the node's real plan, to get past that check.
    if data.first().is_some_and(|b| b % 2 == 0) {
        report.plan_id = plan.id.clone();
    }
    let _ = r.transition(&id, ddisco_controller::registry::NodeEvent::Step(report));
    let rec = &r.get(&id).unwrap().rec;
    assert!(rec.steps.len() <= 3);
    assert!(rec.steps.values().all(|l| l.output_tail.len() <= 8 * 1024));
});
