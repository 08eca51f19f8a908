//! A stand-in for a Disco master's HTTP control API (port 8989), enforcing
//! the documented contract from shared/docs/disco-facts.md. **Test double:**
//! Disco itself is dead upstream and cannot be installed here.
//!
//! - `POST /disco/ctrl/save_config_table`, body `[["host","workers"], ...]`,
//!   both values strings: `"table saved!"`; HTTP 400 `"duplicate nodes"` or
//!   `"invalid config"` otherwise. Saving replaces the whole table.
//! - `GET /disco/ctrl/load_config_table` returns it.
//! - `POST /disco/ctrl/blacklist` / `whitelist` / `gc_blacklist`, body a JSON string: the
//!   host name; `""` with 200, whether the host is in the table or not (as
//!   the real master answers); a body that is not a JSON string: 400.
//!
//! [`built_disco`] gives the real Disco (scripts/build-disco), which the
//! `real_disco_*` tests run instead.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub op: String,
    pub body: String,
    pub status: u16,
}

#[derive(Default)]
struct St {
    table: Vec<(String, String)>,
    calls: Vec<Call>,
}

pub struct DiscoStandIn {
    pub port: u16,
    state: Arc<Mutex<St>>,
    task: tokio::task::JoinHandle<()>,
}

type S = State<Arc<Mutex<St>>>;

impl DiscoStandIn {
    pub fn start(rt: &tokio::runtime::Runtime) -> DiscoStandIn {
        let state: Arc<Mutex<St>> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/disco/ctrl/save_config_table", post(save))
            .route("/disco/ctrl/load_config_table", get(load))
            .route("/disco/ctrl/blacklist", post(|s: S, b: String| list(s, b, "blacklist")))
            .route("/disco/ctrl/whitelist", post(|s: S, b: String| list(s, b, "whitelist")))
            .route("/disco/ctrl/gc_blacklist", post(|s: S, b: String| list(s, b, "gc_blacklist")))
            .with_state(state.clone());
        let task = rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        DiscoStandIn { port, state, task }
    }

    pub fn table(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().table.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
}

impl Drop for DiscoStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(st: &mut St, op: &str, body: &str, status: StatusCode) {
    st.calls.push(Call { op: op.into(), body: body.into(), status: status.as_u16() });
}

async fn save(State(st): S, body: String) -> (StatusCode, String) {
    let mut st = st.lock().unwrap();
    let parsed: Option<Vec<(String, String)>> =
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| {
            v.as_array()?
                .iter()
                .map(|row| {
                    let row = row.as_array()?;
                    match row.as_slice() {
                        [h, w] => Some((h.as_str()?.to_string(), w.as_str()?.to_string())),
                        _ => None,
                    }
                })
                .collect()
        });
    let (status, reply) = match parsed {
        None => (StatusCode::BAD_REQUEST, "\"invalid config\""),
        Some(rows) => {
            let mut hosts: Vec<&String> = rows.iter().map(|(h, _)| h).collect();
            hosts.sort();
            hosts.dedup();
            if hosts.len() != rows.len() {
                (StatusCode::BAD_REQUEST, "\"duplicate nodes\"")
            } else if rows.iter().any(|(h, w)| h.is_empty() || w.parse::<u32>().is_err()) {
                (StatusCode::BAD_REQUEST, "\"invalid config\"")
            } else {
                st.table = rows;
                (StatusCode::OK, "\"table saved!\"")
            }
        }
    };
    record(&mut st, "save_config_table", &body, status);
    (status, reply.to_string())
}

async fn load(State(st): S) -> String {
    let st = st.lock().unwrap();
    serde_json::to_string(&st.table.iter().map(|(h, w)| [h, w]).collect::<Vec<_>>()).unwrap()
}

async fn list(State(st): S, body: String, op: &'static str) -> (StatusCode, String) {
    let mut st = st.lock().unwrap();
    let host: Option<String> = serde_json::from_str(&body).ok();
    let status = if host.is_some() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    record(&mut st, op, &body, status);
    (status, if status == StatusCode::OK { "\"\"".into() } else { "\"invalid host\"".into() })
}

/// The Disco home built by `scripts/build-disco` from shared/vendor/disco
/// (cached under target/disco; built once per test process otherwise).
/// Needs Erlang (`erlc`): scripts/test installs it.
pub fn built_disco() -> std::path::PathBuf {
    static HOME: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(root.join("scripts/build-disco"))
            .output()
            .expect("run scripts/build-disco");
        assert!(
            out.status.success(),
            "scripts/build-disco failed (Erlang missing? scripts/test installs erlang-nox erlang-dev):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let home = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
        std::path::PathBuf::from(home)
    })
    .clone()
}

/// A plain HTTP/1.0 request to a local server: (status, body).
pub fn http(method: &str, url: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (addr, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return (0, String::new()) };
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
