//! The local admin API (`Status`, `Scale`, `Destroy`), served on a Unix
//! socket of mode 0600 inside the state directory (itself 0700): only the
//! user running the controller (and root) can reach it. Requests are
//! converted by `wire` and handed to `cluster::ops` / `status`; the client
//! is `cli::client`.

use crate::cluster::Cluster;
use crate::cluster::ops::{self, ScaleError};
use crate::status::StatusView;
use ddisco_proto::v1 as api;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
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
    shared: Arc<Cluster>,
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

/// The longest a user's Dask credential is valid.
pub const MAX_CREDENTIAL_DAYS: u32 = 30;

struct AdminService {
    shared: Arc<Cluster>,
}

#[tonic::async_trait]
impl api::admin_server::Admin for AdminService {
    async fn status(&self, req: Request<api::StatusRequest>) -> Result<Response<api::StatusReply>, Status> {
        let view = if req.into_inner().brief {
            StatusView::brief(&self.shared)
        } else {
            StatusView::of(&self.shared)
        };
        Ok(Response::new(view.into()))
    }

    async fn scale(&self, req: Request<api::ScaleRequest>) -> Result<Response<api::ScaleReply>, Status> {
        let r = req.into_inner();
        let pools = r.pools.into_iter().collect();
        match ops::scale(&self.shared, r.slaves, &pools, r.max_slaves) {
            Ok(scaled) => Ok(Response::new(scaled.into())),
            Err(e @ ScaleError::Destroying) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    async fn credentials(
        &self,
        req: Request<api::CredentialsRequest>,
    ) -> Result<Response<api::CredentialsReply>, Status> {
        let r = req.into_inner();
        let sh = &self.shared;
        if sh.engine.name() != "dask" {
            return Err(Status::failed_precondition(format!(
                "this cluster runs the {} engine; client credentials are for Dask's mutual TLS",
                sh.engine.name()
            )));
        }
        let name = r.name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(Status::invalid_argument(format!("name {name:?}: 1 to 64 letters, digits and -_.@")));
        }
        // Short-lived (a copied key stops working), and never past the
        // cluster: a destroy retires the CA that signed it.
        if !(1..=MAX_CREDENTIAL_DAYS).contains(&r.valid_days) {
            return Err(Status::invalid_argument(format!(
                "--days {}: from 1 to {MAX_CREDENTIAL_DAYS} (ask for a new credential when it ends)",
                r.valid_days
            )));
        }
        let valid = std::time::Duration::from_secs(u64::from(r.valid_days) * 86_400);
        let (cert_pem, key_pem) = sh
            .pki
            .issue(&format!("dask client {name}"), &[], valid)
            .map_err(|e| Status::internal(format!("cannot issue the certificate: {e}")))?;
        let members = sh.members();
        let scheduler = sh.engine.endpoints(&members).remove("scheduler").unwrap_or_default();
        sh.registry.lock().event(format!("client credential issued to {name:?} ({} days)", r.valid_days));
        Ok(Response::new(api::CredentialsReply {
            ca_pem: sh.pki.engine_ca_pem().to_string(),
            cert_pem,
            key_pem,
            scheduler,
        }))
    }

    async fn destroy(&self, _: Request<api::DestroyRequest>) -> Result<Response<api::DestroyReply>, Status> {
        let destroyed = ops::destroy(&self.shared)
            .await
            .map_err(|e| Status::internal(format!("destroy failed: {e:#}")))?;
        // The cluster is gone; the controller stops after answering.
        let sh = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            sh.stop();
        });
        Ok(Response::new(destroyed.into()))
    }
}
