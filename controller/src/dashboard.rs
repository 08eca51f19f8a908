//! The operator's HTTP listener: `/metrics` (Prometheus text format) and
//! `/healthz`. Bound to localhost by default; when a `dashboard_token` is
//! set, every request must carry `Authorization: Bearer <token>` (the
//! configuration insists on a token for any non-loopback address).

use crate::controller::Shared;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

fn authorized(sh: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &sh.cfg.dashboard_token else { return true };
    let want = format!("Bearer {}", token.0);
    let got = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    // Constant-time comparison: a token is a password.
    got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn metrics(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&sh, &headers) {
        return (StatusCode::UNAUTHORIZED, "dashboard token required\n").into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render(&sh)).into_response()
}
