//! The operator's HTTP listener: the dashboard (`/`, a read-only page that
//! refreshes itself from `/api/status` every second), `/metrics`
//! (Prometheus text format) and `/healthz`. Bound to localhost by default;
//! when a `dashboard_token` is set, every request must carry it, as
//! `Authorization: Bearer <token>` or `?token=` (the page passes it on), and
//! the configuration insists on a token for any non-loopback address.

use crate::cluster::Cluster;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

pub async fn serve(
    shared: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
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

type Params = Query<std::collections::HashMap<String, String>>;

fn authorized(sh: &Cluster, headers: &HeaderMap, q: &Params) -> bool {
    let Some(token) = &sh.cfg.dashboard_token else { return true };
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let got = header.or(q.get("token").map(String::as_str)).unwrap_or("");
    // Constant-time comparison: a token is a password.
    let want = token.0.as_bytes();
    got.len() == want.len() && got.bytes().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn refused() -> Response {
    (StatusCode::UNAUTHORIZED, "dashboard token required\n").into_response()
}

async fn page(State(sh): State<Arc<Cluster>>, headers: HeaderMap, q: Params) -> Response {
    if !authorized(&sh, &headers, &q) {
        return refused();
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn status(State(sh): State<Arc<Cluster>>, headers: HeaderMap, q: Params) -> Response {
    if !authorized(&sh, &headers, &q) {
        return refused();
    }
    axum::Json(crate::status::StatusView::of(&sh)).into_response()
}

async fn metrics(State(sh): State<Arc<Cluster>>, headers: HeaderMap, q: Params) -> Response {
    if !authorized(&sh, &headers, &q) {
        return refused();
    }
    let (nodes, desired) = sh.node_counts();
    let text = crate::metrics::render(&sh.metrics, &nodes, desired, &sh.provider.api_calls());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
