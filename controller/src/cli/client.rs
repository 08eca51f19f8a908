//! The CLI's client for the admin socket: connects, calls, and converts the
//! replies to domain types (through `wire`).

use crate::cluster::ops::{Destroyed, Scaled};
use crate::status::StatusView;
use ddisco_proto::v1 as api;
use std::path::{Path, PathBuf};
use tonic::Status;

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

    pub async fn status(&mut self) -> Result<StatusView, Status> {
        Ok(self.inner.status(api::StatusRequest { brief: false }).await?.into_inner().into())
    }

    /// The status without the node list (counts, events, notes): cheap at
    /// any cluster size.
    pub async fn brief_status(&mut self) -> Result<StatusView, Status> {
        Ok(self.inner.status(api::StatusRequest { brief: true }).await?.into_inner().into())
    }

    pub async fn scale(
        &mut self,
        slaves: u32,
        pools: std::collections::HashMap<String, u32>,
        max_slaves: Option<u32>,
    ) -> Result<Scaled, Status> {
        Ok(self.inner.scale(api::ScaleRequest { slaves, pools, max_slaves }).await?.into_inner().into())
    }

    /// A client certificate for the engine's services.
    pub async fn credentials(&mut self, name: &str, valid_days: u32) -> Result<Credentials, Status> {
        let r = self
            .inner
            .credentials(api::CredentialsRequest { name: name.into(), valid_days })
            .await?
            .into_inner();
        Ok(Credentials { ca_pem: r.ca_pem, cert_pem: r.cert_pem, key_pem: r.key_pem, scheduler: r.scheduler })
    }

    pub async fn destroy(&mut self) -> Result<Destroyed, Status> {
        Ok(self.inner.destroy(api::DestroyRequest {}).await?.into_inner().into())
    }
}

/// A client certificate, its key and the CA, for the engine's services.
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The scheduler's address, empty while there is none.
    pub scheduler: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("scheduler", &self.scheduler).finish_non_exhaustive()
    }
}
