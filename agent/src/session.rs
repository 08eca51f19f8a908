//! The agent's session with the controller: one bidirectional gRPC stream
//! over mutual TLS. The agent dials out (pull model); nothing listens on the
//! node.
//!
//! # Expected flow
//! hello (facts + progress) -> assignment (role, workers, plan) -> the plan
//! runs in the background while heartbeats flow every interval and step
//! reports are forwarded as they come. A broken session is retried with
//! exponential backoff and full jitter; progress is not lost, and finished
//! steps are never run again.

use crate::Fatal;
use crate::backoff::Backoff;
use crate::identity::Creds;
use crate::model::{Inbound, NoticeKind, Report};
use crate::steps::{Executor, Progress};
use ddisco_proto::v1 as api;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Agent {
    /// Replaced when the certificate is renewed (the next connection uses
    /// the new one).
    pub creds: std::sync::Mutex<Creds>,
    pub dir: PathBuf,
    pub executor: Arc<Executor>,
    /// The dead man's switch: touched on every sign of a live session.
    pub orphan: Arc<crate::orphan::Orphan>,
}

enum End {
    Shutdown(String),
    Broken(String),
}

impl Agent {
    fn creds(&self) -> Creds {
        self.creds.lock().expect("creds lock").clone()
    }

    /// Runs sessions until the controller says shutdown or refuses us.
    pub async fn run(self) -> Result<(), Fatal> {
        let (report_tx, mut report_rx) = mpsc::unbounded_channel::<Report>();
        let cgroups = {
            let c = self.creds();
            let ca = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.ca_pem.as_bytes()));
            crate::cgroup::NodeGroup::new(&c.node_id, &ca)
        };
        if let Some(g) = &cgroups {
            self.orphan.set_cgroup(g.clone());
        }
        let converger =
            crate::converge::Converger::new(&self.dir, self.executor.clone(), report_tx.clone(), cgroups);
        if let Some(imds) = self.creds().imds.clone() {
            tokio::spawn(watch_notices(imds, report_tx.clone()));
        }
        let mut backoff = Backoff::new();
        loop {
            match self.session(&report_tx, &mut report_rx, &mut backoff, &converger).await {
                Ok(End::Shutdown(reason)) => {
                    tracing::info!("controller asked this agent to stop: {reason}");
                    return Ok(());
                }
                Ok(End::Broken(msg)) => {
                    let wait = backoff.next_delay();
                    tracing::warn!("session lost: {msg}; reconnecting in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Err(fatal) => return Err(fatal),
            }
        }
    }

    /// Long by design: one session's loop, its message kinds in one
    /// `select!`.
    async fn session(
        &self,
        report_tx: &mpsc::UnboundedSender<Report>,
        report_rx: &mut mpsc::UnboundedReceiver<Report>,
        backoff: &mut Backoff,
        converger: &Arc<crate::converge::Converger>,
    ) -> Result<End, Fatal> {
        let creds = self.creds();
        let endpoint = creds
            .endpoint(true)
            .map_err(|e| Fatal::Setup(format!("bad controller address {:?}: {e}", creds.controller)))?;
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return Ok(End::Broken(format!("cannot reach {}: {e}", creds.controller))),
        };
        // The key of a renewal in flight.
        let mut renewing: Option<rcgen::KeyPair> = None;
        let (tx, rx) = mpsc::channel::<api::AgentMessage>(16);
        let Progress { plan_id, completed, .. } = self.executor.progress();
        let facts = crate::facts::gather_with(creds.imds.as_ref()).await;
        tx.send(crate::wire::hello(facts, plan_id, completed)).await.expect("receiver alive");
        let mut client = api::agent_client::AgentClient::new(channel);
        let opened = tokio::time::timeout(
            Duration::from_secs(30),
            client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut inbound = match opened {
            Err(_) => return Ok(End::Broken("the controller did not open the session within 30s".into())),
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return classify(s),
        };
        self.orphan.touch();
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.reset();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                m = inbound.message() => match m.map(|m| m.map(Inbound::from).inspect(|_| self.orphan.touch())) {
                    Ok(Some(Inbound::Assignment(a))) => {
                        backoff.reset();
                        let every = Duration::from_millis(u64::from(a.heartbeat_interval_ms).max(100));
                        if interval.period() != every {
                            interval = tokio::time::interval(every);
                            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            interval.reset();
                        }
                        tracing::info!(
                            node = %a.node_id, role = ?a.role,
                            workers = a.workers, steps = a.plan.as_ref().map_or(0, |p| p.steps.len()),
                            "assignment received"
                        );
                        if let Some(plan) = a.plan {
                            self.executor.clone().start(plan, a.workers, report_tx.clone());
                        }
                        // Re-send a failure the controller may have missed.
                        if let Some(r) = self.executor.failure() {
                            let _ = tx.send(Report::Step(r).into()).await;
                        }
                    }
                    Ok(Some(Inbound::Directives(d))) => converger.update(d),
                    Ok(Some(Inbound::Shutdown(reason))) => return Ok(End::Shutdown(reason)),
                    Ok(Some(Inbound::RenewCertificate)) => match crate::identity::signing_request() {
                        Ok((key, csr)) => {
                            renewing = Some(key);
                            if tx.send(crate::wire::renew(csr)).await.is_err() {
                                return Ok(End::Broken("session stream closed".into()));
                            }
                        }
                        Err(e) => tracing::error!("cannot renew the certificate: {e}"),
                    },
                    Ok(Some(Inbound::NewCertificate(cert))) => match renewing.take() {
                        Some(key) => match crate::identity::store_renewed(&self.dir, &cert, &key.serialize_pem()) {
                            Ok(()) => {
                                let mut c = self.creds.lock().expect("creds lock");
                                c.cert_pem = cert;
                                c.key_pem = key.serialize_pem();
                                tracing::info!("certificate renewed; the next connection uses it");
                            }
                            Err(e) => tracing::error!("cannot keep the renewed certificate: {e}"),
                        },
                        None => tracing::warn!("a certificate arrived that was not asked for; ignored"),
                    },
                    Ok(Some(Inbound::Unknown)) => {}
                    Ok(None) => return Ok(End::Broken("the controller closed the session".into())),
                    Err(s) => return classify(s),
                },
                _ = interval.tick() => {
                    seq += 1;
                    let hb = crate::wire::heartbeat(seq, crate::facts::load_milli());
                    if tx.send(hb).await.is_err() {
                        return Ok(End::Broken("session stream closed".into()));
                    }
                    self.orphan.touch();
                }
                Some(r) = report_rx.recv() => {
                    if tx.send(r.into()).await.is_err() {
                        return Ok(End::Broken("session stream closed".into()));
                    }
                }
            }
        }
    }
}

/// Polls instance metadata for a spot interruption notice and a rebalance
/// recommendation; relays each once. (A notice that arrives while the
/// session is down waits in the channel.)
async fn watch_notices(imds: crate::imds::Imds, out: mpsc::UnboundedSender<Report>) {
    let mut sent_interruption = false;
    let mut sent_rebalance = false;
    let every = std::env::var("DDISCO_NOTICE_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (path, kind, sent) in [
            ("spot/instance-action", NoticeKind::SpotInterruption, &mut sent_interruption),
            ("events/recommendations/rebalance", NoticeKind::Rebalance, &mut sent_rebalance),
        ] {
            if *sent {
                continue;
            }
            if let Ok(Some(detail)) = imds.get(path).await {
                tracing::warn!("{path}: {detail}");
                *sent = true;
                if out.send(Report::Notice { kind, detail }).is_err() {
                    return;
                }
            }
        }
        if sent_interruption && sent_rebalance {
            return;
        }
    }
}

fn classify(s: tonic::Status) -> Result<End, Fatal> {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            Err(Fatal::SessionRefused(format!("{:?}: {}", s.code(), s.message())))
        }
        _ => Ok(End::Broken(format!("{:?}: {}", s.code(), s.message()))),
    }
}
