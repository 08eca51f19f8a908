//! The agents' side of the control plane: `Enrollment` (token-authenticated)
//! and `Agent` (mutual TLS), served on one TLS port.
//!
//! **API Boundary:** messages are converted by `wire` on arrival and on
//! departure; this module authenticates, converts and calls the cluster's
//! methods (which call the registry's transitions). It changes no state
//! itself.
//!
//! # Guarantees
//! - `Session` refuses a caller without a client certificate signed by the
//!   cluster CA (rustls checks the chain), or whose node is unknown or being
//!   terminated. A refusal is logged and changes no state.
//! - Heartbeats take no lock: two atomic stores per message (last seen, load).

use crate::admission::{Gate, Limits, RateLimitedLog};
use crate::cluster::{Cluster, EnrollRefused};
use crate::pki;
use crate::registry::{Outbound, Refused, TokenError};
use ddisco_proto::v1 as api;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Largest message taken from a peer without a certificate (an
/// enrollment: token, CSR, facts, identity document).
pub const MAX_ENROLL_MESSAGE: usize = 64 * 1024;
/// Largest message taken on a session: a probe's body (at most
/// `cluster::MAX_PROBE_BODY`) with room for its framing; step reports are
/// smaller.
pub const MAX_SESSION_MESSAGE: usize = crate::cluster::MAX_PROBE_BODY + 16 * 1024;

/// The port's TLS: the server certificate; a client certificate is
/// optional (`Enrollment` takes a token) but, when sent, must chain to the
/// cluster CA.
fn tls_config(pki: &pki::Pki) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs =
        CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(ca?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

/// Serves `Enrollment` and `Agent` over TLS until shutdown. Connections
/// come through `admission` (limits for peers without a certificate).
pub async fn serve(
    shared: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tonic::transport::Server;
    let tls = Arc::new(tls_config(&shared.pki)?);
    let limits = Limits::GRPC.within(shared.fd_limit);
    // Only the certificate of a live node proves a peer: any other of the
    // CA (a user's Dask credential, a terminated node's) is unproven.
    let registry_of = shared.clone();
    let prover: crate::admission::Prover = Arc::new(move |der: &[u8]| {
        let node = pki::node_id_of(der)?;
        let live = registry_of.registry.lock().is_live_cert(&node, &pki::cert_sha256(der));
        live.then_some(node)
    });
    // Nodes' addresses handshake in a lane of their own.
    let registry_of = shared.clone();
    let known: crate::admission::Known = Arc::new(move |ip| registry_of.registry.lock().holds_address(ip));
    let gate = Arc::new(
        Gate::new("agents' port", limits, shared.metrics.clone()).with_prover(prover).with_known(known),
    );
    let incoming =
        tokio_stream::wrappers::ReceiverStream::new(crate::admission::incoming(listener, tls, gate));
    let log = Arc::new(RateLimitedLog::default());
    let mut stop = shutdown.clone();
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(16))
        .http2_max_header_list_size(Some(16 * 1024))
        .add_service(
            api::enrollment_server::EnrollmentServer::new(EnrollmentService {
                shared: shared.clone(),
                log: log.clone(),
            })
            .max_decoding_message_size(MAX_ENROLL_MESSAGE),
        )
        .add_service(
            api::agent_server::AgentServer::new(AgentService { shared, log })
                .max_decoding_message_size(MAX_SESSION_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
    // A graceful stop waits for open connections; unproven peers that hold
    // theirs (a flood) would hold the controller's stop for their whole
    // lifetime. Past this grace they are dropped with the process.
    let grace = async move {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r?,
        _ = grace => tracing::info!("agents' port: connections still open {}s after the stop are dropped", SHUTDOWN_GRACE.as_secs()),
    }
    Ok(())
}

/// How long a stopping controller waits for its agents' port to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub struct EnrollmentService {
    pub shared: Arc<Cluster>,
    /// Refusals of unauthenticated callers: logged, but not without bound.
    pub log: Arc<RateLimitedLog>,
}

pub struct AgentService {
    pub shared: Arc<Cluster>,
    pub log: Arc<RateLimitedLog>,
}

fn peer(req: &Request<impl Sized>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown peer".into())
}

fn token_refusal(e: &TokenError) -> Status {
    match e {
        TokenError::Unknown | TokenError::Expired(_) => Status::unauthenticated(e.to_string()),
        TokenError::Used(_) | TokenError::Terminated(_) => Status::permission_denied(e.to_string()),
    }
}

#[tonic::async_trait]
impl api::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        req: Request<api::EnrollRequest>,
    ) -> Result<Response<api::EnrollResponse>, Status> {
        let from = peer(&req);
        let r = req.into_inner();
        if r.token.len() < 32 {
            self.log.warn(|| format!("enrollment from {from} refused: token missing or too short"));
            return Err(Status::invalid_argument("token: missing or too short"));
        }
        let hash = pki::token_hash(&r.token);
        let sh = &self.shared;
        let node_id = sh.check_token(&hash).map_err(|e| {
            self.log.warn(|| format!("enrollment from {from} refused: {e}"));
            token_refusal(&e)
        })?;
        // On EC2 the instance proves itself with its signed identity
        // document; what the agent claims about itself is not evidence.
        let attested = match sh.provider.attestor() {
            None => None,
            Some(a) => {
                let id = r.identity.unwrap_or_default();
                let doc = a.verify(&id.document, &id.signature).map_err(|e| {
                    self.log.warn(|| format!("enrollment of {node_id} from {from} refused: {e}"));
                    crate::metrics::Metrics::inc(&sh.metrics.refusals);
                    // The caller learns nothing of the cluster (its region):
                    // the log has the reason.
                    let told = match e {
                        crate::attest::AttestError::WrongRegion { got, .. } => {
                            format!("the instance identity document is from region {got}, not this cluster's")
                        }
                        other => other.to_string(),
                    };
                    Status::permission_denied(told)
                })?;
                Some(doc)
            }
        };
        // Signing is CPU work; it happens outside the registry lock.
        let cert = guarded("enrollment", || {
            sh.pki
                .sign_node(&node_id, &r.csr_pem, sh.cert_validity)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })?;
        let facts = r.facts.unwrap_or_default().into();
        let fingerprint = pki::pem_sha256(&cert).map_err(|e| Status::internal(e.to_string()))?;
        let enrolled = guarded("enrollment", || {
            Ok(sh.enroll(&node_id, &hash, facts, attested.as_ref(), &fingerprint, &from))
        })?;
        enrolled.map_err(|e| {
            match &attested {
                Some(doc) => self.log.warn(|| {
                    format!("enrollment of {node_id} from {from} (instance {}) refused: {e}", doc.instance_id)
                }),
                None => self.log.warn(|| format!("enrollment of {node_id} from {from} refused: {e}")),
            }
            match e {
                EnrollRefused::Token(t) => Status::permission_denied(t.to_string()),
                EnrollRefused::Instance => Status::permission_denied(e.to_string()),
                EnrollRefused::NotYet | EnrollRefused::Unrecorded => Status::unavailable(e.to_string()),
                EnrollRefused::Invalid(why) => Status::invalid_argument(why),
            }
        })?;
        Ok(Response::new(api::EnrollResponse { node_id, certificate_pem: cert }))
    }
}

/// Runs `f`, turning a panic (a bug some input found) into an error for
/// this caller alone: shared state stays usable (its mutexes do not
/// poison) and the controller keeps serving.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = crate::text::panic_message(panic.as_ref());
        tracing::error!("the controller panicked handling an {what} (a bug): {why}");
        Err(Status::internal(format!("the controller could not handle this {what}")))
    })
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<api::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl api::agent_server::Agent for AgentService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<api::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let from = peer(&req);
        let Some(certs) = req.peer_certs().filter(|c| !c.is_empty()) else {
            self.log.warn(|| format!("session from {from} refused: no client certificate"));
            crate::metrics::Metrics::inc(&self.shared.metrics.refusals);
            return Err(Status::unauthenticated(
                "client certificate required: enroll with a bootstrap token first",
            ));
        };
        let Some(node_id) = pki::node_id_of(&certs[0]) else {
            self.log.warn(|| format!("session from {from} refused: certificate without a node id"));
            return Err(Status::unauthenticated("client certificate names no node"));
        };
        let sh = self.shared.clone();
        let fingerprint = pki::cert_sha256(&certs[0]);
        let mut renewal = Renewal {
            not_after: pki::not_after_unix(&certs[0]).unwrap_or(i64::MAX),
            validity: sh.cert_validity,
            requested: false,
            issued: false,
        };
        let live = {
            let mut reg = sh.registry.lock();
            let live = match reg.get(&node_id) {
                Some(e)
                    if !e.rec.state().is(crate::model::StateKind::Terminating) && !e.live.is_revoked() =>
                {
                    e.live.clone()
                }
                _ => {
                    self.log.warn(|| {
                        format!("session of {node_id} from {from} refused: node unknown or terminated")
                    });
                    return Err(Status::permission_denied(format!(
                        "node {node_id} is not part of this cluster (terminated or replaced)"
                    )));
                }
            };
            // Only the certificate issued to this node speaks for it (not
            // another one of the same CA naming it: an earlier cluster's).
            if let Err(e) = reg.accept_session_cert(&node_id, &fingerprint) {
                drop(reg);
                crate::metrics::Metrics::inc(&sh.metrics.refusals);
                self.log.warn(|| format!("session of {node_id} from {from} refused: {e}"));
                return Err(Status::permission_denied(e.to_string()));
            }
            live
        };
        live.touch(sh.clock.now_ms());
        let (tx, rx) = tokio::sync::mpsc::channel::<Outbound>(8);
        live.set_push(tx.clone());
        let mut inbound = req.into_inner();
        let mut shutdown = sh.shutdown_signal();
        tokio::spawn(async move {
            let _open = live.session();
            loop {
                // End the stream when the controller stops, so the agent
                // reconnects (to this controller once restarted).
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(Ok(msg)) = msg else { break };
                if live.is_revoked() {
                    let _ = tx.send(Outbound::Shutdown("node terminated by the controller".into())).await;
                    break;
                }
                live.touch(sh.clock.now_ms());
                match handle(&sh, &node_id, &live, &tx, &mut renewal, msg).await {
                    Ok(()) => {}
                    Err(Handled::Closed | Handled::Failed(_)) => break,
                    Err(Handled::Refused(why)) => tracing::warn!(node = %node_id, "report refused: {why}"),
                }
            }
            live.clear_push(&tx);
            tracing::debug!(node = %node_id, "session ended");
        });
        let out =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|o| Ok(api::ControllerMessage::from(o)));
        Ok(Response::new(Box::pin(out)))
    }
}

/// A session's certificate renewal: asked for once, when a third of its
/// validity is left; one new certificate per request.
struct Renewal {
    not_after: i64,
    validity: Duration,
    requested: bool,
    issued: bool,
}

impl Renewal {
    /// Whether to ask for a renewal now (an integer comparison: checked on
    /// every message).
    fn ask(&mut self) -> bool {
        if self.requested
            || !pki::renewal_due(self.not_after, crate::model::unix_ms() as i64 / 1000, self.validity)
        {
            return false;
        }
        self.requested = true;
        true
    }
}

/// Why a message was not taken.
enum Handled {
    /// The session's outbound side is gone.
    Closed,
    /// Invalid, or refused by the registry; nothing changed.
    Refused(String),
    /// The node was failed for it (a report no honest agent sends, or one
    /// the controller could not handle): its agent is told why and the
    /// session ends (the agent stops).
    Failed(String),
}

/// One message of an open session: taken by [`take`], which never lets a
/// panic out (a message that makes the controller panic fails its node,
/// with the reason; shared state stays usable: its mutexes do not poison),
/// then the reply sent.
async fn handle(
    sh: &Cluster,
    node_id: &str,
    live: &crate::registry::Liveness,
    tx: &tokio::sync::mpsc::Sender<Outbound>,
    renewal: &mut Renewal,
    msg: api::AgentMessage,
) -> Result<(), Handled> {
    if renewal.ask() {
        tx.send(Outbound::RenewCertificate).await.map_err(|_| Handled::Closed)?;
    }
    // The hot path, as before: two relaxed stores, nothing that can panic.
    if let Some(api::agent_message::Msg::Heartbeat(h)) = &msg.msg {
        heartbeat(sh, live, h);
        return Ok(());
    }
    match take_guarded(sh, node_id, live, renewal, msg) {
        Ok(Some(out)) => tx.send(out).await.map_err(|_| Handled::Closed),
        Ok(None) => Ok(()),
        Err(Handled::Failed(why)) => {
            tracing::warn!(node = %node_id, "report refused, node failed: {why}");
            let _ = tx.send(Outbound::Shutdown(format!("refused by the controller: {why}"))).await;
            Err(Handled::Closed)
        }
        Err(e) => Err(e),
    }
}

/// [`take`] behind `catch_unwind`: a panic (a bug the message found) fails
/// the node, saying which message and why, instead of ending the session
/// task with shared state half-changed and the node sending it again.
fn take_guarded(
    sh: &Cluster,
    node_id: &str,
    live: &crate::registry::Liveness,
    renewal: &mut Renewal,
    msg: api::AgentMessage,
) -> Result<Option<Outbound>, Handled> {
    let kind = message_kind(&msg);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take(sh, node_id, live, renewal, msg)))
        .unwrap_or_else(|panic| {
            let why = crate::text::panic_message(panic.as_ref());
            tracing::error!(node = %node_id, "the controller panicked on a {kind} message (a bug): {why}");
            crate::metrics::Metrics::inc(&sh.metrics.refusals);
            sh.internal_failure(node_id, kind, &why);
            Err(Handled::Failed(format!("the controller could not handle its {kind} message")))
        })
}

/// A heartbeat: no lock, no allocation (its load, and a count).
fn heartbeat(sh: &Cluster, live: &crate::registry::Liveness, h: &api::Heartbeat) {
    live.set_load(h.load_milli);
    crate::metrics::Metrics::inc(&sh.metrics.heartbeats);
}

/// The kind of a session message, for errors.
fn message_kind(msg: &api::AgentMessage) -> &'static str {
    use api::agent_message::Msg;
    match &msg.msg {
        None => "empty",
        Some(Msg::Heartbeat(_)) => "heartbeat",
        Some(Msg::Hello(_)) => "hello",
        Some(Msg::Notice(_)) => "notice",
        Some(Msg::Step(_)) => "step",
        Some(Msg::Attribute(_)) => "attribute",
        Some(Msg::Directive(_)) => "directive",
        Some(Msg::Probe(_)) => "probe",
        Some(Msg::Renew(_)) => "renew",
    }
}

/// One message of an open session, converted and handed to the cluster;
/// returns what to send back. Synchronous: the decision what a message
/// does takes no I/O, and can be driven without a network (the property
/// tests feed it arbitrary messages).
fn take(
    sh: &Cluster,
    node_id: &str,
    live: &crate::registry::Liveness,
    renewal: &mut Renewal,
    msg: api::AgentMessage,
) -> Result<Option<Outbound>, Handled> {
    use api::agent_message::Msg;
    let refused = |e: &dyn std::fmt::Display| Handled::Refused(e.to_string());
    let failed = |e: Refused| match e {
        Refused::Invalid(why) => Handled::Failed(why),
        other => Handled::Refused(other.to_string()),
    };
    match msg.msg {
        Some(Msg::Heartbeat(h)) => heartbeat(sh, live, &h),
        None => {}
        Some(Msg::Hello(h)) => {
            let assignment = sh.hello(node_id, h.into()).map_err(failed)?;
            return Ok(Some(Outbound::Assignment(Box::new(assignment))));
        }
        Some(Msg::Notice(n)) => {
            let (kind, detail) = crate::wire::notice(n).map_err(|e| refused(&e.message()))?;
            sh.notice(node_id, kind, &detail);
        }
        Some(Msg::Step(s)) => {
            let report = s.try_into().map_err(|e: Status| refused(&e.message()))?;
            sh.step_report(node_id, report).map_err(|e| refused(&e))?;
        }
        Some(Msg::Attribute(a)) => sh.attribute(node_id, &a.name, &a.value).map_err(failed)?,
        Some(Msg::Directive(d)) => sh.directive_report(node_id, d.into()),
        Some(Msg::Probe(p)) => sh.probed(node_id, &p.name, &p.body).map_err(|e| refused(&e))?,
        Some(Msg::Renew(r)) => {
            if !renewal.requested || renewal.issued {
                return Err(Handled::Refused("a certificate renewal that was not asked for".into()));
            }
            renewal.issued = true;
            let cert = sh.renew(node_id, &r.csr_pem).map_err(|e| refused(&e))?;
            return Ok(Some(Outbound::NewCertificate(cert)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod hostile_tests;
