//! Converges the node on the engine directives the controller pushes: the
//! full desired set each time. Files are written when their content differs,
//! services are started, restarted when their spec changes, and stopped
//! (SIGTERM, then SIGKILL after their grace) when they disappear; posts are
//! made when their body changes and retried until they succeed. Nothing is
//! applied before the plan has finished.

use crate::backoff::Backoff;
use crate::model::{DirectiveKind, DirectiveReport, Directives, ManagedFile, Post, Report, Service};
use crate::steps::Executor;
use http_body_util::Full;
use hyper::body::Bytes;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc::UnboundedSender, watch};

pub struct Converger {
    dir: PathBuf,
    /// Services' cgroups, where they hold (root, cgroup v2).
    cgroups: Option<crate::cgroup::NodeGroup>,
    executor: Arc<Executor>,
    reports: UnboundedSender<Report>,
    /// The latest set received (std mutex: a swap, never held across await).
    desired: std::sync::Mutex<Option<Directives>>,
    /// Wakes the one task that applies (so sets are applied in order).
    kick: tokio::sync::Notify,
    /// Owned by the applying task.
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    applied: String,
    services: HashMap<String, Running>,
    posts: HashMap<String, (String, tokio::task::JoinHandle<()>)>,
    /// Probes running: name -> (URL, task).
    probes: HashMap<String, (String, tokio::task::JoinHandle<()>)>,
}

struct Running {
    spec: Service,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Converger {
    pub fn new(
        dir: &Path,
        executor: Arc<Executor>,
        reports: UnboundedSender<Report>,
        cgroups: Option<crate::cgroup::NodeGroup>,
    ) -> Arc<Converger> {
        let c = Arc::new(Converger {
            dir: dir.to_owned(),
            cgroups,
            executor,
            reports,
            desired: Default::default(),
            kick: Default::default(),
            state: Default::default(),
        });
        // One task applies: on a new set, and once the plan is done.
        let me = c.clone();
        tokio::spawn(async move {
            let mut done = me.executor.done();
            loop {
                tokio::select! {
                    _ = me.kick.notified() => {}
                    r = done.changed() => if r.is_err() { return },
                }
                me.apply().await;
            }
        });
        c
    }

    /// Records the newest directive set; it is applied in the background.
    pub fn update(&self, d: Directives) {
        *self.desired.lock().expect("lock") = Some(d);
        self.kick.notify_one();
    }

    /// Long by design: one pass over the directive kinds (files, services,
    /// posts, probes) in the order they must be applied.
    async fn apply(self: &Arc<Self>) {
        if !self.executor.is_done() {
            return;
        }
        let mut st = self.state.lock().await;
        let Some(d) = self.desired.lock().expect("lock").clone() else { return };
        if d.id == st.applied {
            return;
        }
        tracing::info!(id = %d.id, items = d.items.len(), "applying engine directives");
        let mut want_services = HashMap::new();
        let mut want_posts = HashMap::new();
        let mut want_probes = HashMap::new();
        for item in &d.items {
            match &item.kind {
                DirectiveKind::File(f) => {
                    let res = write_managed(f).await;
                    self.report(&d.id, &item.name, res.err());
                }
                DirectiveKind::Service(s) => {
                    want_services.insert(item.name.clone(), s.clone());
                }
                DirectiveKind::Post(p) => {
                    want_posts.insert(item.name.clone(), p.clone());
                }
                DirectiveKind::Probe { url } => {
                    want_probes.insert(item.name.clone(), url.clone());
                }
                DirectiveKind::Unknown => {
                    self.report(&d.id, &item.name, Some("a directive kind this agent does not know".into()))
                }
            }
        }
        // Stop services that are gone or changed, then start what is missing.
        let stale: Vec<String> = st
            .services
            .iter()
            .filter(|(n, r)| want_services.get(*n) != Some(&r.spec))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(r) = st.services.remove(&name) {
                tracing::info!(service = %name, "stopping");
                let _ = r.stop.send(true);
                let _ = r.task.await;
            }
        }
        for (name, spec) in want_services {
            if st.services.contains_key(&name) {
                continue;
            }
            let (stop, rx) = watch::channel(false);
            let group = self.cgroups.as_ref().and_then(|g| match g.service(&name) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(service = %name, "no cgroup ({e}): it stops by process tree");
                    None
                }
            });
            let task = tokio::spawn(supervise(
                name.clone(),
                spec.clone(),
                rx,
                self.dir.join("services"),
                self.reports.clone(),
                d.id.clone(),
                group,
            ));
            st.services.insert(name, Running { spec, stop, task });
        }
        // Posts, in the order given (e.g. blacklist before the new table).
        st.posts.retain(|name, (_, task)| {
            let keep = want_posts.contains_key(name);
            if !keep {
                task.abort();
            }
            keep
        });
        for item in &d.items {
            let DirectiveKind::Post(p) = &item.kind else { continue };
            // The URL counts too: Disco's carry the settings digest, so a
            // restarted master is told again.
            let sent = format!("{}\n{}", p.url, p.body);
            if st.posts.get(&item.name).is_some_and(|(was, _)| *was == sent) {
                continue;
            }
            if let Some((_, old)) = st.posts.remove(&item.name) {
                old.abort();
            }
            let task =
                tokio::spawn(post_until_ok(item.name.clone(), p.clone(), self.reports.clone(), d.id.clone()));
            // Keep the order: wait (bounded) for this post before the next.
            let done = tokio::time::timeout(Duration::from_secs(5), async {
                while !task.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            let _ = done;
            st.posts.insert(item.name.clone(), (sent, task));
        }
        // Probes: one task each, while the directive stands.
        st.probes.retain(|name, (url, task)| {
            let keep = want_probes.get(name) == Some(url);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, url) in want_probes {
            if st.probes.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(probe(name.clone(), url.clone(), self.reports.clone()));
            st.probes.insert(name, (url, task));
        }
        st.applied = d.id.clone();
    }

    fn report(&self, id: &str, name: &str, err: Option<String>) {
        if let Some(e) = &err {
            tracing::error!(directive = %name, "{e}");
        }
        let _ = self.reports.send(report(id, name, err));
    }
}

fn report(id: &str, name: &str, err: Option<String>) -> Report {
    Report::Directive(DirectiveReport {
        directives_id: id.to_string(),
        name: name.to_string(),
        ok: err.is_none(),
        message: err.unwrap_or_default(),
    })
}

/// Runs a service, restarting it with backoff when it exits, until stopped.
/// In its cgroup (`group`) when there is one: stopping it then ends
/// everything it started.
async fn supervise(
    name: String,
    spec: Service,
    mut stop: watch::Receiver<bool>,
    logs: PathBuf,
    reports: UnboundedSender<Report>,
    id: String,
    group: Option<crate::cgroup::ServiceGroup>,
) {
    let mut backoff = Backoff::new();
    let _ = std::fs::create_dir_all(&logs);
    let argv = match &group {
        Some(g) if !spec.argv.is_empty() => g.wrap(&spec.argv),
        _ => spec.argv.clone(),
    };
    loop {
        let Some(program) = argv.first() else { return };
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")));
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&argv[1..]).envs(&spec.env).stdin(Stdio::null());
        if !spec.workdir.is_empty() {
            cmd.current_dir(&spec.workdir);
        }
        if let Ok(log) = log {
            if let Ok(l2) = log.try_clone() {
                cmd.stdout(l2);
            }
            cmd.stderr(log);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = reports.send(report(&id, &name, Some(format!("cannot start {program}: {e}"))));
                let wait = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let pid = child.id();
        tracing::info!(service = %name, pid, "started");
        let _ = reports.send(report(&id, &name, None));
        let started = tokio::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let wait = backoff.next_delay();
                let msg = format!("exited ({}); restarting in {:.1}s", status.map(|s| s.to_string()).unwrap_or_default(), wait.as_secs_f64());
                tracing::warn!(service = %name, "{msg}");
                let _ = reports.send(report(&id, &name, Some(msg)));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
            _ = stop.changed() => {
                // Graceful first (a Dask worker retires on SIGTERM), to it
                // and what it started (Disco's launcher runs Erlang,
                // `runuser` its command); what is left after the grace is
                // killed. (Not a process group of its own: the node's group
                // is its machine, which the local provider ends as a whole.)
                let tree = pid.map(descendants).unwrap_or_default();
                signal_all(&tree, Signal::SIGTERM);
                if let Some(g) = &group {
                    g.signal(Signal::SIGTERM);
                }
                let grace = Duration::from_millis(u64::from(spec.grace_ms.max(100)));
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                signal_all(&tree, Signal::SIGKILL);
                // What left the tree (a daemon) is still in the cgroup.
                if let Some(g) = group {
                    let _ = tokio::task::spawn_blocking(move || g.remove()).await;
                }
                tracing::info!(service = %name, "stopped");
                return;
            }
        }
    }
}

/// `pid` and every process below it (from /proc), parents first.
fn descendants(pid: u32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            // The fields after the parenthesised name: state, ppid, ...
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)?.parse().ok());
            if let Some(pp) = ppid {
                parent_of.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid as i32];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Signals each process (one already gone is fine).
fn signal_all(pids: &[i32], sig: Signal) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), sig);
    }
}

/// `bytes` as text (invalid UTF-8 replaced), at most `max` bytes of it: a
/// replacement character takes 3 bytes for 1, so the text of `max` bytes
/// can be 3 times longer than `max`.
pub fn lossy_within(bytes: &[u8], max: usize) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// GETs `url` about once a second; reports a 2xx answer's body (its first
/// `MAX_PROBE_BODY` bytes) whenever it differs from the last one reported.
async fn probe(name: String, url: String, reports: UnboundedSender<Report>) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut last: Option<String> = None;
    let mut reported = tokio::time::Instant::now();
    loop {
        let answer = async {
            let req = hyper::Request::get(&url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            let limited = http_body_util::Limited::new(resp.into_body(), crate::model::MAX_PROBE_BODY);
            let body = http_body_util::BodyExt::collect(limited).await.map_err(|e| e.to_string())?;
            Ok(lossy_within(&body.to_bytes(), crate::model::MAX_PROBE_BODY))
        };
        match tokio::time::timeout(Duration::from_secs(3), answer).await {
            // Changed, or unchanged for 30 s (a restarted controller
            // hears it again).
            Ok(Ok(body)) if last.as_ref() != Some(&body) || reported.elapsed() > Duration::from_secs(30) => {
                tracing::debug!(probe = %name, "changed");
                last = Some(body.clone());
                reported = tokio::time::Instant::now();
                let _ = reports.send(Report::Probe { name: name.clone(), body });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(probe = %name, "GET {url}: {e}"),
            Err(_) => tracing::debug!(probe = %name, "GET {url} timed out"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// POSTs until it gets a 2xx answer (backoff between tries).
async fn post_until_ok(name: String, p: Post, reports: UnboundedSender<Report>, id: String) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut backoff = Backoff::new();
    let mut reported_failure = false;
    loop {
        let req = hyper::Request::post(&p.url)
            .header(
                "content-type",
                if p.content_type.is_empty() { "application/json" } else { &p.content_type },
            )
            .body(Full::new(Bytes::from(p.body.clone())));
        let result = match req {
            Err(e) => Err(format!("bad request: {e}")),
            Ok(req) => match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                Err(_) => Err(format!("POST {} timed out", p.url)),
                Ok(Err(e)) => Err(format!("POST {}: {e}", p.url)),
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    // Only for the error message: a little of it, never
                    // all of what the engine (a job, on Disco's master)
                    // sends.
                    let limited = http_body_util::Limited::new(resp.into_body(), 4096);
                    let body = http_body_util::BodyExt::collect(limited)
                        .await
                        .map(|b| lossy_within(&b.to_bytes(), 4096))
                        .unwrap_or_else(|_| "(a longer answer)".into());
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("POST {}: HTTP {status}: {body}", p.url))
                    }
                }
            },
        };
        match result {
            Ok(()) => {
                tracing::info!(post = %name, "posted");
                let _ = reports.send(report(&id, &name, None));
                return;
            }
            Err(e) => {
                if !reported_failure {
                    tracing::warn!(post = %name, "{e}; retrying");
                    let _ = reports.send(report(&id, &name, Some(e)));
                    reported_failure = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Writes a managed file (whole, or the block between marker lines),
/// through `files`: never following a symlink another user planted, and a
/// managed file that is not a regular file is refused (reported).
async fn write_managed(f: &ManagedFile) -> Result<(), String> {
    let path = Path::new(&f.path);
    let owner = if f.owner.is_empty() { None } else { Some(crate::files::Owner::of_user(&f.owner)?) };
    let wanted = if f.marker.is_empty() {
        f.content.clone()
    } else {
        let existing = crate::files::read_safely(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .unwrap_or_default();
        with_block(&existing, &f.marker, &f.content)
    };
    // Written owner-only first, then given its mode (a 0400 cookie is never
    // readable by others, even briefly), and renamed into place.
    let mode = if f.mode == 0 { 0o644 } else { f.mode };
    crate::files::write_safely(path, wanted.as_bytes(), mode, owner)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `text` with the block `# BEGIN marker` .. `# END marker` set to `content`.
pub fn with_block(text: &str, marker: &str, content: &str) -> String {
    let begin = format!("# BEGIN {marker}");
    let end = format!("# END {marker}");
    let mut block = format!("{begin}\n{content}");
    if !block.ends_with('\n') {
        block.push('\n');
    }
    block.push_str(&end);
    block.push('\n');
    let lines: Vec<&str> = text.lines().collect();
    let b = lines.iter().position(|l| l.trim() == begin);
    let e = lines.iter().position(|l| l.trim() == end);
    match (b, e) {
        (Some(b), Some(e)) if e > b => {
            let mut out: String = lines[..b].iter().map(|l| format!("{l}\n")).collect();
            out.push_str(&block);
            for l in &lines[e + 1..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        _ => {
            let mut out = text.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&block);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_block_is_added_then_replaced_leaving_the_rest() {
        let base = "127.0.0.1 localhost\n";
        let once = with_block(base, "ddisco", "10.0.0.1 ip-1\n");
        assert_eq!(once, "127.0.0.1 localhost\n# BEGIN ddisco\n10.0.0.1 ip-1\n# END ddisco\n");
        let twice = with_block(&once, "ddisco", "10.0.0.2 ip-2");
        assert_eq!(twice, "127.0.0.1 localhost\n# BEGIN ddisco\n10.0.0.2 ip-2\n# END ddisco\n");
        assert_eq!(with_block(&twice, "ddisco", "10.0.0.2 ip-2"), twice);
    }

    /// Stopping a service stops what it started: a launcher whose child
    /// (Disco's Python launcher runs Erlang) would otherwise outlive it.
    #[tokio::test]
    async fn a_stopped_service_takes_its_children_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let spec = Service {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep 300 & echo $! > {}; wait", pidfile.display()),
            ],
            env: Default::default(),
            workdir: String::new(),
            grace_ms: 200,
        };
        let (stop, stop_rx) = watch::channel(false);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(supervise(
            "svc".into(),
            spec,
            stop_rx,
            dir.path().join("logs"),
            tx,
            "d1".into(),
            None,
        ));
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        let child: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile).ok().and_then(|t| t.trim().parse().ok()) {
                break p;
            }
            assert!(tokio::time::Instant::now() < end, "the service did not start its child");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(alive(child));
        stop.send(true).unwrap();
        task.await.unwrap();
        // Reaped by init or still a zombie: either way not running.
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while alive(child) && !is_zombie(child) {
            assert!(tokio::time::Instant::now() < end, "the service's child {child} outlived it");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issue 22, item 6: a daemon a service starts (a new session, its
    /// parent gone: out of the service's process tree, as Disco's lighttpd)
    /// ends with the service, through the service's cgroup. As root with
    /// cgroup v2.
    #[tokio::test]
    #[ignore = "needs root and cgroup v2: scripts/test runs it as root (cargo test -- --include-ignored)"]
    async fn a_daemon_a_service_started_is_stopped_with_it() {
        let ca = hex::encode(rand::random::<[u8; 8]>());
        let node = crate::cgroup::NodeGroup::new("converge-test", &ca)
            .expect("this test needs root and cgroup v2 (run it as root, on a cgroup v2 host)");
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("daemon.pid");
        let spec = Service {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("setsid sh -c 'sleep 300 & echo $! > {}' & exec sleep 300", pidfile.display()),
            ],
            env: Default::default(),
            workdir: String::new(),
            grace_ms: 200,
        };
        let (stop, stop_rx) = watch::channel(false);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let group = node.service("daemonizing").unwrap();
        let task = tokio::spawn(supervise(
            "daemonizing".into(),
            spec,
            stop_rx,
            dir.path().join("logs"),
            tx,
            "d1".into(),
            Some(group),
        ));
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        let daemon: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile).ok().and_then(|t| t.trim().parse().ok()) {
                break p;
            }
            assert!(tokio::time::Instant::now() < end, "the service did not start its daemon");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Out of the service's tree: its parent is gone.
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap();
            let ppid: i32 =
                stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
            if !descendants(std::process::id()).contains(&ppid) || ppid == 1 {
                break;
            }
            assert!(tokio::time::Instant::now() < end, "the daemon never left its parent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive(daemon) || is_zombie(daemon), "the service's daemon {daemon} outlived it");
        node.kill_all();
        let _ = std::fs::remove_dir(node_dir_of(&node));
    }

    fn node_dir_of(g: &crate::cgroup::NodeGroup) -> std::path::PathBuf {
        g.dir().to_path_buf()
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn files_get_content_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/cookie");
        let f = ManagedFile {
            path: p.display().to_string(),
            content: "SECRET".into(),
            mode: 0o400,
            owner: String::new(),
            marker: String::new(),
        };
        write_managed(&f).await.unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "SECRET");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o400);
    }

    /// A probe body of invalid bytes becomes text 3 times longer (each
    /// byte a replacement character): what is reported stays within the
    /// bound the controller's session takes.
    #[test]
    fn probe_text_stays_within_its_bound_whatever_the_bytes() {
        let max = crate::model::MAX_PROBE_BODY;
        let text = lossy_within(&vec![0xFFu8; max], max);
        assert!(text.len() <= max && text.len() > max - 3, "{}", text.len());
        assert_eq!(lossy_within(b"ok", max), "ok");
        assert_eq!(lossy_within("ééé".as_bytes(), 3), "é");
    }
}
