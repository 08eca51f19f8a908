//! Security of the control plane, against a real controller: bootstrap
//! tokens are one-time, bound, expiring; sessions need a client certificate
//! from the cluster CA; refusals change no state and leak no secret; the
//! userdata refuses a tampered agent binary.
//!
//! Nodes here run a stand-in agent (`sleep`) so that their tokens stay
//! unused and the test can play the agent itself with a real gRPC/TLS client.

use ddisco_proto::v1 as api;
use ddisco_tests::peer::*;
use ddisco_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A stand-in agent that never enrolls (test double: keeps tokens unused).
fn sleeper(dir: &Path) -> String {
    let p = dir.join("sleeper.sh");
    std::fs::write(&p, "#!/bin/sh\nexec sleep 300\n").unwrap();
    format!("agent_binary = \"{}\"", p.display())
}

/// Node `id` failed: still in the registry as failed, or already
/// terminated and kept among `failed_nodes`.
fn failed_node<'a>(s: &'a Value, id: &str) -> Option<&'a Value> {
    nodes(s)
        .iter()
        .find(|n| n["node_id"] == id && n["state"] == "failed")
        .or_else(|| s["failed_nodes"].as_array()?.iter().find(|n| n["node_id"] == id))
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
    let b = Boot::of(&c.userdata("master-0001"));
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
    assert!(log.contains("refused: unknown bootstrap token"), "{log}");
    assert!(log.contains("refused: no client certificate"), "{log}");
    let slave_token = Boot::of(&c.userdata("slave-0002")).token;
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
    let b = Boot::of(&c.userdata("master-0001"));
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

/// Issue 13, part 3. What a node reports reaches other nodes' files. A
/// slave whose host name carries `/etc/hosts` lines, and one whose
/// `ssh_host_key` carries a `@cert-authority` line for the master's
/// `known_hosts`, are failed with the reason and their values reach no
/// node; an honest slave's values do. The test plays the master (ready, so
/// it receives the engine's files) and the slaves over real gRPC/TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slaves_hostile_host_name_or_key_reaches_no_other_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("engine = \"disco\"\nnum_slaves = 3\n{}", sleeper(dir.path())));
    tokio::task::block_in_place(|| {
        c.wait_until("four nodes booting", WAIT, |s| {
            nodes(s).len() == 4 && nodes(s).iter().all(|n| n["state"] == "booting")
        })
    });
    let boots: Vec<Boot> = ["master-0001", "slave-0002", "slave-0003", "slave-0004"]
        .iter()
        .map(|id| Boot::of(&c.userdata(id)))
        .collect();
    let enrolled = |i: usize| {
        let b = boots[i].clone();
        async move {
            let (reply, key) = enroll(&b, &b.token).await.expect("enrolls");
            (b, reply.certificate_pem, key)
        }
    };
    let facts = |host: &str| api::NodeFacts { hostname: host.into(), logical_cores: 2, ..Default::default() };
    let (mb, mcert, mkey) = enrolled(0).await;
    let mut master = Session::open(&mb, Some((&mcert, &mkey)), facts("master-0001")).await.unwrap();
    master.finish_plan().await;

    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINDXutbB7qRqVzBDiLzGqDUXnJ+ApqvHYmtaUeSjbDK0";
    // /etc/hosts: a host name that closes ddisco's block and adds a line.
    let (b, cert, k) = enrolled(1).await;
    let evil_host = "x\n# END ddisco\n10.9.9.9 master-0001";
    let a = Session::open(&b, Some((&cert, &k)), facts(evil_host)).await.unwrap();
    // known_hosts: a valid key, then a line trusting the attacker's CA.
    let (b, cert, k) = enrolled(2).await;
    let s = Session::open(&b, Some((&cert, &k)), facts("slave-0003")).await.unwrap();
    let evil_key = format!("{key}\n@cert-authority * {key}");
    s.send(api::agent_message::Msg::Attribute(api::Attribute {
        name: "ssh_host_key".into(),
        value: evil_key,
    }))
    .await;

    let st = tokio::task::block_in_place(|| {
        c.wait_until("both hostile slaves failed (and were terminated)", WAIT, |s| {
            ["slave-0002", "slave-0003"].iter().all(|id| failed_node(s, id).is_some())
        })
    });
    let detail = |id: &str| failed_node(&st, id).map(|n| n.to_string()).unwrap_or_default();
    assert!(detail("slave-0002").contains("facts.hostname"), "{}", detail("slave-0002"));
    assert!(detail("slave-0003").contains("ssh_host_key"), "{}", detail("slave-0003"));
    // The hostile slave was told why instead of getting an assignment.
    assert!(format!("{:?}", a.first).contains("refused by the controller"), "{:?}", a.first);

    // An honest slave joins; once the master has its host name, it has had
    // every membership change before it.
    let (b, cert, k) = enrolled(3).await;
    let honest = Session::open(&b, Some((&cert, &k)), facts("slave-0004")).await.unwrap();
    honest.finish_plan().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = String::new();
    while !seen.contains("slave-0004") {
        let m = master.next_before(deadline).await;
        assert!(m.is_some(), "the master never got the honest slave's host name; got:\n{seen}");
        seen.push_str(&format!("{m:?}\n"));
    }
    for bad in ["# END ddisco", "10.9.9.9", "@cert-authority"] {
        assert!(!seen.contains(bad), "{bad:?} reached the master:\n{seen}");
    }
    let log = c.serve_log();
    assert!(log.contains("node failed"), "{log}");
    assert!(!log.contains("\n# END ddisco"), "a raw newline from a node reached the log");
}

/// Issue 13, part 4. Peers that prove nothing cannot hold the controller's
/// resources. With `serve` limited to 1,024 open files, 1,100 idle TCP
/// connections to the agents' port (no TLS handshake), and a download
/// client that trickles its request headers: enrollment still gets through
/// (within the handshake deadline), every idle connection is closed (at
/// once over the limit, the rest at the handshake deadline), the trickling
/// client is cut off, and the refusals are counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_peers_cannot_exhaust_the_controller() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    // The test itself holds the idle sockets.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let mut c = Cluster::start_with_fd_limit(&format!("num_slaves = 1\n{}", sleeper(dir.path())), 1024);
    tokio::task::block_in_place(|| c.wait_until("both nodes booting", WAIT, |s| nodes(s).len() == 2));
    let b = Boot::of(&c.userdata("master-0001"));
    let grpc = b.controller.trim_start_matches("https://").to_string();
    let idle: Vec<std::net::TcpStream> =
        (0..1100).filter_map(|_| std::net::TcpStream::connect(&grpc).ok()).collect();
    assert!(idle.len() >= 1000, "only {} idle connections opened", idle.len());

    // A download client that sends a header line every second, forever.
    let url = c.userdata("master-0001").lines().find_map(|l| l.strip_prefix("url='")).unwrap().to_string();
    let dl = url.trim_end_matches('\'').trim_start_matches("https://").split('/').next().unwrap().to_string();
    let (ca, name) = (b.ca_pem.clone(), b.server_name.clone());
    let slow = std::thread::spawn(move || -> Result<Duration, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        use rustls::pki_types::pem::PemObject;
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name.try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(&dl).unwrap());
        let t0 = std::time::Instant::now();
        tls.write_all(b"GET /agent/ddisco-agent HTTP/1.1\r\nHost: x\r\n").map_err(|e| e.to_string())?;
        for i in 0..40 {
            if tls.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).and_then(|()| tls.flush()).is_err() {
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Err("still open after 40 s of trickled headers".into())
    });

    // Enrollment still works: the idle peers hold at most a quarter of the
    // controller's files, and each for the handshake deadline (10 s) only.
    // Retried like the agent does, within a deadline.
    let t_enroll = std::time::Instant::now();
    let reply = loop {
        let attempt = async {
            let (csr_pem, _key) = csr();
            let ch = tonic::transport::Endpoint::from_shared(b.controller.clone())
                .unwrap()
                .local_address(Some("127.0.0.2".parse().unwrap()))
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&b.ca_pem))
                        .domain_name(b.server_name.clone()),
                )
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let req =
                api::EnrollRequest { token: b.token.clone(), csr_pem, facts: Some(facts()), identity: None };
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_secs(10));
            api::enrollment_client::EnrollmentClient::new(ch).enroll(req).await.map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(r) => break r,
            Err(e) => {
                assert!(t_enroll.elapsed() < Duration::from_secs(30), "enrollment never got through: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert_eq!(reply.into_inner().node_id, "master-0001");
    eprintln!("enrolled {:.1}s after the idle connections were opened", t_enroll.elapsed().as_secs_f64());

    // Every idle connection is closed by the controller (EOF or reset).
    let end = std::time::Instant::now() + Duration::from_secs(30);
    for mut s in idle {
        let left = end.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {
            }
            other => panic!("an idle connection is still open after the deadline: {other:?}"),
        }
    }
    let cut = slow.join().unwrap().expect("the trickling download client is cut off");
    assert!(cut < Duration::from_secs(20), "cut off after {cut:?}");
    let (_, metrics) = c.dashboard_get("/metrics", None);
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ddisco_connections_refused_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 500, "connections refused: {refused}\n{metrics}");
    // The refusals did not flood the log.
    let lines = c.serve_log().lines().filter(|l| l.contains("connection from")).count();
    assert!(lines <= 30, "{lines} refusal lines logged");
}

/// Issue 13, part 6. A session is accepted only with the certificate
/// issued to that node. The operator starts over (cluster.json removed) on
/// the same state directory, so the CA is reused and node ids start again:
/// the old master's certificate, which names `master-0001` and chains to
/// that CA, does not speak for the new `master-0001`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_nodes_certificate_does_not_speak_for_a_new_node_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("num_slaves = 0\n{}", sleeper(dir.path())));
    tokio::task::block_in_place(|| c.wait_until("the master booting", WAIT, |s| nodes(s).len() == 1));
    let b = Boot::of(&c.userdata("master-0001"));
    let (reply, key) = enroll(&b, &b.token).await.expect("enrolls");
    let old = (reply.certificate_pem.as_str(), key.as_str());
    session(&b, Some(old)).await.expect("its own certificate opens its session");

    c.stop_serve();
    for f in ["cluster.json", "tokens.log"] {
        let _ = std::fs::remove_file(c.state_dir().join(f));
    }
    tokio::task::block_in_place(|| {
        c.restart_serve();
        c.wait_until("a new master-0001 launched", WAIT, |s| {
            nodes(s).iter().any(|n| n["node_id"] == "master-0001" && n["state"] == "booting")
        })
    });
    let b2 = Boot::of(&c.userdata("master-0001"));
    assert_ne!(b2.token, b.token, "a new node");
    assert_eq!(b2.ca_pem, b.ca_pem, "the same CA");
    let e = session(&b2, Some(old)).await.expect_err("the old certificate opened the new node's session");
    assert!(e.starts_with("PermissionDenied") && e.contains("not the one issued"), "{e}");
    // The new node's own enrollment still works.
    let (reply, key) = enroll(&b2, &b2.token).await.expect("the new node enrolls");
    session(&b2, Some((&reply.certificate_pem, &key))).await.expect("with its own certificate");
}

/// Issue 13, part 6. Certificates are renewed over the session before
/// they expire: with 12-second certificates, a real agent gets a new one,
/// keeps it, and after its first certificate has expired it reconnects
/// (controller restarted) with the renewed one.
#[test]
fn a_nodes_certificate_is_renewed_before_it_expires() {
    let mut c = Cluster::start("num_slaves = 0\ncert_validity_secs = 12.0");
    c.wait_until("the master ready", WAIT, |s| at_size(s, 0));
    let cert = c.state_dir().join("nodes/master-0001/identity/cert.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    let t0 = std::time::Instant::now();
    let end = t0 + WAIT;
    while std::fs::read_to_string(&cert).unwrap() == first {
        assert!(std::time::Instant::now() < end, "never renewed:\n{}", c.diagnostics());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = c.serve_log();
    assert!(!log.contains("refused"), "{log}");
    assert!(log.contains("master-0001: client certificate renewed"), "{log}");
    // Past the first certificate's end, a new connection must use the
    // renewed one (TLS checks validity at the handshake).
    while t0.elapsed() < Duration::from_secs(13) {
        std::thread::sleep(Duration::from_millis(200));
    }
    c.stop_serve();
    c.restart_serve();
    let since = std::time::Instant::now();
    c.wait_until("the master reconnected", WAIT, |s| {
        nodes(s).iter().any(|n| n["connected"] == true && n["state"] == "ready")
    });
    assert!(since.elapsed() < WAIT);
    let log = c.serve_log();
    assert!(!log.contains("refused"), "{log}");
}

/// Issue 22, item 1. One message from an enrolled slave used to stop the
/// controller: an attribute whose name has a two-byte character across
/// byte 64 panicked the registry with its lock held, the lock was
/// poisoned, and `serve` exited. Against a real `serve`: the slave sends
/// it (and the master a probe named the same way); the slave is failed
/// with the reason, and the controller goes on answering status and scale
/// and enrolling nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_message_fails_its_node_and_the_controller_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("num_slaves = 2\n{}", sleeper(dir.path())));
    tokio::task::block_in_place(|| {
        c.wait_until("three nodes booting", WAIT, |s| {
            nodes(s).len() == 3 && nodes(s).iter().all(|n| n["state"] == "booting")
        })
    });
    let facts = |host: &str| api::NodeFacts { hostname: host.into(), logical_cores: 2, ..Default::default() };
    let mb = Boot::of(&c.userdata("master-0001"));
    let tb = Boot::of(&c.userdata("slave-0003"));
    let (reply, mkey) = enroll(&mb, &mb.token).await.expect("master enrolls");
    let master =
        Session::open(&mb, Some((&reply.certificate_pem, &mkey)), facts("master-0001")).await.unwrap();
    master.finish_plan().await;
    master
        .send(api::agent_message::Msg::Probe(api::ProbeResult {
            name: format!("{}€", "p".repeat(62)),
            body: "{}".into(),
        }))
        .await;
    let sb = Boot::of(&c.userdata("slave-0002"));
    let (reply, skey) = enroll(&sb, &sb.token).await.expect("slave enrolls");
    let slave = Session::open(&sb, Some((&reply.certificate_pem, &skey)), facts("slave-0002")).await.unwrap();
    slave
        .send(api::agent_message::Msg::Attribute(api::Attribute {
            name: format!("{}é", "a".repeat(63)),
            value: "x".into(),
        }))
        .await;
    let st = tokio::task::block_in_place(|| {
        c.wait_until("the hostile slave failed", WAIT, |s| failed_node(s, "slave-0002").is_some())
    });
    let detail = failed_node(&st, "slave-0002").unwrap()["detail"].to_string();
    assert!(detail.contains("not one its plan collects"), "{detail}");
    // The controller is alive and acts: scale is taken, status answers,
    // and another node still enrolls.
    assert_eq!(c.serve_exit(), None, "serve exited:\n{}", c.serve_log());
    let out = c.ctl(&["scale", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::task::block_in_place(|| c.wait_until("scaled to 1", WAIT, |s| s["desired_slaves"] == 1));
    enroll(&tb, &tb.token).await.expect("another node still enrolls");
    assert_eq!(c.serve_exit(), None, "serve exited:\n{}", c.serve_log());
}

/// A TLS client trusting the controller's CA (`b`), presenting
/// `identity` (certificate and key PEMs) if given.
fn client_config(b: &Boot, identity: Option<(&str, &str)>) -> rustls::ClientConfig {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(b.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes()).map(|c| c.unwrap()).collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// One flooding peer on host `from` (a loopback address other than
/// 127.0.0.1 stands in for another machine): connects to `addr` over TLS
/// (presenting `identity`, a certificate of the cluster CA, if given),
/// holds the connection until the controller closes it, and again, until
/// `stop`. Returns the longest time the controller let one of its
/// connections live.
fn flooder(
    addr: String,
    from: std::net::IpAddr,
    b: &Boot,
    identity: Option<(String, String)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Duration> {
    let cfg = client_config(b, identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())));
    let cfg = std::sync::Arc::new(cfg);
    let name = b.server_name.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut longest = Duration::ZERO;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
            let sock = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            let std::net::IpAddr::V4(v4) = from else { unreachable!() };
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                &SockaddrIn::from(std::net::SocketAddrV4::new(v4, 0)),
            )
            .unwrap();
            let target: std::net::SocketAddrV4 = addr.parse().unwrap();
            if connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &SockaddrIn::from(target)).is_err() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let tcp = std::net::TcpStream::from(sock);
            let conn = rustls::ClientConnection::new(cfg.clone(), name.clone().try_into().unwrap()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let t0 = std::time::Instant::now();
            tls.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = [0u8; 256];
            // Held until the controller closes it (EOF or an error).
            loop {
                match tls.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return longest;
                        }
                    }
                    Err(_) => break,
                }
            }
            longest = longest.max(t0.elapsed());
            // Refused at once: again soon, not in a hot loop (the flood
            // shares this machine's two cores with the cluster).
            if t0.elapsed() < Duration::from_millis(100) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        longest
    })
}

/// Issue 26, items 1 and 2. With `serve` limited to 256 open files (at
/// most 64 connections of unproven peers, 16 handshakes and 32 queued),
/// 160 peers on four other hosts flood the agents' port without a break:
/// half without a certificate, half with a user's Dask credential (an
/// engine certificate: it fails the handshake). Together they fill the
/// handshake queue of other hosts; the nodes' addresses (here this
/// machine's own, from which the local provider's agents connect) have a
/// lane of their own.
/// The controller is restarted in the middle of it. The enrolled agents
/// reconnect and no node is declared lost or replaced (their certificates
/// prove them: they need none of the unproven peers' places), while every
/// flooding connection, the credential's too, is closed within the
/// unproven lifetime (30 s) and the rest are refused.
#[test]
fn a_sustained_flood_never_keeps_enrolled_agents_out_and_credentials_prove_nothing() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let _heavy = one_heavy_at_a_time();
    let mut c =
        Cluster::start_with_fd_limit("engine = \"dask\"\nnum_slaves = 2\nheartbeat_timeout_secs = 5.0", 256);
    let s = c.wait_until("master + 2 slaves ready", Duration::from_secs(600), |s| at_size(s, 2));
    let before: Vec<String> = {
        let mut v: Vec<String> =
            nodes(&s).iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    };
    let creds = c.dir.path().join("creds");
    let out = c.ctl(&["credentials", "--out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let credential = (
        std::fs::read_to_string(creds.join("client.pem")).unwrap(),
        std::fs::read_to_string(creds.join("client.key")).unwrap(),
    );
    let b = Boot::of(&c.userdata("master-0001"));
    let addr = b.controller.trim_start_matches("https://").to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = std::time::Instant::now();
    let flood: Vec<_> = (0..160)
        .map(|i| {
            // Four flooding hosts (each may hold a quarter of the others'
            // handshake queue: together all of it), half the connections
            // with the credential.
            let from = std::net::IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
            flooder(addr.clone(), from, &b, (i % 2 == 0).then(|| credential.clone()), stop.clone())
        })
        .collect();
    let refused = |c: &Cluster| -> u64 {
        let (_, metrics) = c.dashboard_get("/metrics", None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("ddisco_connections_refused_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // The unproven places are full: new flooding connections are refused.
    let end = std::time::Instant::now() + WAIT;
    while refused(&c) < 100 {
        assert!(std::time::Instant::now() < end, "the flood never filled the controller's places");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Restarted in the middle of the flood: every agent must come back.
    c.stop_serve();
    c.restart_serve();
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while refused(&c) < 100 {
        assert!(std::time::Instant::now() < end, "the flood did not fill the restarted controller's places");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = c.wait_until("every node's agent connected again after the restart", WAIT, |s| {
        at_size(s, 2) && nodes(s).iter().all(|n| n["connected"] == true)
    });
    let mut after: Vec<String> =
        nodes(&s).iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
    after.sort();
    assert_eq!(after, before, "nodes were replaced");
    // Stay in the flood past the adoption grace and several heartbeat
    // timeouts: nothing is lost.
    std::thread::sleep(Duration::from_secs(15));
    let s = c.status().unwrap();
    assert!(at_size(&s, 2) && nodes(&s).iter().all(|n| n["connected"] == true), "{s:#}");
    let lost: Vec<String> = s["timed_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("lost"))
        .map(String::from)
        .collect();
    assert!(lost.is_empty(), "{lost:?}");
    // Until the unproven lifetime has passed for the first connections.
    while t0.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let longest = flood.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    assert!(longest < Duration::from_secs(33), "a flooding connection lived {longest:?}");
    eprintln!("the longest flooding connection lived {longest:.1?}; {} refused", refused(&c));
}

/// Verifies `cert_pem` as a client certificate against `ca_pem` (what a
/// TLS server trusting that CA checks).
fn chains_to(ca_pem: &str, cert_pem: &str) -> bool {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    verifier.verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now()).is_ok()
}

/// A TLS connection to the agents' port presenting `identity` (PEMs):
/// `Ok` when the controller took the handshake (it answers the HTTP/2
/// preface with its settings), `Err` naming the alert it sent otherwise.
fn handshake(b: &Boot, identity: Option<(&str, &str)>) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut cfg = client_config(b, identity);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = std::net::TcpStream::connect(b.controller.trim_start_matches("https://")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), b.server_name.clone().try_into().unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Issue 26, item 6. What a job can read (its node's Dask key, readable
/// by the `dask` user its tasks run as) and what a user holds (a
/// credential) are certificates of the engine CA: against a real `serve`,
/// neither gets through the agents' port's TLS handshake, not even as an
/// unproven peer, while the node's session certificate opens its session.
/// After `destroy`, the next cluster of the same state directory has new
/// CAs: none of the old certificates is trusted by its Dask or its agents'
/// port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_keys_and_credentials_never_open_a_session_and_die_with_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(&format!("engine = \"dask\"\nnum_slaves = 0\n{}", sleeper(dir.path())));
    tokio::task::block_in_place(|| {
        c.wait_until("the master booting", WAIT, |s| nodes(s).iter().any(|n| n["state"] == "booting"))
    });
    let b = Boot::of(&c.userdata("master-0001"));
    let (reply, key) = enroll(&b, &b.token).await.expect("the master enrolls");
    let facts = api::NodeFacts { hostname: "master-0001".into(), logical_cores: 2, ..Default::default() };
    let mut master = Session::open(&b, Some((&reply.certificate_pem, &key)), facts).await.unwrap();
    master.finish_plan().await;
    // The master's directives carry its Dask files (what the agent writes
    // for the dask user).
    let deadline = tokio::time::Instant::now() + WAIT;
    let files = loop {
        let m = master.next_before(deadline).await.expect("no Dask directives within a minute");
        if let Some(api::controller_message::Msg::Directives(d)) = m.msg {
            let file = |name: &str| {
                d.items.iter().find(|i| i.name == name).and_then(|i| match &i.kind {
                    Some(api::directive::Kind::File(f)) => Some(f.content.clone()),
                    _ => None,
                })
            };
            if let (Some(cert), Some(key), Some(scert)) =
                (file("dask_tls_cert"), file("dask_tls_key"), file("dask_scheduler_tls_cert"))
            {
                break (cert, key, scert);
            }
        }
    };
    let (dask_cert, dask_key, scheduler_cert) = files;
    let creds = dir.path().join("creds");
    let out = c.ctl(&["credentials", "--out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(creds.join(f)).unwrap();
    let (cred_cert, cred_key, engine_ca) = (read("client.pem"), read("client.key"), read("ca.pem"));
    assert_ne!(engine_ca, b.ca_pem, "Dask's CA is the agents' port's");
    assert!(chains_to(&engine_ca, &dask_cert) && chains_to(&engine_ca, &cred_cert));
    assert_ne!(dask_cert, scheduler_cert, "the scheduler holds the workers' certificate");

    // The agents' port: an engine certificate fails the handshake itself
    // (a peer without one, or with the node's session certificate, gets
    // through it).
    let shake = |id: Option<(&str, &str)>| tokio::task::block_in_place(|| handshake(&b, id));
    for (what, cert, key) in
        [("a node's Dask key", &dask_cert, &dask_key), ("a credential", &cred_cert, &cred_key)]
    {
        let e = shake(Some((cert, key))).expect_err(what);
        assert!(e.contains("alert"), "{what}: {e}");
        eprintln!("{what}: refused at the handshake: {e}");
        let e = session(&b, Some((cert, key))).await.unwrap_err();
        assert!(!e.contains("assignment"), "{e}");
    }
    shake(None).expect("no certificate: the handshake is taken");
    shake(Some((&reply.certificate_pem, &key))).expect("the node's session certificate");
    let e = session(&b, None).await.unwrap_err();
    assert!(e.contains("client certificate required"), "{e}");
    let log = c.serve_log();
    assert!(!log.contains(&dask_key) && !log.contains(&cred_key), "a key reached the log");

    // Destroyed: the state directory's next cluster trusts none of it.
    drop(master);
    let out = c.ctl(&["destroy", "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tokio::task::block_in_place(|| c.wait_serve_exit(WAIT)), "serve did not stop after destroy");
    tokio::task::block_in_place(|| c.restart_serve());
    let out = c.ctl(&["credentials", "--out", dir.path().join("new").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_engine_ca = std::fs::read_to_string(dir.path().join("new/ca.pem")).unwrap();
    let new_session_ca = std::fs::read_to_string(c.state_dir().join("ca.pem")).unwrap();
    for (what, cert) in [("a node's Dask certificate", &dask_cert), ("a credential", &cred_cert)] {
        assert!(
            !chains_to(&new_engine_ca, cert),
            "the next cluster's Dask trusts {what} of the destroyed one"
        );
    }
    assert!(
        !chains_to(&new_session_ca, &reply.certificate_pem),
        "a destroyed cluster's node session is trusted"
    );
    assert_ne!(new_session_ca, b.ca_pem);
}
