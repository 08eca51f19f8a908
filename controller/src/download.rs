//! Serves the agent binaries to booting nodes over HTTPS (the cluster CA's
//! server certificate), the Disco build (`disco_bundle`) to the nodes'
//! install step, and the nodes' prepared Python packages (`pyenv`). These files are public; their integrity is checked on the
//! node against the SHA-256 written into the userdata or the step.

use crate::admission::{Gate, Limits};
use crate::cluster::Cluster;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

/// Where the x86_64 agent is served.
pub const AGENT_PATH: &str = "/agent/ddisco-agent";
/// Where the arm64 agent is served (with `agent_binary_arm64`).
pub const AGENT_ARM64_PATH: &str = "/agent/ddisco-agent-arm64";
/// Where the Disco build is served (with `disco_bundle`).
pub const DISCO_BUNDLE_PATH: &str = "/disco/disco.tar.gz";

/// Where a prepared Python environment is served, by its SHA-256.
pub fn python_env_path(sha256: &str) -> String {
    format!("/python-env/{sha256}.tar.gz")
}

/// The architecture an ELF executable is built for (`x86_64`, `arm64`),
/// from its header; `None` if it is not a 64-bit little-endian ELF file.
pub fn elf_arch(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    match u16::from_le_bytes([bytes[18], bytes[19]]) {
        0x3e => Some("x86_64"),
        0xb7 => Some("arm64"),
        _ => Some("other"),
    }
}

/// How long a client may take to send its request's headers.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until shutdown; connections come through `admission` (limits for
/// peers without a certificate: here, every peer).
pub async fn serve(
    shared: Arc<Cluster>,
    listener: std::net::TcpListener,
    files: Vec<(String, Vec<u8>)>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = shared.pki.https_config(&[b"http/1.1"])?;

    let binary = |bytes: Vec<u8>| {
        let bytes = Bytes::from(bytes);
        get(move || {
            let bytes = bytes.clone();
            async move { ([(header::CONTENT_TYPE, "application/octet-stream")], bytes) }
        })
    };
    let mut app = Router::new().route("/healthz", get(|| async { "ok" }));
    for (path, bytes) in files {
        app = app.route(&path, binary(bytes));
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_headers_tell_the_architecture() {
        let elf = |class: u8, machine: u16| {
            let mut b = vec![0u8; 64];
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = class;
            b[5] = 1;
            b[18..20].copy_from_slice(&machine.to_le_bytes());
            b
        };
        assert_eq!(elf_arch(&elf(2, 0x3e)), Some("x86_64"));
        assert_eq!(elf_arch(&elf(2, 0xb7)), Some("arm64"));
        assert_eq!(elf_arch(&elf(2, 0xf3)), Some("other"));
        assert_eq!(elf_arch(&elf(1, 0x3e)), None);
        assert_eq!(elf_arch(b"#!/bin/sh\n"), None);
        // This test's own executable is the build machine's.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&me), Some(if cfg!(target_arch = "x86_64") { "x86_64" } else { "arm64" }));
    }
}
