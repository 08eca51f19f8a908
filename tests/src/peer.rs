//! A hand-driven peer of the controller: the test plays an agent (or an
//! attacker holding what an agent could read) with a real gRPC client over
//! real TLS, so it can send what the real agent never would.

use ddisco_proto::v1 as api;
use serde_json::Value;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What a node's userdata hands it: where the controller is, its CA, and
/// the bootstrap slots (node id, token) of the launch batch.
#[derive(Debug, Clone)]
pub struct Boot {
    pub controller: String,
    pub server_name: String,
    /// The first slot's token.
    pub token: String,
    pub slots: Vec<(String, String)>,
    pub ca_pem: String,
}

impl Boot {
    /// Reads the bootstrap out of a userdata script.
    pub fn of(userdata: &str) -> Boot {
        let ca = userdata.split("<<'DDISCO_CA_EOF'\n").nth(1).unwrap().split("DDISCO_CA_EOF").next().unwrap();
        let json = userdata
            .split("<<'DDISCO_BOOT_EOF'\n")
            .nth(1)
            .unwrap()
            .split("\nDDISCO_BOOT_EOF")
            .next()
            .unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        let slots: Vec<(String, String)> = v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["node_id"].as_str().unwrap().into(), s["token"].as_str().unwrap().into()))
            .collect();
        Boot {
            controller: v["controller"].as_str().unwrap().into(),
            server_name: v["server_name"].as_str().unwrap().into(),
            token: slots[0].1.clone(),
            slots,
            ca_pem: ca.into(),
        }
    }
}

/// A TLS channel to the controller, with a client certificate if given.
pub async fn channel(b: &Boot, identity: Option<(&str, &str)>) -> Result<Channel, tonic::transport::Error> {
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

/// A fresh key and a CSR for it: (csr PEM, key PEM).
pub fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

/// Valid facts with a host name of its own.
pub fn facts() -> api::NodeFacts {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    api::NodeFacts { hostname: format!("peer-{:x}", t.as_nanos() & 0xffff_ffff), ..Default::default() }
}

/// Enrolls with `token`: the reply and the key the certificate is for.
pub async fn enroll(b: &Boot, token: &str) -> Result<(api::EnrollResponse, String), tonic::Status> {
    enroll_as(b, token, facts(), None).await
}

/// Enrolls with `token`, claiming `facts`, with an identity document
/// (document, signature) if given.
pub async fn enroll_as(
    b: &Boot,
    token: &str,
    facts: api::NodeFacts,
    identity: Option<(String, String)>,
) -> Result<(api::EnrollResponse, String), tonic::Status> {
    let (csr_pem, key) = csr();
    let ch = channel(b, None).await.expect("TLS to the controller");
    let identity = identity.map(|(document, signature)| api::InstanceIdentity { document, signature });
    let req = api::EnrollRequest { token: token.into(), csr_pem, facts: Some(facts), identity };
    let r = api::enrollment_client::EnrollmentClient::new(ch).enroll(req).await?;
    Ok((r.into_inner(), key))
}

/// Opens a session and returns the first controller message.
pub async fn session(b: &Boot, identity: Option<(&str, &str)>) -> Result<api::ControllerMessage, String> {
    // A local node's host name is its node id.
    let facts = api::NodeFacts { logical_cores: 4, hostname: b.slots[0].0.clone(), ..facts() };
    let s = Session::open(b, identity, facts).await?;
    let first = s.first.clone();
    std::mem::forget(s.tx); // keep the stream open for the test's lifetime
    Ok(first)
}

/// An open session: the first controller message (the assignment, or the
/// refusal), the rest of what the controller sends, and the way to send.
pub struct Session {
    pub first: api::ControllerMessage,
    pub inbound: tonic::Streaming<api::ControllerMessage>,
    pub tx: tokio::sync::mpsc::Sender<api::AgentMessage>,
}

impl Session {
    /// Connects and says hello with `facts`.
    pub async fn open(
        b: &Boot,
        identity: Option<(&str, &str)>,
        facts: api::NodeFacts,
    ) -> Result<Session, String> {
        let ch = channel(b, identity).await.map_err(|e| format!("connect: {e}"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = api::Hello { facts: Some(facts), ..Default::default() };
        tx.try_send(api::AgentMessage { msg: Some(api::agent_message::Msg::Hello(hello)) }).unwrap();
        let out = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound = api::agent_client::AgentClient::new(ch)
            .session(out)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(first))) => Ok(Session { first, inbound, tx }),
            other => Err(format!("no assignment: {other:?}")),
        }
    }

    pub async fn send(&self, msg: api::agent_message::Msg) {
        self.tx.send(api::AgentMessage { msg: Some(msg) }).await.expect("session open");
    }

    /// Reports every step of the assignment succeeded (the node is ready).
    pub async fn finish_plan(&self) {
        let Some(api::controller_message::Msg::Assignment(a)) = &self.first.msg else {
            panic!("no assignment: {:?}", self.first)
        };
        let plan = a.plan.clone().unwrap_or_default();
        for (i, step) in plan.steps.iter().enumerate() {
            self.send(api::agent_message::Msg::Step(api::StepReport {
                plan_id: plan.id.clone(),
                index: i as u32,
                name: step.name.clone(),
                status: api::StepStatus::Succeeded as i32,
                ..Default::default()
            }))
            .await;
        }
    }

    /// The next controller message, or `None` at `deadline`.
    pub async fn next_before(&mut self, deadline: tokio::time::Instant) -> Option<api::ControllerMessage> {
        tokio::time::timeout_at(deadline, self.inbound.message()).await.ok()?.ok()?
    }
}
