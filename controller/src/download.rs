//! Serves the agent binary to booting nodes over HTTPS (the cluster CA's
//! server certificate). The binary is public; its integrity is checked on the
//! node against the SHA-256 written into the userdata.

use crate::cluster::Cluster;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

pub async fn serve(
    shared: Arc<Cluster>,
    listener: std::net::TcpListener,
    agent: Vec<u8>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(shared.pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(shared.pki.server_key_pem.as_bytes())?;
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let agent = Bytes::from(agent);
    let app = Router::new()
        .route(
            "/agent/ddisco-agent",
            get(move || {
                let agent = agent.clone();
                async move { ([(header::CONTENT_TYPE, "application/octet-stream")], agent) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));

    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|s| *s).await;
        h.graceful_shutdown(Some(std::time::Duration::from_secs(1)));
    });
    axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
    )?
    .handle(handle)
    .serve(app.into_make_service())
    .await?;
    Ok(())
}
