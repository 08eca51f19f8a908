//! `run -- COMMAND`: one job on a cluster that exists only for it (issue
//! 16), on the local provider with a real Dask: `run` starts the
//! controller, scales, waits, runs the job with the cluster's endpoints in
//! its environment, and leaves nothing behind.

use ddisco_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Dask cluster's config, no slaves until `run` asks.
fn config(dir: &Path) -> PathBuf {
    let cfg = dir.join("ddisco.toml");
    let extra = "engine = \"dask\"\nnum_slaves = 0\nmaster_multiplier = 0.5\nslave_multiplier = 1.0\n\
                 heartbeat_timeout_secs = 5.0\ndrain_timeout_secs = 3.0";
    std::fs::write(&cfg, fast_config(extra)).unwrap();
    cfg
}

fn run(dir: &Path, args: &[&str]) -> Child {
    Command::new(bin("ddisco-controller"))
        .arg("run")
        .args(["--config", config(dir).to_str().unwrap()])
        .args(args)
        .current_dir(dir)
        .env("REPO", env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `child`; its exit code, stdout and stderr.
fn finish(mut child: Child, deadline: Duration) -> (Option<i32>, String, String) {
    let end = Instant::now() + deadline;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Nothing of the cluster is left: no node process, no controller.
fn nothing_left(dir: &Path, stderr: &str) {
    let state = dir.join(".ddisco");
    let end = Instant::now() + Duration::from_secs(15);
    while !node_processes(&state).is_empty() {
        assert!(Instant::now() < end, "node processes left: {:?}\n{stderr}", node_processes(&state));
        std::thread::sleep(Duration::from_millis(100));
    }
    let config = config(dir).display().to_string();
    let serving = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("serve") && c.contains(&config)
            })
        })
    };
    while serving() {
        assert!(Instant::now() < end, "a controller is left running\n{stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The word count runs on the cluster `run` made (Dask found through the
/// environment `run` gives, over mutual TLS), `run` exits with the job's
/// code (7), prints the summary, and leaves no node and no controller.
#[test]
fn run_exits_with_the_jobs_code_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "spot map reduce\nmap spot\nspot\n".repeat(50)).unwrap();
    let job = dir.path().join("job.sh");
    std::fs::write(
        &job,
        r#"set -e
py=$(ls .ddisco/nodes/master-*/venv/bin/python | head -1)
"$py" "$REPO/python/dask_job.py" wordcount "$DASK_SCHEDULER_ADDRESS" words.txt 4 > result.json
echo "engine=$DDISCO_ENGINE nodes=$DDISCO_NODES"
exit 7
"#,
    )
    .unwrap();
    let (code, stdout, stderr) =
        finish(run(dir.path(), &["--slaves", "2", "--", "sh", "job.sh"]), Duration::from_secs(600));
    assert_eq!(code, Some(7), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("engine=dask nodes=3"), "{stdout}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(result["counts"], serde_json::json!({"spot": 150, "map": 100, "reduce": 50}), "{result}");
    assert!(stderr.contains("3 nodes used, 0 replaced") && stderr.contains("cluster destroyed"), "{stderr}");
    assert!(stderr.contains("(exit 7)"), "{stderr}");
    nothing_left(dir.path(), &stderr);
}

/// Ctrl-C while the job runs: the job is stopped, the cluster destroyed,
/// nothing left.
#[test]
fn ctrl_c_during_the_job_destroys_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let child = run(dir.path(), &["--slaves", "1", "--", "sh", "-c", "touch started; exec sleep 600"]);
    let pid = child.id() as i32;
    let started = dir.path().join("started");
    let end = Instant::now() + Duration::from_secs(600);
    while !started.exists() {
        assert!(Instant::now() < end, "the job never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).unwrap();
    let (code, stdout, stderr) = finish(child, Duration::from_secs(120));
    assert!(code.is_some_and(|c| c != 0), "{code:?}\n{stdout}\n{stderr}");
    assert!(stderr.contains("interrupted") && stderr.contains("cluster destroyed"), "{stderr}");
    nothing_left(dir.path(), &stderr);
}

/// `autostop_idle_mins` (here 0.25: 15 s): a cluster running a job (a
/// 25 s task, its client connected) is not destroyed; once the job is over
/// and nothing happens for 15 s it is, and the controller stops.
#[test]
fn autostop_destroys_an_idle_cluster_not_one_running_a_job() {
    let mut c = Cluster::start(
        "engine = \"dask\"\nnum_slaves = 1\nmaster_multiplier = 0.5\nslave_multiplier = 1.0\n\
         heartbeat_timeout_secs = 5.0\nautostop_idle_mins = 0.25\n",
    );
    let s = c.wait_until("a ready Dask cluster", Duration::from_secs(600), |s| {
        at_size(s, 1) && s["engine_endpoints"]["scheduler"].is_string()
    });
    let scheduler = s["engine_endpoints"]["scheduler"].as_str().unwrap().to_string();
    let tls = c.dir.path().join("client");
    assert!(c.ctl(&["credentials", "--out", tls.to_str().unwrap()]).status.success());
    let master = node_ids(&s, "master")[0].clone();
    let python = c.state_dir().join("nodes").join(&master).join("venv/bin/python");
    let t0 = Instant::now();
    let out = Command::new(&python)
        .args([&format!("{}/python/dask_job.py", env!("CARGO_MANIFEST_DIR")), "sleep", &scheduler, "25"])
        .env("DDISCO_DASK_TLS", &tls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() >= Duration::from_secs(25));
    assert_eq!(c.serve_exit(), None, "destroyed while a job ran:\n{}", c.serve_log());
    // Idle now: gone within the 15 s (and the probe's second), not before
    // it was idle for them.
    let idle_from = Instant::now();
    assert!(c.wait_serve_exit(Duration::from_secs(60)), "not stopped:\n{}", c.serve_log());
    assert!(idle_from.elapsed() >= Duration::from_secs(10), "stopped too soon: {:?}", idle_from.elapsed());
    let log = c.serve_log();
    assert!(log.contains("autostop: no work for 0.25 min"), "{log}");
    assert!(node_processes(&c.state_dir()).is_empty(), "{:?}", node_processes(&c.state_dir()));
}

/// `scale 1..4` with real Dask: a burst of 40 slow tasks raises the
/// scheduler's adaptive target, the cluster grows above 1 slave while they
/// are queued, every task completes, and after the burst (the target
/// lower for the 5 s cooldown) it shrinks back to 1, draining first.
///
/// The burst is held (`held-burst`): its tasks wait, queued, until a worker
/// that was not there before joins (a new slave installs Dask first: tens
/// of seconds on a fresh machine), so the test waits on the condition that
/// matters instead of racing a node's set-up against the tasks' run time.
#[test]
fn an_adaptive_cluster_grows_with_a_burst_and_shrinks_after_it() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    let mut c = Cluster::start(
        "engine = \"dask\"\nnum_slaves = 1\nmaster_multiplier = 0.5\nslave_multiplier = 1.0\n\
         heartbeat_timeout_secs = 5.0\nadaptive_cooldown_secs = 5.0\ndrain_timeout_secs = 3.0\n",
    );
    let s = c.wait_until("a ready Dask cluster", Duration::from_secs(600), |s| {
        at_size(s, 1) && s["engine_endpoints"]["scheduler"].is_string()
    });
    assert!(c.ctl(&["scale", "1..4"]).status.success());
    let scheduler = s["engine_endpoints"]["scheduler"].as_str().unwrap().to_string();
    let tls = c.dir.path().join("client");
    assert!(c.ctl(&["credentials", "--out", tls.to_str().unwrap()]).status.success());
    let master = node_ids(&s, "master")[0].clone();
    let python = c.state_dir().join("nodes").join(&master).join("venv/bin/python");
    // The Dask workers of the nodes ready now (each node runs its own).
    let workers_now = nodes(&s).iter().map(|n| n["workers"].as_u64().unwrap()).sum::<u64>().to_string();
    let job = Command::new(&python)
        .args([
            &format!("{}/python/dask_job.py", env!("CARGO_MANIFEST_DIR")),
            "held-burst",
            &scheduler,
            "40",
            "2",
            "600",
            &workers_now,
        ])
        .env("DDISCO_DASK_TLS", &tls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let grown = c.wait_until("grown above 1 slave during the burst", Duration::from_secs(120), |s| {
        s["desired_slaves"].as_u64().unwrap_or(0) > 1
    });
    let notes = grown["controller_notes"].to_string();
    assert!(notes.contains("adaptive: 1..4 slaves"), "{notes}");
    let (code, stdout, stderr) = finish(job, Duration::from_secs(900));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["done"], 40, "a task was lost: {result}");
    assert!(result["workers_seen"].as_u64() > result["workers_before"].as_u64(), "no slave joined: {result}");
    assert!(result["on_added"].as_u64() > Some(0), "no task ran on an added slave: {result}");
    eprintln!("MEASURE held burst: {result}");
    c.wait_until("back to 1 slave after the burst", Duration::from_secs(120), |s| at_size(s, 1));
    let log = c.serve_log();
    assert!(log.contains("adaptive: 1 -> "), "{log}");
    assert!(log.contains(" -> 1 slaves: shrinking to 1"), "{log}");
    assert!(log.contains("draining"), "the leaving slaves were not drained:\n{log}");
    // The range is saved: a restarted controller keeps it.
    c.stop_serve();
    c.restart_serve();
    c.wait_until("the range after a restart", Duration::from_secs(30), |s| {
        s["controller_notes"].to_string().contains("adaptive: 1..4 slaves")
    });
}

/// Issue 22, item 5: `run --max-runtime`. A job that outlives the limit is
/// stopped and the cluster destroyed, even with --keep, and `run` exits 6.
/// A `run` that dies (kill -9) leaves the limit to the controller it
/// started: the cluster is destroyed on time and the controller stops.
#[test]
fn max_runtime_stops_the_job_and_destroys_the_cluster_even_if_run_dies() {
    let plain = |dir: &Path| {
        let cfg = dir.join("ddisco.toml");
        std::fs::write(&cfg, fast_config("num_slaves = 0")).unwrap();
        cfg
    };
    let run_plain = |dir: &Path, args: &[&str]| {
        Command::new(bin("ddisco-controller"))
            .arg("run")
            .args(["--config", plain(dir).to_str().unwrap()])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let gone = |dir: &Path, stderr: &str| {
        let state = dir.join(".ddisco");
        let end = Instant::now() + Duration::from_secs(30);
        while !node_processes(&state).is_empty() {
            assert!(Instant::now() < end, "node processes left: {:?}\n{stderr}", node_processes(&state));
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let child =
        run_plain(dir.path(), &["--slaves", "1", "--keep", "--max-runtime", "8s", "--", "sleep", "300"]);
    let (code, _, stderr) = finish(child, Duration::from_secs(90));
    assert_eq!(code, Some(6), "{stderr}");
    let took = t0.elapsed().as_secs_f64();
    assert!((8.0..60.0).contains(&took), "run ended after {took:.1} s: {stderr}");
    assert!(stderr.contains("--max-runtime passed") && stderr.contains("cluster destroyed"), "{stderr}");
    gone(dir.path(), &stderr);

    // `run` dies once the cluster exists: the controller keeps the limit
    // (whether or not the cluster got ready in the 10 s).
    let dir = tempfile::tempdir().unwrap();
    let mut child = run_plain(dir.path(), &["--slaves", "1", "--max-runtime", "10s", "--", "sleep", "299.5"]);
    let log = dir.path().join(".ddisco/serve.log");
    let end = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("launching slave-0002") {
        assert!(Instant::now() < end, "the cluster was never launched");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("MAX RUNTIME REACHED") {
        assert!(Instant::now() < end, "the controller did not enforce the limit");
        std::thread::sleep(Duration::from_millis(200));
    }
    gone(dir.path(), "");
    let reason = std::fs::read_to_string(dir.path().join(".ddisco/stop-reason")).unwrap();
    assert!(reason.starts_with("MAX RUNTIME REACHED"), "{reason}");
    // The job was a process of the `run` that died (on this machine, not
    // the cluster's): end it.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x00299.5\x00")
            && let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}
