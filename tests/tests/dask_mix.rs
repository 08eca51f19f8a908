//! A Dask job mix on a ddisco Dask cluster (1 master + 2 slaves, local
//! provider, real agents, real Dask over mutual TLS): what Dask's users run,
//! checked for the right answer and timed (`MEASURE` lines; BENCHMARKS.md).
//! Dask's own `distributed` test helpers start in-process clusters, not a
//! suite to point at one, so this is the Dask counterpart of Disco's suite
//! (`disco_suite.rs`):
//!
//! - a dataframe groupby over 320 MB of generated rows (a tree reduction
//!   and a shuffle), every aggregate checked against numpy on the client;
//! - a `client.map` of 10,000 small tasks;
//! - results held by a running task across a slave's loss: Dask makes the
//!   lost ones again, the task's checksum is right, and the controller
//!   replaces the slave.
//!
//! The client is `tests/python/dask_mix.py`, run with the master's own
//! interpreter (the cluster's Dask, pandas and numpy versions).

use ddisco_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn script() -> String {
    format!("{}/python/dask_mix.py", env!("CARGO_MANIFEST_DIR"))
}

fn mix(python: &std::path::Path, creds: &std::path::Path, args: &[&str]) -> Value {
    let out = Command::new(python).env("DDISCO_DASK_TLS", creds).arg(script()).args(args).output().unwrap();
    assert!(out.status.success(), "dask_mix.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn dask_job_mix_on_a_ddisco_cluster() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    let mut c = Cluster::start(
        r#"
engine = "dask"
dask_extras = ["dataframe"]
num_slaves = 2
master_multiplier = 0.5
slave_multiplier = 1.0
heartbeat_timeout_secs = 5.0
"#,
    );
    let s = c.wait_until("a ready Dask cluster", Duration::from_secs(900), |s| {
        at_size(s, 2) && s["engine_endpoints"]["scheduler"].is_string()
    });
    let scheduler = s["engine_endpoints"]["scheduler"].as_str().unwrap().to_string();
    let expected: u64 = nodes(&s).iter().map(|n| n["workers"].as_u64().unwrap()).sum();
    let master = node_ids(&s, "master")[0].clone();
    let python = c.state_dir().join("nodes").join(&master).join("venv/bin/python");
    let creds = c.dir.path().join("client");
    let out = c.ctl(&["credentials", "--out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The scheduler's workers by name, until `pred` holds (bounded).
    let workers_until = |what: &str, pred: &dyn Fn(&[String]) -> bool| {
        let end = Instant::now() + Duration::from_secs(180);
        loop {
            let out = Command::new(&python)
                .env("DDISCO_DASK_TLS", &creds)
                .arg(format!("{}/python/dask_job.py", env!("CARGO_MANIFEST_DIR")))
                .args(["workers", &scheduler])
                .output()
                .unwrap();
            let names: Option<Vec<String>> = serde_json::from_slice::<Value>(&out.stdout).ok().map(|v| {
                v["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
            });
            if names.as_deref().is_some_and(pred) {
                return;
            }
            assert!(Instant::now() < end, "{what}: never so on {scheduler}: {names:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Every worker connected before the jobs (ready to the controller is
    // not yet connected to the scheduler).
    workers_until("every worker connected", &|names| names.len() as u64 == expected);

    // 1. A dataframe groupby over 10,000,000 rows (320 MB) in 40 partitions.
    let g = mix(&python, &creds, &["groupby", &scheduler, "10000000", "40"]);
    assert_eq!(g["groups_key"], 100, "{g}");
    assert!(g["groups_user"].as_u64().unwrap() > 990_000, "{g}");
    eprintln!(
        "MEASURE dask groupby over {} MB ({} rows, {} workers): generate {} s, groupby(key) {} s, groupby(user) with a shuffle {} s",
        g["mb"], g["rows"], g["workers"], g["generate_s"], g["groupby_key_s"], g["groupby_user_s"]
    );

    // 2. client.map of 10,000 small tasks.
    let m = mix(&python, &creds, &["map", &scheduler, "10000"]);
    assert_eq!(m["tasks"], 10000, "{m}");
    eprintln!(
        "MEASURE dask client.map of 10,000 small tasks ({} workers): {} s, {} tasks/s",
        m["workers"], m["seconds"], m["tasks_per_s"]
    );

    // 3. 200 results of 1 MiB held by a running task on the master's
    //    worker; a slave (its whole process tree) lost; then the task
    //    gathers them all.
    let slaves_before = node_ids(&s, "slave");
    let victim = slaves_before[0].clone();
    // Dask names a node's workers after it: `<node>` alone, or `<node>-<i>`.
    let of_victim = |w: &str| w == victim || w.strip_prefix(&victim).is_some_and(|r| r.starts_with('-'));
    let victim_workers =
        nodes(&s).iter().find(|n| n["node_id"] == victim.as_str()).unwrap()["workers"].as_u64().unwrap();
    let mut held = Command::new(&python)
        .env("DDISCO_DASK_TLS", &creds)
        .arg(script())
        .args(["hold", &scheduler, "200", "1024", &master])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    let first: Value = match lines.next() {
        Some(Ok(l)) => serde_json::from_str(&l).unwrap(),
        other => {
            let _ = held.kill();
            let err = held.wait_with_output().unwrap().stderr;
            panic!("the results were never held ({other:?}): {}", String::from_utf8_lossy(&err));
        }
    };
    let on_victim: u64 = first["on"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(w, _)| of_victim(w))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    assert!(on_victim > 0, "{victim} holds none of the results: {first}");
    let pid = c.node_pid(&victim);
    let lost = Instant::now();
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    assert!(wait_gone(pid, Duration::from_secs(30)), "{victim} (pid {pid}) survived SIGKILL");
    // The loss is complete once the scheduler has dropped the victim's
    // workers (a gather that starts earlier may still dial a dying worker:
    // Dask then waits out its 30 s connect timeout, see BENCHMARKS.md).
    workers_until("the victim's workers dropped", &|names| !names.iter().any(|w| of_victim(w)));
    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let done: Value = match lines.next() {
        Some(Ok(l)) => serde_json::from_str(&l).unwrap(),
        other => {
            let err = held.wait_with_output().unwrap().stderr;
            panic!("the holding task did not finish ({other:?}): {}", String::from_utf8_lossy(&err));
        }
    };
    assert!(held.wait().unwrap().success());
    assert_eq!(done["checksum_ok"], true, "{done}");
    assert_eq!(done["results"], 200, "{done}");
    let gone: Vec<&str> =
        done["lost_workers"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(
        gone.len() as u64 == victim_workers && gone.iter().all(|w| of_victim(w)),
        "the lost workers are not {victim}'s {victim_workers}: {done}"
    );
    // Every result the lost slave held was made again elsewhere (and no other).
    assert_eq!(done["held_on_lost"], on_victim, "{done}");
    assert_eq!(done["remade"], on_victim, "{done}");
    eprintln!(
        "MEASURE dask 200 results of 1 MiB held by a task across a slave's loss: {} remade, the task's gather {} s",
        done["remade"], done["gather_s"]
    );
    let s = c.wait_until("the lost slave is replaced", Duration::from_secs(600), |s| {
        at_size(s, 2) && !node_ids(s, "slave").contains(&victim)
    });
    let replacement = node_ids(&s, "slave").into_iter().find(|id| !slaves_before.contains(id));
    eprintln!(
        "MEASURE dask slave lost -> replacement {} ready: {:.1} s",
        replacement.as_deref().unwrap_or("?"),
        lost.elapsed().as_secs_f64()
    );
    assert!(replacement.is_some(), "no new slave: {s}");
}
