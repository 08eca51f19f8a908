//! The controller process under test, and what /proc says of a process.

use super::*;

/// A controller process under test.
pub(super) struct Ctl {
    pub(super) child: Child,
    pub(super) dir: tempfile::TempDir,
}

impl Ctl {
    pub(super) fn start(extra: &str) -> anyhow::Result<Ctl> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("ddisco.toml");
        // Simulated nodes never download the agent, but serve wants one to
        // offer: any existing file does (this program).
        let base = format!(
            "provider = \"record\"\nengine = \"none\"\nbase_packages = []\nadditional_packages = []\n\
             pip_requirements = []\nlisten = \"127.0.0.1:0\"\ndownload_listen = \"127.0.0.1:0\"\n\
             dashboard_listen = \"127.0.0.1:0\"\nreconcile_interval_secs = 1.0\nagent_binary = \"{}\"",
            std::env::current_exe()?.display()
        );
        // Keys in `extra` replace the same keys of the base.
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        let overridden: Vec<String> = extra.lines().map(key).collect();
        let mut text: String =
            base.lines().filter(|l| !overridden.contains(&key(l))).map(|l| format!("{l}\n")).collect();
        text.push_str(extra);
        text.push('\n');
        std::fs::write(&cfg, text)?;
        let exe = std::env::current_exe()?.with_file_name("ddisco-controller");
        anyhow::ensure!(
            exe.exists(),
            "{} is missing: build it (cargo build --release --bins)",
            exe.display()
        );
        let log = std::fs::File::create(dir.path().join("serve.log"))?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Ctl { child, dir })
    }

    /// A controller with the default timeout ratio (timeout = 3 x interval).
    pub(super) fn with_heartbeats(interval_secs: f64) -> anyhow::Result<Ctl> {
        Ctl::start(&format!(
            "heartbeat_interval_secs = {interval_secs}\nheartbeat_timeout_secs = {}",
            interval_secs * 3.0
        ))
    }

    pub(super) fn state(&self) -> PathBuf {
        self.dir.path().join(".ddisco")
    }

    pub(super) async fn admin(&self) -> anyhow::Result<AdminClient> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = AdminClient::connect(&self.state().join("admin.sock")).await {
                return Ok(c);
            }
            anyhow::ensure!(Instant::now() < end, "the controller did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Launch records not seen yet.
    pub(super) fn new_launches(&self, seen: &mut HashSet<String>) -> Vec<Launch> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.state().join("launches")) else { return out };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") || seen.contains(&name) {
                continue;
            }
            if let Some(l) = std::fs::read_to_string(e.path()).ok().and_then(|t| Launch::parse(&t)) {
                seen.insert(name);
                out.push(l);
            }
        }
        out
    }
}

impl Drop for Ctl {
    /// SIGTERM first (the controller saves and exits; a profiler wrapping
    /// it writes its report), SIGKILL after 10 s.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let _ = kill(nix::unistd::Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) and RSS of a process.
pub(super) fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub(super) fn proc_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
