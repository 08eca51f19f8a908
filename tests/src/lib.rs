//! Test harness for the integration and end-to-end suites: runs the real
//! `ddisco-controller` and `ddisco-agent` binaries (built beforehand by
//! `scripts/test`, or `cargo build --bins`) against a temporary state
//! directory, and waits on conditions with deadlines, never on bare sleeps.

pub mod disco;
pub mod ec2;
pub mod peer;
pub mod real_disco;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Folder holding the built binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DDISCO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().expect("the executable's folder");
    // A test runs from `deps/`; a tool of this crate (the fleet
    // benchmark) beside the binaries.
    if dir.join("ddisco-controller").exists() {
        return dir.to_path_buf();
    }
    dir.parent().expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; scripts/test does it)",
        p.display()
    );
    p
}

/// Taken by every test that runs a multi-node cluster installing a real
/// engine (Dask's virtualenvs, a real Disco): such tests run one at a time
/// within their binary (cargo runs the binaries one after the other), so two
/// of them never share this machine's two cores and neither starves the
/// other's nodes past a deadline.
pub fn one_heavy_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fast timings for tests: 0.5 s heartbeats, lost after 3 s (headroom for
/// several clusters sharing two cores).
pub const FAST: &str = r#"
engine = "none"
base_packages = ["coreutils"]
additional_packages = []
pip_requirements = []
listen = "127.0.0.1:0"
download_listen = "127.0.0.1:0"
dashboard_listen = "127.0.0.1:0"
heartbeat_interval_secs = 0.5
heartbeat_timeout_secs = 3.0
reconcile_interval_secs = 0.3
"#;

/// `FAST` + `extra`, keys in `extra` overriding the same keys of `FAST`.
pub fn fast_config(extra: &str) -> String {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let overridden: Vec<String> = extra.lines().filter(|l| l.contains('=')).map(key).collect();
    let base: String =
        FAST.lines().filter(|l| !overridden.contains(&key(l))).map(|l| format!("{l}\n")).collect();
    format!("{base}\n{extra}\n")
}

/// How long `serve` may take to open its admin API: it first prepares the
/// nodes' Python packages, which on a cold cache downloads them (`serve`
/// exiting ends the wait at once).
pub const ADMIN_UP: Duration = Duration::from_secs(600);

/// A controller running `serve` on a temporary state directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    serve: Option<Child>,
    /// Extra environment for every controller command (AWS settings).
    env: Vec<(String, String)>,
    /// Open-file limit (soft and hard) `serve` runs under, if set.
    fd_limit: Option<u32>,
}

impl Cluster {
    /// Writes `FAST` + `extra` as the config and starts `serve`; returns once
    /// the admin API answers.
    pub fn start(extra: &str) -> Cluster {
        Cluster::start_with_env(extra, vec![])
    }

    /// Like `start`, with `serve` limited to `fds` open files (soft and
    /// hard: it cannot raise them).
    pub fn start_with_fd_limit(extra: &str, fds: u32) -> Cluster {
        Cluster::start_inner(extra, vec![], Some(fds))
    }

    /// `serve` with `json` as its `config.json` (the original's format),
    /// unchanged: nothing of `FAST` is added.
    pub fn start_json(json: &str, env: Vec<(String, String)>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.json");
        std::fs::write(&config, json).expect("write config");
        let mut c = Cluster { dir, config, serve: None, env, fd_limit: None };
        c.spawn_serve();
        c.wait_until("the admin API answers", ADMIN_UP, |_| true);
        c
    }

    /// Like `start`, with extra environment for the controller.
    pub fn start_with_env(extra: &str, env: Vec<(String, String)>) -> Cluster {
        Cluster::start_inner(extra, env, None)
    }

    /// Writes `FAST` + `extra` as the config, with `env` for every
    /// command, and starts nothing (see [`Cluster::start_serve`]).
    pub fn prepare_with_env(extra: &str, env: Vec<(String, String)>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("ddisco.toml");
        std::fs::write(&config, fast_config(extra)).expect("write config");
        Cluster { dir, config, serve: None, env, fd_limit: None }
    }

    /// Starts `serve` (of a prepared cluster); returns once the admin API
    /// answers.
    pub fn start_serve(&mut self) {
        self.spawn_serve();
        self.wait_until("the admin API answers", ADMIN_UP, |_| true);
    }

    /// Runs `ddisco-controller ARGS --config <config>` to its end, killed
    /// (and the test failed) if it takes longer than `deadline`.
    pub fn ctl_within(&self, args: &[&str], deadline: Duration) -> Output {
        let mut child = Command::new(bin("ddisco-controller"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ddisco-controller");
        // Read both pipes while it runs (a full pipe would block it).
        let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let out_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut so, &mut v);
            v
        });
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut se, &mut v);
            v
        });
        let end = Instant::now() + deadline;
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                let err = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
                panic!("`ddisco-controller {}` did not end within {deadline:?}:\n{err}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
    }

    fn start_inner(extra: &str, env: Vec<(String, String)>, fd_limit: Option<u32>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("ddisco.toml");
        std::fs::write(&config, fast_config(extra)).expect("write config");
        let mut c = Cluster { dir, config, serve: None, env, fd_limit };
        c.spawn_serve();
        c.wait_until("the admin API answers", ADMIN_UP, |_| true);
        c
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join(".ddisco")
    }

    /// Everything useful when a test fails: status, the controller's log and
    /// every node's console.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "status: {}\nserve log:\n{}\n",
            self.status().map(|v| serde_json::to_string_pretty(&v).unwrap()).unwrap_or("none".into()),
            self.serve_log()
        );
        if let Ok(dir) = std::fs::read_dir(self.state_dir().join("nodes")) {
            for e in dir.flatten() {
                let console = std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default();
                let tail: Vec<&str> = console.lines().rev().take(15).collect();
                out.push_str(&format!(
                    "--- {} console (last lines):\n{}\n",
                    e.file_name().to_string_lossy(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        out
    }

    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Runs `ddisco-controller ARGS --config <this cluster's config>`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("ddisco-controller"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run ddisco-controller")
    }

    /// `status --json`, or `None` if the controller does not answer.
    pub fn status(&self) -> Option<Value> {
        let out = self.ctl(&["status", "--json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status --json is JSON"))
    }

    /// Polls `status --json` until `pred` holds; panics after `deadline`
    /// with the last status and the controller's log.
    pub fn wait_until(&mut self, what: &str, deadline: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + deadline;
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if let Some(child) = self.serve.as_mut()
                && let Ok(Some(code)) = child.try_wait()
            {
                panic!("serve exited ({code}) while waiting for {what}\n{}", self.serve_log());
            }
            if Instant::now() > end {
                let _ = last;
                panic!("timed out after {deadline:?} waiting for {what}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` on the controller's dashboard listener (HTTP/1.0, so the
    /// test needs no client library): (status code, body).
    pub fn dashboard_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = std::fs::read_to_string(self.state_dir().join("dashboard.addr")).expect("dashboard.addr");
        let mut s = std::net::TcpStream::connect(addr.trim()).expect("connect to the dashboard");
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    /// Pid of a node's process group leader (the agent, once it runs).
    pub fn node_pid(&self, node_id: &str) -> i32 {
        std::fs::read_to_string(self.state_dir().join("nodes").join(node_id).join("pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// The userdata the controller wrote for a node.
    pub fn userdata(&self, node_id: &str) -> String {
        std::fs::read_to_string(self.state_dir().join("nodes").join(node_id).join("userdata.sh"))
            .expect("userdata.sh")
    }

    fn spawn_serve(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .expect("log");
        let mut cmd = match self.fd_limit {
            None => Command::new(bin("ddisco-controller")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")]).arg(bin("ddisco-controller"));
                c
            }
        };
        let serve = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.serve = Some(serve);
    }

    /// Stops `serve` with SIGTERM and waits for it (nodes keep running).
    pub fn stop_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = nix_kill_term(child.id() as i32);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("serve did not stop within 10s of SIGTERM");
        }
    }

    /// Kills `serve` with SIGKILL (a crash): nothing is saved on the way out.
    pub fn crash_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether `serve` is still running; its exit code if not.
    pub fn serve_exit(&mut self) -> Option<i32> {
        let child = self.serve.as_mut()?;
        match child.try_wait() {
            Ok(Some(s)) => Some(s.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// Starts `serve` again on the same state directory.
    pub fn restart_serve(&mut self) {
        self.spawn_serve();
        self.wait_until("the restarted admin API answers", Duration::from_secs(30), |_| true);
    }

    /// Waits for `serve` to exit (after destroy) within `deadline`.
    pub fn wait_serve_exit(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let Some(child) = self.serve.as_mut() else { return true };
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                self.serve = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Leave no node behind, even when a test fails.
        let _ = self.ctl(&["destroy", "--yes"]);
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.ctl(&["destroy", "--yes"]);
    }
}

/// Nodes of a status document.
pub fn nodes(s: &Value) -> &Vec<Value> {
    s["nodes"].as_array().expect("nodes")
}

pub fn ready_count(s: &Value, role: &str) -> usize {
    nodes(s).iter().filter(|n| n["role"] == role && n["state"] == "ready").count()
}

/// Exactly one ready master, `slaves` ready slaves, nothing else.
pub fn at_size(s: &Value, slaves: usize) -> bool {
    nodes(s).len() == slaves + 1 && ready_count(s, "master") == 1 && ready_count(s, "slave") == slaves
}

pub fn node_ids(s: &Value, role: &str) -> Vec<String> {
    nodes(s)
        .iter()
        .filter(|n| n["role"] == role)
        .map(|n| n["node_id"].as_str().unwrap().to_string())
        .collect()
}

/// Is this pid alive (and not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone.
pub fn wait_gone(pid: i32, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Pids of every live process carrying this state directory's node env.
pub fn node_processes(state_dir: &Path) -> Vec<i32> {
    let nodes_dir = state_dir.join("nodes").canonicalize().unwrap_or_default();
    let needle = format!("DDISCO_HOME={}/", nodes_dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env.split(|b| *b == 0).any(|v| v.starts_with(needle.as_bytes()))
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

fn nix_kill_term(pid: i32) -> std::io::Result<()> {
    let st = Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    if st.success() { Ok(()) } else { Err(std::io::Error::other("kill -TERM failed")) }
}
