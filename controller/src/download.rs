//! Serves the agent binary to booting nodes over HTTPS (the cluster CA's
//! server certificate). The binary is public; its integrity is checked on the
//! node against the SHA-256 written into the userdata.

use crate::admission::{Gate, Limits};
use crate::cluster::Cluster;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

/// How long a client may take to send its request's headers.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until shutdown; connections come through `admission` (limits for
/// peers without a certificate: here, every peer).
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

    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let limits = Limits::DOWNLOAD.within(shared.fd_limit);
    let gate = Arc::new(Gate::new("download port", limits, shared.metrics.clone()));
    let mut incoming = crate::admission::incoming(listener, Arc::new(tls), gate);
    loop {
        let conn = tokio::select! {
            c = incoming.recv() => c,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let stream = match conn {
            Some(Ok(s)) => s,
            Some(Err(_)) => continue,
            None => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // A peer that trickles its request headers is cut off.
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
        });
    }
    Ok(())
}
