//! The operator's HTTP listener: the dashboard (`/`, a read-only page that
//! refreshes itself from `/api/status` every second), `/metrics`
//! (Prometheus text format) and `/healthz`. Bound to localhost by default;
//! the configuration insists on a `dashboard_token` (16 characters at
//! least) for any non-loopback address.
//!
//! With a token set, every request must be signed in:
//! - scripts and Prometheus send `Authorization: Bearer <token>`;
//! - a browser signs in once on the login page (`POST /login`, the token in
//!   the form body) and gets a session cookie (`HttpOnly`, `SameSite=Lax`,
//!   12 hours; random, kept in memory, at most [`MAX_SESSIONS`]). The token
//!   never goes into a URL, so it is not in browser history or proxy logs.

use crate::cluster::Cluster;
use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Signed-in browsers kept at once (the oldest is signed out beyond).
pub const MAX_SESSIONS: usize = 256;
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "ddisco_session";

#[derive(Clone)]
struct App {
    sh: Arc<Cluster>,
    sessions: Arc<Sessions>,
}

/// Browser sessions: random ids and when they end.
#[derive(Default)]
struct Sessions {
    ends: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    fn open(&self, now: Instant) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut m = self.ends.lock();
        m.retain(|_, end| *end > now);
        if m.len() >= MAX_SESSIONS
            && let Some(oldest) = m.iter().min_by_key(|(_, end)| **end).map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        m.insert(id.clone(), now + SESSION_LIFETIME);
        id
    }

    fn valid(&self, id: &str, now: Instant) -> bool {
        self.ends.lock().get(id).is_some_and(|end| *end > now)
    }
}

pub async fn serve(
    shared: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/login", post(login))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/assets/uplot.js", get(|| async { asset("text/javascript", UPLOT_JS) }))
        .route("/assets/uplot.css", get(|| async { asset("text/css", UPLOT_CSS) }))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(App { sh: shared, sessions: Arc::default() });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Constant-time comparison: a token is a password.
fn same(got: &str, want: &str) -> bool {
    got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(token) = &app.sh.cfg.dashboard_token else { return true };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|b| same(b, &token.0)) {
        return true;
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')));
    cookie.is_some_and(|id| app.sessions.valid(id, Instant::now()))
}

fn refused() -> Response {
    (StatusCode::UNAUTHORIZED, "dashboard token required\n").into_response()
}

/// The sign-in form: the token goes in the body of a POST, never a URL.
fn login_page(status: StatusCode, message: &str) -> Response {
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>ddisco: sign in</title>\
         <p>{message}</p><form method=post action=login>\
         <label>dashboard token <input type=password name=token autofocus></label> \
         <button>sign in</button></form>"
    );
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], html)
        .into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<App>, Form(f): Form<LoginForm>) -> Response {
    let Some(token) = &app.sh.cfg.dashboard_token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    };
    if !same(&f.token, &token.0) {
        return login_page(StatusCode::UNAUTHORIZED, "dashboard token required: that one is not it");
    }
    let id = app.sessions.open(Instant::now());
    let cookie =
        format!("{COOKIE}={id}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}", SESSION_LIFETIME.as_secs());
    (StatusCode::SEE_OTHER, [(header::LOCATION, "./".to_string()), (header::SET_COOKIE, cookie)])
        .into_response()
}

async fn page(State(app): State<App>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return login_page(StatusCode::UNAUTHORIZED, "dashboard token required: sign in");
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn status(State(app): State<App>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return refused();
    }
    axum::Json(crate::status::StatusView::of(&app.sh)).into_response()
}

/// The charting library the page uses (uPlot, MIT: `assets/README`),
/// served from the binary: the page fetches nothing from elsewhere.
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=3600")], body).into_response()
}

/// The bounded history the charts draw, with the spend cap.
async fn history(State(app): State<App>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return refused();
    }
    let samples = app.sh.history.lock().samples();
    axum::Json(serde_json::json!({ "samples": samples, "max_spend_usd": app.sh.cfg.max_spend_usd }))
        .into_response()
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return refused();
    }
    let sh = &app.sh;
    let (nodes, desired) = sh.node_counts();
    let text = crate::metrics::render(&sh.metrics, &nodes, desired, &sh.provider.api_calls());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_and_are_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.open(t0);
        assert!(s.valid(&first, t0));
        assert!(!s.valid(&first, t0 + SESSION_LIFETIME), "ended");
        assert!(!s.valid("forged", t0));
        for i in 0..MAX_SESSIONS {
            s.open(t0 + Duration::from_millis(i as u64 + 1));
        }
        assert!(!s.valid(&first, t0), "the oldest is signed out beyond the bound");
        assert_eq!(s.ends.lock().len(), MAX_SESSIONS);
    }
}
