//! Issue 22, item 1: nothing a node sends can stop the controller.
//!
//! Property: any sequence of session messages of every kind, from any
//! node (master, slaves, a node not enrolled yet, one being terminated),
//! with arbitrary UTF-8 and lengths around every limit the controller
//! applies, goes through the session handler (`take_guarded`, the code a
//! real session runs per message) without a panic escaping, and after each
//! message the controller still answers `status` and `scale`, and a
//! reconcile pass still runs. A message that made the controller panic
//! would fail here twice: once in `take` (caught, the node failed with
//! "could not handle", which the property refuses), and in the status or
//! scale check if a mutex were left poisoned.

use super::*;
use crate::cluster::testing::{cluster, ready_node};
use crate::config::EngineKind;
use crate::model::Role;
use api::agent_message::Msg;
use proptest::prelude::*;

/// Lengths around the limits the controller applies to node input:
/// display cuts (64, 80, 200), names (63 per label, 253 host names, 256
/// directive names), messages (1,024), step output (4 KiB, 8 KiB), keys
/// (4,096), attributes (16 KiB), probe bodies (256 KiB).
const LIMITS: &[usize] = &[
    0,
    1,
    63,
    64,
    65,
    79,
    80,
    81,
    199,
    200,
    201,
    253,
    254,
    256,
    257,
    1023,
    1024,
    1025,
    4095,
    4096,
    4097,
    8192,
    8193,
    16384,
    16385,
    MAX_PROBE_BODY,
    MAX_PROBE_BODY + 1,
];
const MAX_PROBE_BODY: usize = crate::cluster::MAX_PROBE_BODY;

/// Text: arbitrary UTF-8, or a length around a limit made of one- to
/// four-byte characters (so a byte cut at the limit falls inside one),
/// control characters and separators.
fn text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec!["a", "é", "€", "😀", "\n", "\u{1b}[2J", "-", ".", " ", "\0", "9"]);
    prop_oneof![
        3 => any::<String>(),
        2 => (prop::sample::select(LIMITS), prop::collection::vec(pieces, 1..4)).prop_map(|(len, parts)| {
            let mut s = String::with_capacity(len + 4);
            let mut i = 0;
            while s.len() < len {
                s.push_str(parts[i % parts.len()]);
                i += 1;
            }
            s
        }),
        1 => Just(String::new()),
    ]
}

/// Names the controller knows (probe and attribute names, step names of
/// plans) besides arbitrary ones: a known name gets past the first check.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => text(),
        1 => prop::sample::select(vec![
            "counts", "joblist", "nodeinfo", "safe_gc_blacklist", "gc_start", "ssh_host_key",
            "disco_pubkey", "hosts", "worker", "s0",
        ]).prop_map(String::from),
    ]
}

/// Probe bodies: arbitrary text, or JSON of the shapes the engines read
/// with extreme numbers.
fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => text(),
        1 => (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d)| format!(
            r#"{{"processing":{a},"waiting":{b},"unrunnable":{c},"clients":{d},"desired_workers":{a}}}"#
        )),
        1 => (any::<u64>(), any::<u64>(), text()).prop_map(|(a, b, h)| format!(
            r#"{{"h1":{{"max_workers":{a},"tasks":[1,2],"connected":true}},"h2":{{"max_workers":{b},"tasks":[],"connected":true}},{:?}:{{}}}}"#,
            h
        )),
        1 => prop::collection::vec(text(), 0..4).prop_map(|v| serde_json::to_string(&v).unwrap()),
    ]
}

fn facts() -> impl Strategy<Value = api::NodeFacts> {
    let arch = text();
    (
        text(),
        text(),
        prop::collection::vec(text(), 0..20),
        any::<u32>(),
        any::<u64>(),
        text(),
        any::<u64>(),
        arch,
    )
        .prop_map(
            |(
                instance_id,
                hostname,
                addresses,
                logical_cores,
                memory_bytes,
                agent_version,
                started,
                arch,
            )| {
                api::NodeFacts {
                    instance_id,
                    hostname,
                    addresses,
                    logical_cores,
                    memory_bytes,
                    agent_version,
                    started_unix_ms: started,
                    arch,
                }
            },
        )
}

/// Every kind of message an agent can send (and none: an empty oneof).
fn message() -> impl Strategy<Value = api::AgentMessage> {
    let msg = prop_oneof![
        (any::<u64>(), any::<Option<u32>>())
            .prop_map(|(seq, load_milli)| Msg::Heartbeat(api::Heartbeat { seq, load_milli })),
        (facts(), text(), any::<u32>()).prop_map(|(f, plan_id, completed_steps)| Msg::Hello(api::Hello {
            facts: Some(f),
            plan_id,
            completed_steps
        })),
        (
            text(),
            prop_oneof![any::<u32>(), 0u32..4],
            name(),
            any::<i32>(),
            any::<u64>(),
            any::<i32>(),
            text()
        )
            .prop_map(|(plan_id, index, name, status, duration_ms, exit_code, output_tail)| {
                Msg::Step(api::StepReport {
                    plan_id,
                    index,
                    name,
                    status,
                    duration_ms,
                    exit_code,
                    output_tail,
                })
            }),
        (any::<i32>(), text()).prop_map(|(kind, detail)| Msg::Notice(api::Notice { kind, detail })),
        (name(), text()).prop_map(|(name, value)| Msg::Attribute(api::Attribute { name, value })),
        (text(), name(), any::<bool>(), text()).prop_map(|(directives_id, name, ok, message)| {
            Msg::Directive(api::DirectiveReport { directives_id, name, ok, message })
        }),
        text().prop_map(|csr_pem| Msg::Renew(api::Renew { csr_pem })),
        (name(), body()).prop_map(|(name, body)| Msg::Probe(api::ProbeResult { name, body })),
    ];
    prop_oneof![20 => msg.prop_map(Some), 1 => Just(None)].prop_map(|msg| api::AgentMessage { msg })
}

/// A cluster of a master, two ready slaves, one enrolled (no hello yet)
/// and one being terminated; returns it and the node ids.
fn hostile_ground(dir: &std::path::Path, engine: EngineKind) -> (Cluster, Vec<String>) {
    let sh = cluster(dir, engine);
    let mut ids = vec![ready_node(&sh, Role::Master, 0).0, ready_node(&sh, Role::Slave, 1).0];
    ids.push(ready_node(&sh, Role::Slave, 2).0);
    {
        let mut reg = sh.registry.lock();
        let new = |h: &str| crate::registry::NewNode {
            role: Role::Slave,
            pool: "default".into(),
            batch: None,
            token_hash: h.into(),
            token_expires_unix_ms: u64::MAX,
        };
        let enrolled = reg.add_node(new("e"), |_| String::new());
        reg.complete_enrollment(&enrolled, Default::default(), 1, "fp");
        let leaving = reg.add_node(new("t"), |_| String::new());
        reg.apply(
            crate::reconcile::Action::Terminate {
                id: leaving.clone(),
                reason: crate::reconcile::Reason::ScaleDown,
            },
            0.0,
        )
        .unwrap();
        ids.extend([enrolled, leaving, "slave-9999".into()]);
    }
    (sh, ids)
}

fn renewal(asked: bool) -> Renewal {
    Renewal { not_after: i64::MAX, validity: Duration::from_secs(3600), requested: asked, issued: false }
}

/// The controller still answers: status builds, a scale is taken, and the
/// registry can be locked (nothing left poisoned or held).
fn still_answers(sh: &Cluster, size: u32) {
    let view = crate::status::StatusView::of(sh);
    assert!(!view.nodes.is_empty());
    crate::cluster::ops::scale(sh, size, &Default::default(), None).expect("scale is taken");
    assert_eq!(sh.registry.lock().desired_slaves(), size);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_sequence_of_node_messages_stops_the_controller(
        engine in prop::sample::select(vec![EngineKind::Dask, EngineKind::Disco, EngineKind::None]),
        msgs in prop::collection::vec((0usize..6, any::<bool>(), message()), 1..24),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (sh, ids) = hostile_ground(dir.path(), engine);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for (i, (who, asked, msg)) in msgs.into_iter().enumerate() {
            let node = &ids[who];
            let live = sh.registry.lock().get(node).map(|e| e.live.clone()).unwrap_or_default();
            let kind = message_kind(&msg);
            match take_guarded(&sh, node, &live, &mut renewal(asked), msg) {
                Err(Handled::Failed(why)) => {
                    prop_assert!(!why.contains("could not handle"), "{kind} message panicked the controller");
                }
                Ok(_) | Err(Handled::Refused(_) | Handled::Closed) => {}
            }
            still_answers(&sh, (i % 5) as u32);
            sh.publish();
        }
        // The reconcile loop still runs over whatever the nodes left.
        rt.block_on(crate::cluster::tick::pass(&std::sync::Arc::new(sh)));
    }
}

/// The message that stopped the controller (issue 22): an attribute whose
/// name has a two-byte character across byte 64. Now refused, its node
/// failed with the reason, and the controller answers.
#[test]
fn an_attribute_name_cut_inside_a_character_fails_only_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, ids) = hostile_ground(dir.path(), EngineKind::Dask);
    let slave = &ids[1];
    let live = sh.registry.lock().get(slave).unwrap().live.clone();
    let name = format!("{}é", "a".repeat(63));
    let msg = api::AgentMessage { msg: Some(Msg::Attribute(api::Attribute { name, value: "x".into() })) };
    let r = take_guarded(&sh, slave, &live, &mut renewal(false), msg);
    assert!(matches!(&r, Err(Handled::Failed(why)) if why.contains("not one its plan collects")));
    let reg = sh.registry.lock();
    let rec = &reg.get(slave).unwrap().rec;
    assert!(rec.state().is(crate::model::StateKind::Failed), "{rec:?}");
    drop(reg);
    still_answers(&sh, 3);
    // The master's probe with such a name: refused, nothing fails.
    let master = &ids[0];
    let live = sh.registry.lock().get(master).unwrap().live.clone();
    let name = format!("{}€", "p".repeat(62));
    let msg = api::AgentMessage { msg: Some(Msg::Probe(api::ProbeResult { name, body: "{}".into() })) };
    assert!(matches!(take_guarded(&sh, master, &live, &mut renewal(false), msg), Err(Handled::Refused(_))));
    still_answers(&sh, 1);
}

/// A panic in handling (whatever bug a message finds) fails the node with
/// the reason instead of leaving with the registry half-changed.
#[test]
fn a_panic_while_handling_fails_the_node_and_the_controller_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (sh, ids) = hostile_ground(dir.path(), EngineKind::Dask);
    let slave = ids[1].clone();
    // The registry's lock is held when the panic unwinds (as in the crash
    // this issue found): it must not stay poisoned or held.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _held = sh.registry.lock();
        panic!("a bug some message found");
    }));
    assert!(r.is_err());
    sh.internal_failure(&slave, "attribute", "a bug some message found");
    let reg = sh.registry.lock();
    let rec = &reg.get(&slave).unwrap().rec;
    assert!(rec.detail.contains("could not handle") && rec.detail.contains("a bug"), "{}", rec.detail);
    drop(reg);
    still_answers(&sh, 2);
}
