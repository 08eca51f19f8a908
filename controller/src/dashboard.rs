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
//!
//! What a peer may hold (its own accept loop, not axum's):
//! - at most [`MAX_CONNECTIONS`] connections at once (more are closed at
//!   once and counted in `ddisco_connections_refused_total`);
//! - a request's head must arrive within [`HEADER_TIMEOUT`], and a
//!   connection that sends nothing for [`IDLE_TIMEOUT`] is closed;
//! - a wrong token at `/login` makes that address wait before its next
//!   try (doubling from 1 s to [`MAX_LOGIN_WAIT`]; 429 meanwhile);
//! - bound to loopback, a request must name a loopback host (`Host`): a
//!   web page whose name a DNS server points at 127.0.0.1 cannot read the
//!   dashboard through the operator's browser (DNS rebinding);
//! - bound beyond loopback, it speaks **HTTPS only**, with the controller's
//!   server certificate (the session CA's, `<state_dir>/ca.pem`; names
//!   `ddisco-controller` and the advertised host): the token and the
//!   session cookie never cross the network in clear. The handshake counts
//!   against the head's deadline.

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
/// Connections at once (the page polls through one or two).
pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_LOGIN_WAIT: Duration = Duration::from_secs(60);
/// Addresses whose failed logins are remembered (the oldest forgotten).
const MAX_LOGIN_RECORDS: usize = 4096;
const COOKIE: &str = "ddisco_session";

#[derive(Clone)]
struct App {
    sh: Arc<Cluster>,
    sessions: Arc<Sessions>,
    logins: Arc<Logins>,
    /// Bound to loopback: requests must name a loopback host.
    loopback: bool,
}

/// Failed logins per address: (failures, when the next try is allowed).
#[derive(Default)]
struct Logins {
    by_ip: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl Logins {
    /// `Err(wait)` while `ip` must still wait after its failures.
    fn may_try(&self, ip: std::net::IpAddr, now: Instant) -> Result<(), Duration> {
        match self.by_ip.lock().get(&ip) {
            Some((_, until)) if *until > now => Err(*until - now),
            _ => Ok(()),
        }
    }

    fn failed(&self, ip: std::net::IpAddr, now: Instant) -> Duration {
        let mut m = self.by_ip.lock();
        if m.len() >= MAX_LOGIN_RECORDS && !m.contains_key(&ip) {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= MAX_LOGIN_RECORDS
                && let Some(oldest) = m.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k)
            {
                m.remove(&oldest);
            }
        }
        let e = m.entry(ip).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        let wait = Duration::from_secs(1).saturating_mul(1 << (e.0 - 1).min(16)).min(MAX_LOGIN_WAIT);
        e.1 = now + wait;
        wait
    }

    fn succeeded(&self, ip: std::net::IpAddr) {
        self.by_ip.lock().remove(&ip);
    }
}

/// Does `host` (a `Host` header) name this machine's loopback?
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let tls = if loopback {
        None
    } else {
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(shared.pki.https_config(&[b"http/1.1"])?)))
    };
    let state = App { sh: shared.clone(), sessions: Arc::default(), logins: Arc::default(), loopback };
    let app = Router::new()
        .route("/", get(page))
        .route("/login", post(login))
        .route("/api/status", get(status))
        .route("/api/history", get(history))
        .route("/assets/uplot.js", get(|| async { asset("text/javascript", UPLOT_JS) }))
        .route("/assets/uplot.css", get(|| async { asset("text/css", UPLOT_CSS) }))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn_with_state(state.clone(), host_check))
        .with_state(state);
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let log = Arc::new(crate::admission::RateLimitedLog::default());
    let for_connections = shutdown.clone();
    let mut stopped = Box::pin(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stopped => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    log.warn(|| format!("dashboard: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            crate::metrics::Metrics::inc(&shared.metrics.connections_refused);
            log.warn(|| {
                format!("dashboard: connection from {peer} closed: {MAX_CONNECTIONS} connections open")
            });
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let mut stop = for_connections.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _place = place;
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let serve = |io| {
                hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(IdleStream::new(io, IDLE_TIMEOUT)),
                        service,
                    )
            };
            match tls {
                None => {
                    tokio::select! {
                        _ = serve(Box::new(tcp) as Box<dyn Io>) => {}
                        _ = stopped => {}
                    }
                }
                Some(acceptor) => {
                    let conn = async move {
                        // The handshake is part of the head's deadline.
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = serve(Box::new(tls) as Box<dyn Io>).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, "dashboard: TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "dashboard: TLS handshake not finished in time"),
                        }
                    };
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped => {}
                    }
                }
            }
        });
    }
}

/// Bound to loopback, a request must name a loopback host.
async fn host_check(
    State(app): State<App>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if app.loopback {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !loopback_host(host) {
            return (StatusCode::MISDIRECTED_REQUEST, "this dashboard answers to localhost only\n")
                .into_response();
        }
    }
    next.run(req).await
}

/// A connection, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A stream whose reads fail once nothing came for `idle` (a peer that
/// holds a connection open and silent).
struct IdleStream {
    inner: Box<dyn Io>,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleStream {
    fn new(inner: Box<dyn Io>, idle: Duration) -> IdleStream {
        IdleStream { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }
}

impl tokio::io::AsyncRead for IdleStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let at = tokio::time::Instant::now() + self.idle;
                    self.deadline.as_mut().reset(at);
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle connection",
                    )));
                }
                std::task::Poll::Pending
            }
        }
    }
}

impl tokio::io::AsyncWrite for IdleStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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

async fn login(
    State(app): State<App>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(token) = &app.sh.cfg.dashboard_token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    };
    let now = Instant::now();
    if let Err(wait) = app.logins.may_try(peer.ip(), now) {
        let secs = wait.as_secs_f64().ceil() as u64;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.max(1).to_string())],
            format!("too many wrong tokens from {}: try again in {secs} s\n", peer.ip()),
        )
            .into_response();
    }
    if !same(&f.token, &token.0) {
        app.logins.failed(peer.ip(), now);
        return login_page(StatusCode::UNAUTHORIZED, "dashboard token required: that one is not it");
    }
    app.logins.succeeded(peer.ip());
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
    fn wrong_tokens_make_an_address_wait_longer_each_time() {
        let l = Logins::default();
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(l.may_try(a, t0), Ok(()));
        assert_eq!(l.failed(a, t0), Duration::from_secs(1));
        assert!(l.may_try(a, t0).is_err() && l.may_try(b, t0).is_ok(), "per address");
        assert_eq!(l.failed(a, t0 + Duration::from_secs(1)), Duration::from_secs(2));
        for i in 0..20 {
            l.failed(a, t0 + Duration::from_secs(100 * i));
        }
        let now = t0 + Duration::from_secs(2000);
        assert_eq!(l.failed(a, now), MAX_LOGIN_WAIT, "bounded");
        l.succeeded(a);
        assert_eq!(l.may_try(a, now), Ok(()));
    }

    #[test]
    fn only_loopback_names_reach_a_loopback_dashboard() {
        for ok in ["localhost", "localhost:7445", "127.0.0.1:7445", "[::1]:7445", "LOCALHOST"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example:7445", "10.0.0.1:7445", "", "localhost.evil.example", "[::2]:80"] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

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
