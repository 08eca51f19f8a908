//! Runs the plan's steps in order, reports each, and keeps progress in
//! `progress.json` so that neither a reconnect nor an agent restart re-runs a
//! finished step. A failed step stops the plan; the node stays failed (and
//! says so) rather than silently ready.

use crate::command::{Outcome, fail, run};
use crate::model::{Plan, Report, Step, StepKind, StepReport, StepStatus};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub plan_id: String,
    pub completed: u32,
    /// The failed step's report, if the plan stopped on a failure.
    #[serde(default)]
    pub failed: Option<FailedStep>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedStep {
    pub index: u32,
    pub name: String,
    pub exit_code: i32,
    pub output_tail: String,
    pub duration_ms: u64,
}

pub struct Executor {
    dir: PathBuf,
    /// Std mutex: held for a few field updates, never across `.await`.
    state: Mutex<State>,
    /// True once the current plan finished successfully.
    done: tokio::sync::watch::Sender<bool>,
    /// What the image this node booted from holds (`bake`), if any.
    baked: Option<crate::bake::Baked>,
    /// Sealed for an image: nothing more is written to disk.
    sealed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    progress: Progress,
    /// Plan currently executing in this process.
    running: Option<String>,
}

impl Executor {
    pub fn new(dir: &Path) -> Executor {
        let progress = std::fs::read_to_string(dir.join("progress.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Executor {
            dir: dir.to_owned(),
            state: Mutex::new(State { progress, running: None }),
            done: tokio::sync::watch::channel(false).0,
            baked: crate::bake::Baked::load(dir),
            sealed: Default::default(),
        }
    }

    /// Fires (true) when the plan has finished successfully.
    pub fn done(&self) -> tokio::sync::watch::Receiver<bool> {
        self.done.subscribe()
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    pub fn progress(&self) -> Progress {
        self.state.lock().expect("lock").progress.clone()
    }

    pub fn failure(&self) -> Option<StepReport> {
        let st = self.state.lock().expect("lock");
        let f = st.progress.failed.as_ref()?;
        Some(StepReport {
            plan_id: st.progress.plan_id.clone(),
            index: f.index,
            name: f.name.clone(),
            status: StepStatus::Failed,
            duration_ms: f.duration_ms,
            exit_code: f.exit_code,
            output_tail: f.output_tail.clone(),
        })
    }

    /// Starts executing `plan` in the background, unless it is already
    /// running or finished (or failed) in this process.
    pub fn start(self: Arc<Self>, plan: Plan, workers: u32, reports: UnboundedSender<Report>) {
        let start_at = {
            let mut st = self.state.lock().expect("lock");
            if st.running.as_deref() == Some(plan.id.as_str()) {
                return;
            }
            if st.running.is_some() {
                tracing::warn!("a different plan arrived while one runs; finishing the current one first");
                return;
            }
            if st.progress.plan_id != plan.id {
                st.progress = Progress { plan_id: plan.id.clone(), completed: 0, failed: None };
                self.done.send_replace(false);
            }
            if st.progress.failed.is_some() {
                return;
            }
            st.running = Some(plan.id.clone());
            st.progress.completed
        };
        tokio::spawn(async move {
            for (i, step) in plan.steps.iter().enumerate().skip(start_at as usize) {
                let i = i as u32;
                let report = |status: StepStatus, ms: u64, code: i32, tail: String| {
                    Report::Step(StepReport {
                        plan_id: plan.id.clone(),
                        index: i,
                        name: step.name.clone(),
                        status,
                        duration_ms: ms,
                        exit_code: code,
                        output_tail: tail,
                    })
                };
                // Done already: the image this node booted from holds it.
                if let (Some(digest), Some(baked)) = (&step.image_digest, &self.baked)
                    && baked.holds(digest)
                {
                    let mut st = self.state.lock().expect("lock");
                    st.progress.completed = i + 1;
                    self.save(&st.progress);
                    tracing::info!(step = %step.name, image = %baked.image, "step skipped: baked into the image");
                    let _ = reports.send(report(
                        StepStatus::Skipped,
                        0,
                        0,
                        format!("baked into {}", baked.image),
                    ));
                    continue;
                }
                let _ = reports.send(report(StepStatus::Running, 0, 0, String::new()));
                tracing::info!(step = %step.name, "step {}/{} started", i + 1, plan.steps.len());
                let t0 = Instant::now();
                let out = match &step.kind {
                    StepKind::Collect { attribute, path } => collect(attribute, path, &reports),
                    StepKind::Seal { image, generalize } => {
                        let root = generalize.then(crate::bake::image_root);
                        let out = crate::bake::seal(&self.dir, &plan, i as usize, image, root.as_deref());
                        if out.code == 0 {
                            self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        out
                    }
                    _ => run_step(step, &self.dir, workers).await,
                };
                let ms = t0.elapsed().as_millis() as u64;
                let ok = out.code == 0;
                {
                    let mut st = self.state.lock().expect("lock");
                    if ok {
                        st.progress.completed = i + 1;
                    } else {
                        st.progress.failed = Some(FailedStep {
                            index: i,
                            name: step.name.clone(),
                            exit_code: out.code,
                            output_tail: out.tail.clone(),
                            duration_ms: ms,
                        });
                        st.running = None;
                    }
                    self.save(&st.progress);
                }
                if ok {
                    tracing::info!(step = %step.name, ms, "step succeeded");
                    let _ = reports.send(report(StepStatus::Succeeded, ms, 0, out.tail));
                } else {
                    tracing::error!(step = %step.name, code = out.code, "step failed: {}", out.tail.trim());
                    let _ = reports.send(report(StepStatus::Failed, ms, out.code, out.tail));
                    return;
                }
            }
            self.state.lock().expect("lock").running = None;
            tracing::info!("all {} steps done: node ready", plan.steps.len());
            self.done.send_replace(true);
        });
    }

    fn save(&self, p: &Progress) {
        if self.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let path = self.dir.join("progress.json");
        if let Err(e) = crate::files::write_private(&path, &serde_json::to_string(p).expect("serializes")) {
            tracing::error!("cannot save {}: {e}", path.display());
        }
    }
}

/// Reads a file and sends it to the controller as an attribute.
fn collect(attribute: &str, path: &str, reports: &UnboundedSender<Report>) -> Outcome {
    // A user-owned file (a public key in a home): never through a symlink.
    match crate::files::read_safely(Path::new(path)) {
        Ok(None) => fail(format!("cannot read {path}: it does not exist")),
        Ok(Some(value)) if value.len() <= 16 * 1024 => {
            let value = value.trim().to_string();
            let _ = reports.send(Report::Attribute { name: attribute.to_string(), value });
            Outcome { code: 0, tail: format!("sent {attribute} from {path}") }
        }
        Ok(Some(_)) => fail(format!("{path} is larger than 16 KiB")),
        Err(e) => fail(format!("cannot read {path}: {e}")),
    }
}

pub async fn run_step(step: &Step, dir: &Path, workers: u32) -> Outcome {
    let log = dir.join("steps").join(format!("{}.log", step.name));
    match &step.kind {
        StepKind::Unknown => {
            fail(format!("step {} is of a kind this agent does not know: the controller is newer", step.name))
        }
        StepKind::SystemPackages { packages, install } => system_packages(packages, *install, &log).await,
        StepKind::Pip { requirements, venv } => pip(requirements, venv, &log).await,
        StepKind::AuthorizedKeys { path, keys, owner } => authorized_keys(path, keys, owner).await,
        StepKind::Scratch(s) => crate::scratch::scratch(s, &log).await,
        StepKind::PythonEnv(env) => crate::pyenv::python_env(env, dir, &log).await,
        StepKind::Collect { attribute, .. } => fail(format!("collect {attribute} must run inside a plan")),
        StepKind::Seal { .. } => fail("seal must run inside a plan".to_string()),
        StepKind::Shell { script, env } => {
            let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
            let mut cmd = tokio::process::Command::new(shell);
            cmd.arg("-c").arg(script).current_dir(dir).envs(env).env("DDISCO_WORKERS", workers.to_string());
            run(cmd, &log).await
        }
    }
}

async fn system_packages(packages: &[String], install: bool, log: &Path) -> Outcome {
    let mut missing = Vec::new();
    for pkg in packages {
        let out = tokio::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .stderr(Stdio::null())
            .output()
            .await;
        match out {
            Ok(o) if String::from_utf8_lossy(&o.stdout).ends_with("install ok installed") => {}
            Ok(_) => missing.push(pkg.clone()),
            Err(e) => {
                return fail(format!(
                    "cannot run dpkg-query ({e}): system packages need a Debian/Ubuntu node"
                ));
            }
        }
    }
    if missing.is_empty() {
        return Outcome { code: 0, tail: format!("all {} packages installed", packages.len()) };
    }
    if !install {
        return fail(format!(
            "missing packages: {} (this node may only check packages, not install them: install them \
             on the host, remove them from base_packages/additional_packages, or set local_install_packages = true)",
            missing.join(", ")
        ));
    }
    let mut update = tokio::process::Command::new("apt-get");
    update.args(["-q", "update"]).env("DEBIAN_FRONTEND", "noninteractive");
    let out = run(update, log).await;
    if out.code != 0 {
        return out;
    }
    let mut install = tokio::process::Command::new("apt-get");
    install
        .args(["-q", "-y", "install", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install, log).await
}

async fn pip(requirements: &[String], venv: &str, log: &Path) -> Outcome {
    let venv = PathBuf::from(venv);
    let python = venv.join("bin/python");
    if !python.exists() {
        let mut mk = tokio::process::Command::new("python3");
        mk.args(["-m", "venv"]).arg(&venv);
        let out = run(mk, log).await;
        if out.code != 0 {
            return out;
        }
    }
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q"]).args(requirements);
    run(cmd, log).await
}

/// Adds keys to an authorized_keys file in a user's home, through `files`
/// (no symlink another user planted is followed; the directory and the file
/// are given to `owner` through their descriptors).
async fn authorized_keys(path: &str, keys: &[String], owner: &str) -> Outcome {
    let path = Path::new(path);
    let (Some(ssh_dir), Some(name)) = (path.parent(), path.file_name()) else {
        return fail(format!("authorized_keys path {:?} has no folder", path.display()));
    };
    let owner = if owner.is_empty() {
        None
    } else {
        match crate::files::Owner::of_user(owner) {
            Ok(o) => Some(o),
            Err(e) => return fail(e),
        }
    };
    let res = (|| -> std::io::Result<usize> {
        let dir = crate::files::prepare_dir(ssh_dir, 0o700, owner)?;
        let existing = crate::files::read_in(&dir, name)?.unwrap_or_default();
        let mut text = existing.clone();
        let mut added = 0;
        for key in keys {
            if !existing.lines().any(|l| l.trim() == key.trim()) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(key.trim());
                text.push('\n');
                added += 1;
            }
        }
        crate::files::write_in(&dir, name, text.as_bytes(), 0o600, owner)?;
        Ok(added)
    })();
    match res {
        Err(e) => fail(format!("cannot write {}: {e}", path.display())),
        Ok(added) => Outcome { code: 0, tail: format!("{added} key(s) added to {}", path.display()) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(name: &str, script: &str) -> Step {
        Step {
            name: name.into(),
            kind: StepKind::Shell { script: script.into(), env: Default::default() },
            image_digest: None,
        }
    }

    #[tokio::test]
    async fn shell_step_reports_exit_code_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let ok = run_step(&shell("a", "echo hello; echo workers=$DDISCO_WORKERS"), d.path(), 3).await;
        assert_eq!(ok.code, 0);
        assert!(ok.tail.contains("hello") && ok.tail.contains("workers=3"), "{}", ok.tail);
        let bad = run_step(&shell("b", "echo oops >&2; exit 7"), d.path(), 1).await;
        assert_eq!(bad.code, 7);
        assert!(bad.tail.contains("oops"));
        assert!(d.path().join("steps/b.log").exists());
    }

    #[tokio::test]
    async fn tail_keeps_the_end_of_long_output() {
        let d = tempfile::tempdir().unwrap();
        let out = run_step(&shell("long", "seq 1 20000; echo THE-END"), d.path(), 1).await;
        assert!(out.tail.len() <= crate::command::TAIL_BYTES);
        assert!(out.tail.ends_with("THE-END\n"));
    }

    #[tokio::test]
    async fn missing_package_is_named_and_nothing_installed() {
        let d = tempfile::tempdir().unwrap();
        let step = Step {
            name: "system_packages".into(),
            kind: StepKind::SystemPackages {
                packages: vec!["coreutils".into(), "ddisco-no-such-package".into()],
                install: false,
            },
            image_digest: None,
        };
        let out = run_step(&step, d.path(), 1).await;
        assert_eq!(out.code, 1);
        assert!(out.tail.contains("missing packages: ddisco-no-such-package"), "{}", out.tail);
        assert!(!out.tail.contains("coreutils,"));
    }

    #[tokio::test]
    async fn authorized_keys_are_added_once() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("home/.ssh/authorized_keys");
        let step = Step {
            name: "keys".into(),
            kind: StepKind::AuthorizedKeys {
                path: path.display().to_string(),
                keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-ed25519 BBBB b".into()],
                owner: String::new(),
            },
            image_digest: None,
        };
        assert_eq!(run_step(&step, d.path(), 1).await.code, 0);
        assert_eq!(run_step(&step, d.path(), 1).await.code, 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "ssh-ed25519 AAAA a\nssh-ed25519 BBBB b\n");
    }

    #[tokio::test]
    async fn progress_survives_a_restart_and_failed_plans_stay_failed() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("ran");
        let plan = Plan {
            id: "p1".into(),
            steps: vec![shell("one", &format!("echo x >> {}", marker.display())), shell("two", "exit 3")],
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Executor::new(d.path())).start(plan.clone(), 1, tx);
        let mut last = None;
        while let Some(r) = rx.recv().await {
            last = Some(r);
        }
        let Some(Report::Step(last)) = last else { panic!("not a step report") };
        assert_eq!((last.index, last.exit_code), (1, 3));
        // A new process (restart) neither re-runs step one nor retries two.
        let ex = Arc::new(Executor::new(d.path()));
        assert_eq!(ex.progress().completed, 1);
        assert!(ex.failure().is_some());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        ex.start(plan, 1, tx);
        assert!(rx.recv().await.is_none());
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "x\n");
    }

    /// A node booted from a baked image: steps the image holds are
    /// reported skipped and not run; the others run; then sealing a bake
    /// node leaves no progress behind, even after later steps.
    #[tokio::test]
    async fn steps_an_image_holds_are_skipped_and_a_sealed_node_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let baked = crate::bake::Baked {
            image: "ddisco-t".into(),
            sealed_unix_ms: 1,
            steps: vec![crate::bake::BakedStep { name: "one".into(), digest: "d1".into() }],
        };
        std::fs::write(d.path().join(crate::bake::BAKED), serde_json::to_string(&baked).unwrap()).unwrap();
        let touch = |name: &str, digest: &str| Step {
            image_digest: Some(digest.into()),
            ..shell(name, &format!("touch ran-{name}"))
        };
        let plan = Plan { id: "p".into(), steps: vec![touch("one", "d1"), touch("two", "d2")] };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ex = Arc::new(Executor::new(d.path()));
        ex.clone().start(plan, 1, tx);
        let mut seen = Vec::new();
        while let Some(Report::Step(r)) = rx.recv().await {
            seen.push((r.name, r.status, r.output_tail));
        }
        assert!(ex.is_done());
        assert_eq!(seen[0], ("one".into(), StepStatus::Skipped, "baked into ddisco-t".into()));
        assert_eq!(seen.last().unwrap().1, StepStatus::Succeeded);
        assert!(!d.path().join("ran-one").exists() && d.path().join("ran-two").exists());

        // A bake node: seal, then nothing written.
        let d = tempfile::tempdir().unwrap();
        let plan = Plan {
            id: "bake".into(),
            steps: vec![
                touch("one", "d1"),
                Step {
                    name: "seal".into(),
                    kind: StepKind::Seal { image: "ddisco-t".into(), generalize: false },
                    image_digest: None,
                },
            ],
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ex = Arc::new(Executor::new(d.path()));
        ex.clone().start(plan, 1, tx);
        while rx.recv().await.is_some() {}
        assert!(ex.is_done());
        assert!(!d.path().join("progress.json").exists() && !d.path().join("steps").exists());
        let b = crate::bake::Baked::load(d.path()).unwrap();
        assert_eq!(b.steps, [crate::bake::BakedStep { name: "one".into(), digest: "d1".into() }]);
    }
}
