//! A stand-in for a Disco master's HTTP control API (port 8989), enforcing
//! the documented contract from shared/docs/disco-facts.md. **Test double:**
//! Disco itself is dead upstream and cannot be installed here.
//!
//! - `POST /disco/ctrl/save_config_table`, body `[["host","workers"], ...]`,
//!   both values strings: `"table saved!"`; HTTP 400 `"duplicate nodes"` or
//!   `"invalid config"` otherwise. Saving replaces the whole table.
//! - `GET /disco/ctrl/load_config_table` returns it.
//! - `POST /disco/ctrl/blacklist` / `whitelist`, body a JSON string: the
//!   host name (here it must be in the table, or 400).

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
    let status = match host {
        Some(h) if st.table.iter().any(|(t, _)| *t == h) => StatusCode::OK,
        _ => StatusCode::BAD_REQUEST,
    };
    record(&mut st, op, &body, status);
    (status, if status == StatusCode::OK { "\"\"".into() } else { "\"unknown node\"".into() })
}
