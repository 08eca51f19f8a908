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
        match ops::scale(&self.shared, r.slaves, &pools) {
            Ok(scaled) => Ok(Response::new(scaled.into())),
            Err(e @ ScaleError::Destroying) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
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
