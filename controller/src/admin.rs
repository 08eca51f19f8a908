//! The local admin API (`Status`, `Scale`, `Destroy`), served on a Unix
//! socket of mode 0600 inside the state directory (itself 0700): only the
//! user running the controller (and root) can reach it. Also the client the
//! CLI uses.

use crate::controller::{Shared, destroy_all};
use crate::model::{NodeState, Role};
use ddisco_proto::v1 as api;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Binds the admin socket, refusing to run twice on one state directory.
pub async fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "a controller is already running for this state_dir (admin socket {}); \
                 use `ddisco-controller status`, or stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)?; // stale, from a controller that died
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind the admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(api::admin_server::AdminServer::new(AdminService { shared }))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

struct AdminService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl api::admin_server::Admin for AdminService {
    async fn status(&self, _: Request<api::StatusRequest>) -> Result<Response<api::StatusReply>, Status> {
        Ok(Response::new(status_of(&self.shared)))
    }

    async fn scale(&self, req: Request<api::ScaleRequest>) -> Result<Response<api::ScaleReply>, Status> {
        let r = req.into_inner();
        if self.shared.destroying.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::failed_precondition("the cluster is being destroyed"));
        }
        let configured = self.shared.cfg.pools();
        let (previous, desired) = {
            let mut reg = self.shared.registry.lock().expect("registry lock");
            let previous = reg.desired_slaves();
            let mut desired = if r.pools.is_empty() {
                let weights: Vec<(String, u32)> =
                    configured.iter().map(|p| (p.name.clone(), p.count)).collect();
                crate::reconcile::distribute(r.slaves, &weights)
            } else {
                let mut d = reg.desired.clone();
                for (name, n) in &r.pools {
                    if !configured.iter().any(|p| &p.name == name) {
                        let names: Vec<&str> = configured.iter().map(|p| p.name.as_str()).collect();
                        return Err(Status::invalid_argument(format!(
                            "pools: {name:?} is not a configured pool (configured: {})",
                            names.join(", ")
                        )));
                    }
                    d.insert(name.clone(), *n);
                }
                d
            };
            desired.retain(|name, _| configured.iter().any(|p| &p.name == name));
            let total: u32 = desired.values().sum();
            if total > 100_000 {
                return Err(Status::invalid_argument(format!("slaves: {total} is more than 100000")));
            }
            let summary: Vec<String> = desired.iter().map(|(k, v)| format!("{k}={v}")).collect();
            reg.event(format!("scale: {previous} -> {total} slaves ({})", summary.join(" ")));
            reg.desired = desired.clone();
            // On-demand slaves of pools back on spot: replaced by spot ones.
            let d = crate::reconcile::Desired { pools: desired.clone() };
            crate::controller::supersede_on_demand(&self.shared, &mut reg, &d, "");
            reg.dirty = true;
            (previous, desired)
        };
        self.shared.changed();
        self.shared.wake.notify_one();
        Ok(Response::new(api::ScaleReply {
            previous,
            desired: desired.values().sum(),
            pools: desired.into_iter().collect(),
        }))
    }

    async fn destroy(&self, _: Request<api::DestroyRequest>) -> Result<Response<api::DestroyReply>, Status> {
        let terminated = destroy_all(&self.shared)
            .await
            .map_err(|e| Status::internal(format!("destroy failed: {e:#}")))?;
        let spent_usd = self.shared.registry.lock().expect("registry lock").spent_usd;
        // The cluster is gone; the controller stops after answering.
        let sh = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            sh.stop();
        });
        Ok(Response::new(api::DestroyReply { terminated, spent_usd }))
    }
}

/// The status as the admin API (and the dashboard) report it.
pub fn status_of(sh: &Shared) -> api::StatusReply {
    let members = sh.members();
    let engine_endpoints = sh.engine.endpoints(&members).into_iter().collect();
    let engine_lines = sh.engine.lines(&members);
    let now = sh.clock.now_ms();
    let now_unix = crate::registry::unix_ms();
    let reg = sh.registry.lock().expect("registry lock");
    let nodes = reg
        .entries()
        .map(|e| {
            let r = &e.rec;
            let facts = r.facts.clone().unwrap_or_default();
            let address = if r.address.is_empty() {
                facts.addresses.first().cloned().unwrap_or_default()
            } else {
                r.address.clone()
            };
            api::NodeStatus {
                node_id: r.id.clone(),
                role: match r.role {
                    Role::Master => api::Role::Master,
                    Role::Slave => api::Role::Slave,
                } as i32,
                state: r.state.label(),
                instance_id: r.instance_id.clone().unwrap_or_default(),
                address,
                hostname: facts.hostname,
                cores: facts.logical_cores,
                workers: r.workers,
                last_heartbeat_ms: if r.state.is_enrolled() {
                    e.live.last_seen_ms().map(|t| now.saturating_sub(t))
                } else {
                    None
                },
                current_step: match r.state {
                    NodeState::Provisioning { .. } | NodeState::Failed { .. } => r.current_step.clone(),
                    _ => String::new(),
                },
                detail: if r.engine_detail.is_empty() {
                    r.detail.clone()
                } else if r.detail.is_empty() {
                    r.engine_detail.clone()
                } else {
                    format!("{}; {}", r.detail, r.engine_detail)
                },
                age_ms: now_unix.saturating_sub(r.launched_unix_ms),
                connected: e.live.connected(),
                pool: r.pool.clone(),
                instance_type: r.instance_type.clone(),
                notice: r.notice.clone(),
                phases: r
                    .phases
                    .iter()
                    .map(|(name, t)| api::Phase { name: name.clone(), unix_ms: *t })
                    .collect(),
                steps: r
                    .steps
                    .iter()
                    .map(|(name, l)| api::StepLog {
                        name: name.clone(),
                        status: l.status.clone(),
                        exit_code: l.exit_code,
                        duration_ms: l.duration_ms,
                        output_tail: l.output_tail.clone(),
                    })
                    .collect(),
                stuck: stuck(r, now_unix, &sh.cfg),
                price_per_hour: r.price_per_hour,
            }
        })
        .collect();
    api::StatusReply {
        cluster: sh.cfg.tag_key.clone(),
        provider: sh.provider.name().to_string(),
        desired_slaves: reg.desired_slaves(),
        cost_per_hour: reg.cost_per_hour(),
        spent_usd: reg.spent_usd,
        desired_pools: reg.desired.clone().into_iter().collect(),
        provider_notes: sh.provider.notes(),
        provider_facts: sh.provider.facts(),
        engine: sh.engine.name().to_string(),
        engine_endpoints,
        engine_lines,
        events: reg
            .events()
            .iter()
            .map(|e| api::Event { unix_ms: e.unix_ms, message: e.message.clone() })
            .collect(),
        nodes,
        notes: {
            let ev = reg.events();
            ev.iter().skip(ev.len().saturating_sub(10)).map(|e| e.message.clone()).collect()
        },
    }
}

/// How long a plan step may run before it is flagged.
const STEP_EXPECTED_MS: u64 = 15 * 60 * 1000;

/// Names the phase a node has been in for longer than expected, if any.
fn stuck(r: &crate::registry::NodeRecord, now_unix: u64, cfg: &crate::config::Config) -> String {
    let since = r.phases.last().map(|(_, t)| now_unix.saturating_sub(*t)).unwrap_or(0);
    let boot = cfg.boot_timeout.as_millis() as u64;
    match &r.state {
        NodeState::Requested | NodeState::Booting if since > boot / 2 => format!(
            "stuck in {} for {:.0}s: its agent has not enrolled (replaced after {:.0}s); see its console",
            r.state.label(),
            since as f64 / 1000.0,
            boot as f64 / 1000.0
        ),
        NodeState::Enrolled if since > 60_000 => {
            format!("enrolled {:.0}s ago but has not started its plan", since as f64 / 1000.0)
        }
        NodeState::Provisioning { .. } if since > STEP_EXPECTED_MS => format!(
            "step {} running for {:.0} min (expected under {} min)",
            r.current_step,
            since as f64 / 60_000.0,
            STEP_EXPECTED_MS / 60_000
        ),
        _ => String::new(),
    }
}

/// A client for the admin socket.
pub struct AdminClient {
    inner: api::admin_client::AdminClient<tonic::transport::Channel>,
}

/// The controller is not running (no one answers on the admin socket).
#[derive(Debug, thiserror::Error)]
#[error(
    "no controller is running for {path} (admin socket missing or not answering); start one with `ddisco-controller serve`"
)]
pub struct NotRunning {
    pub path: PathBuf,
}

impl AdminClient {
    pub async fn connect(path: &Path) -> Result<AdminClient, NotRunning> {
        let not_running = || NotRunning { path: path.to_owned() };
        if tokio::net::UnixStream::connect(path).await.is_err() {
            return Err(not_running());
        }
        let p = path.to_owned();
        let channel = tonic::transport::Endpoint::from_static("http://admin.sock")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(|_| not_running())?;
        // Status of a large cluster is several MB.
        let inner = api::admin_client::AdminClient::new(channel).max_decoding_message_size(256 << 20);
        Ok(AdminClient { inner })
    }

    pub async fn status(&mut self) -> Result<api::StatusReply, Status> {
        Ok(self.inner.status(api::StatusRequest {}).await?.into_inner())
    }

    pub async fn scale(
        &mut self,
        slaves: u32,
        pools: std::collections::HashMap<String, u32>,
    ) -> Result<api::ScaleReply, Status> {
        Ok(self.inner.scale(api::ScaleRequest { slaves, pools }).await?.into_inner())
    }

    pub async fn destroy(&mut self) -> Result<api::DestroyReply, Status> {
        Ok(self.inner.destroy(api::DestroyRequest {}).await?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewNode, Registry};

    #[test]
    fn stuck_names_the_phase() {
        let cfg =
            crate::config::Config { boot_timeout: std::time::Duration::from_secs(600), ..Default::default() };
        let mut reg = Registry::new(Default::default());
        let new = NewNode {
            role: crate::model::Role::Slave,
            pool: "default".into(),
            batch: None,
            token_hash: "h".into(),
            token_expires_unix_ms: 0,
        };
        let id = reg.add_node(new, |_| String::new());
        let rec = &mut reg.get_mut(&id).unwrap().rec;
        let t0 = rec.phases[0].1;
        rec.state = NodeState::Booting;
        assert_eq!(stuck(rec, t0 + 200_000, &cfg), "");
        assert!(
            stuck(rec, t0 + 400_000, &cfg).starts_with("stuck in booting for 400s"),
            "{}",
            stuck(rec, t0 + 400_000, &cfg)
        );
        rec.state = NodeState::Provisioning { step: 1, of: 3 };
        rec.current_step = "pip_requirements".into();
        rec.phases.push(("step pip_requirements".into(), t0));
        assert!(stuck(rec, t0 + 16 * 60_000, &cfg).starts_with("step pip_requirements running for 16 min"));
        rec.state = NodeState::Ready;
        assert_eq!(stuck(rec, t0 + 3_600_000, &cfg), "");
    }
}
