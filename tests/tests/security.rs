//! Security of the control plane, against a real controller: bootstrap
//! tokens are one-time, bound, expiring; sessions need a client certificate
//! from the cluster CA; refusals change no state and leak no secret; the
//! userdata refuses a tampered agent binary.
//!
//! Nodes here run a stand-in agent (`sleep`) so that their tokens stay
//! unused and the test can play the agent itself with a real gRPC/TLS client.

use ddisco_proto::v1 as api;
use ddisco_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const WAIT: Duration = Duration::from_secs(60);

/// A stand-in agent that never enrolls (test double: keeps tokens unused).
fn sleeper(dir: &Path) -> String {
    let p = dir.join("sleeper.sh");
    std::fs::write(&p, "#!/bin/sh\nexec sleep 300\n").unwrap();
    format!("agent_binary = \"{}\"", p.display())
}

struct Boot {
    controller: String,
    server_name: String,
    token: String,
    ca_pem: String,
}

fn boot_of(userdata: &str) -> Boot {
    let ca = userdata.split("<<'DDISCO_CA_EOF'\n").nth(1).unwrap().split("DDISCO_CA_EOF").next().unwrap();
    let json =
        userdata.split("<<'DDISCO_BOOT_EOF'\n").nth(1).unwrap().split("\nDDISCO_BOOT_EOF").next().unwrap();
    let v: Value = serde_json::from_str(json).unwrap();
    Boot {
        controller: v["controller"].as_str().unwrap().into(),
        server_name: v["server_name"].as_str().unwrap().into(),
        token: v["slots"][0]["token"].as_str().unwrap().into(),
        ca_pem: ca.into(),
    }
}

async fn channel(b: &Boot, identity: Option<(&str, &str)>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&b.ca_pem))
        .domain_name(b.server_name.clone());
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(b.controller.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

async fn enroll(b: &Boot, token: &str) -> Result<(api::EnrollResponse, String), tonic::Status> {
    let (csr_pem, key) = csr();
    let ch = channel(b, None).await.expect("TLS to the controller");
    let req = api::EnrollRequest { token: token.into(), csr_pem, facts: Some(api::NodeFacts::default()) };
    let r = api::enrollment_client::EnrollmentClient::new(ch).enroll(req).await?;
    Ok((r.into_inner(), key))
}

/// Opens a session and returns the first controller message.
async fn session(b: &Boot, identity: Option<(&str, &str)>) -> Result<api::ControllerMessage, String> {
    let ch = channel(b, identity).await.map_err(|e| format!("connect: {e}"))?;
    let hello = api::AgentMessage {
        msg: Some(api::agent_message::Msg::Hello(api::Hello {
            facts: Some(api::NodeFacts { logical_cores: 4, ..Default::default() }),
            ..Default::default()
        })),
    };
    let out = tokio_stream_once(hello);
    let mut inbound = api::agent_client::AgentClient::new(ch)
        .session(out)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        other => Err(format!("no assignment: {other:?}")),
    }
}

/// A request stream that sends one message and then stays open.
fn tokio_stream_once(
    m: api::AgentMessage,
) -> impl tonic::codegen::tokio_stream::Stream<Item = api::AgentMessage> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(m).unwrap();
    std::mem::forget(tx); // keep the stream open for the test's lifetime
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn states(s: &Value) -> Vec<(String, String)> {
    nodes(s)
        .iter()
        .map(|n| (n["node_id"].as_str().unwrap().into(), n["state"].as_str().unwrap().into()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_one_time_and_sessions_need_a_cluster_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("num_slaves = 1\n{}", sleeper(dir.path())));
    let s = tokio::task::block_in_place(|| {
        c.wait_until("both nodes booting", WAIT, |s| {
            nodes(s).len() == 2 && nodes(s).iter().all(|n| n["state"] == "booting")
        })
    });
    let before = states(&s);
    let b = boot_of(&c.userdata("master-0001"));
    assert_eq!(b.token.len(), 64, "256-bit token");

    // Unknown and malformed tokens: refused, nothing changes.
    let e = enroll(&b, &"ab".repeat(32)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("unknown bootstrap token"), "{e:?}");
    let e = enroll(&b, "short").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A session without a client certificate is refused.
    let e = session(&b, None).await.unwrap_err();
    assert!(e.starts_with("Unauthenticated") && e.contains("client certificate required"), "{e}");
    // A certificate from another CA does not get through TLS.
    let other = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "master-0001");
    let forged = p.self_signed(&other).unwrap().pem();
    let e = session(&b, Some((&forged, &other.serialize_pem()))).await.unwrap_err();
    assert!(!e.contains("assignment"), "{e}");
    let s = c.status().unwrap();
    assert_eq!(states(&s), before, "a refusal changed state");

    // The real token enrolls the node it was minted for, once.
    let (reply, key) = enroll(&b, &b.token).await.expect("valid token enrolls");
    assert_eq!(reply.node_id, "master-0001");
    let e = enroll(&b, &b.token).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("already used"), "{e:?}");
    // With its certificate, the session works and names the right role.
    let m = session(&b, Some((&reply.certificate_pem, &key))).await.expect("mTLS session");
    match m.msg {
        Some(api::controller_message::Msg::Assignment(a)) => {
            assert_eq!(a.node_id, "master-0001");
            assert_eq!(a.role, api::Role::Master as i32);
            assert_eq!(a.workers, 4);
        }
        other => panic!("{other:?}"),
    }

    // Refusals are logged; tokens never are.
    let log = c.serve_log();
    assert!(log.contains("enrollment refused"), "{log}");
    assert!(log.contains("session refused: no client certificate"), "{log}");
    let slave_token = boot_of(&c.userdata("slave-0002")).token;
    assert!(!log.contains(&b.token) && !log.contains(&slave_token), "a token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("num_slaves = 0\ntoken_ttl_secs = 1.0\n{}", sleeper(dir.path())));
    // Wait on the node's own age (from status) to pass the token's lifetime.
    let s = tokio::task::block_in_place(|| {
        c.wait_until("the master's token to expire", WAIT, |s| {
            nodes(s).len() == 1 && nodes(s)[0]["age_ms"].as_u64().unwrap() > 1_500
        })
    });
    let b = boot_of(&c.userdata("master-0001"));
    let e = enroll(&b, &b.token).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    assert_eq!(states(&c.status().unwrap()), states(&s));
}

#[test]
fn userdata_refuses_a_tampered_agent_binary() {
    let mut c = Cluster::start("num_slaves = 0");
    c.wait_until("master ready", WAIT, |s| at_size(s, 0));
    let userdata = c.userdata("master-0001");
    let work = tempfile::tempdir().unwrap();
    // A copy of the real agent with one byte changed, served from a file URL.
    let mut agent = std::fs::read(bin("ddisco-agent")).unwrap();
    let mid = agent.len() / 2;
    agent[mid] ^= 0xff;
    let tampered = work.path().join("tampered");
    std::fs::write(&tampered, agent).unwrap();
    let url_line = userdata.lines().find(|l| l.starts_with("url=")).unwrap();
    let script = userdata.replace(url_line, &format!("url='file://{}'", tampered.display()));
    let home = work.path().join("node");
    std::fs::write(work.path().join("userdata.sh"), script).unwrap();
    let out = std::process::Command::new("sh")
        .arg(work.path().join("userdata.sh"))
        .env("DDISCO_HOME", &home)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tampered agent ran: {err}");
    assert!(err.contains("refusing to run it"), "{err}");
    assert!(!home.join("ddisco-agent").exists());
    assert!(!home.join("ddisco-agent.part").exists());

    // The untampered URL works with the same script (the check can pass).
    std::fs::write(work.path().join("userdata-ok.sh"), userdata.replace("exec ./ddisco-agent", "exit 0 #"))
        .unwrap();
    let out = std::process::Command::new("sh")
        .arg(work.path().join("userdata-ok.sh"))
        .env("DDISCO_HOME", work.path().join("node-ok"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(work.path().join("node-ok/ddisco-agent").exists());
}
