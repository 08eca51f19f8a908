//! Enrollment against a disk that refuses to record it.

use super::testing::cluster;
use super::*;
use crate::config::EngineKind;
use crate::model::{Failure, NodeState, Refusal};
use crate::registry::NewNode;

fn booting(sh: &Cluster, token_hash: &str) -> String {
    let new = NewNode {
        role: Role::Slave,
        pool: "default".into(),
        batch: None,
        token_hash: token_hash.into(),
        token_expires_unix_ms: u64::MAX,
    };
    sh.registry.lock().add_node(new, |seq| format!("10.0.0.{}", seq + 1))
}

fn facts(id: &str) -> Facts {
    Facts { logical_cores: 2, hostname: id.into(), addresses: vec!["10.0.0.2".into()], ..Default::default() }
}

/// Issue 26, item 8: a certificate is handed out only when the spend of
/// its token is on disk (journal or snapshot). When neither takes it, the
/// enrollment is refused (the agent gets no certificate a restarted
/// controller would not know, and the token could not be taken again
/// after a crash), the node fails naming the state directory, and the
/// token stays spent.
#[test]
fn an_enrollment_neither_journal_nor_snapshot_took_is_refused_and_fails_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let sh = cluster(dir.path(), EngineKind::None);
    let id = booting(&sh, "h1");
    // Stand-ins for a disk that refuses writes: the journal and the
    // snapshot's temporary are folders.
    std::fs::create_dir(dir.path().join("tokens.log")).unwrap();
    std::fs::create_dir(dir.path().join("cluster.tmp")).unwrap();
    let r = sh.enroll(&id, "h1", facts(&id), None, "fp1", "test");
    assert!(matches!(r, Err(EnrollRefused::Unrecorded)), "{r:?}");
    {
        let reg = sh.registry.lock();
        let rec = &reg.get(&id).unwrap().rec;
        assert_eq!(rec.state(), &NodeState::Failed(Failure::Refused { refused: Refusal::Unrecorded }));
        let detail = format!("{rec:?}");
        assert!(
            detail.contains("tokens.log") && detail.contains("no certificate was handed out"),
            "{detail}"
        );
    }
    let again = sh.enroll(&id, "h1", facts(&id), None, "fp2", "test");
    assert!(matches!(again, Err(EnrollRefused::Token(_))), "the token was taken again: {again:?}");

    // The journal writable again: the next node enrolls.
    std::fs::remove_dir(dir.path().join("tokens.log")).ok();
    std::fs::remove_dir(dir.path().join("tokens.log.1")).ok();
    let next = booting(&sh, "h2");
    sh.enroll(&next, "h2", facts(&next), None, "fp3", "test").expect("enrolls once the journal takes it");
    let journal = std::fs::read_to_string(dir.path().join("tokens.log")).unwrap();
    assert!(journal.contains(&format!("{next} fp3")), "{journal}");
}

/// The admission gate's nodes' lane (issue 26, item 2) follows the
/// registry: the address of a node that said hello is a node's, until the
/// node is gone; other addresses are not.
#[test]
fn a_node_that_said_hello_holds_its_address_until_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let sh = cluster(dir.path(), EngineKind::None);
    let (id, _rx) = super::testing::ready_node(&sh, Role::Slave, 1);
    let address: std::net::IpAddr = sh.registry.lock().get(&id).unwrap().rec.address().parse().unwrap();
    assert!(sh.registry.lock().holds_address(address));
    let mapped = match address {
        std::net::IpAddr::V4(v4) => std::net::IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    assert!(sh.registry.lock().holds_address(mapped), "a dual-stack listener's form of it");
    assert!(!sh.registry.lock().holds_address("10.9.9.9".parse().unwrap()));
    let mut reg = sh.registry.lock();
    reg.transition(&id, NodeEvent::Terminate(crate::model::Reason::ScaleDown)).unwrap();
    reg.transition(&id, NodeEvent::Forget).unwrap();
    assert!(!reg.holds_address(address), "a node that is gone still holds its address");
}
