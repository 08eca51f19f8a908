//! End to end on the local provider: real controller, real agents (real
//! processes downloaded by their userdata), real TLS and gRPC.

use ddisco_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::Command;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(60);

/// Waits until the cluster is at size with every node connected (after a
/// controller restart); the node ids, sorted.
fn reconnected(c: &mut Cluster, slaves: usize) -> Vec<String> {
    let s = c.wait_until("the nodes reconnect", READY, |s| {
        at_size(s, slaves) && nodes(s).iter().all(|n| n["connected"] == true)
    });
    let mut ids: Vec<String> = nodes(&s).iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

fn cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

#[test]
fn scale_replace_lost_scale_down_destroy() {
    let mut c = Cluster::start(
        r#"
num_slaves = 0
master_multiplier = 1.5
slave_multiplier = 0.5
mgmt_key = "ssh-ed25519 AAAAC3NzaTEST test@ddisco"
post_init = "echo role=$DDISCO_ROLE workers=$DDISCO_WORKERS > post_init.out"
"#,
    );
    c.wait_until("the master is ready", READY, |s| at_size(s, 0));

    // --- scale 0 -> 3 -------------------------------------------------------
    let t0 = Instant::now();
    let out = c.ctl(&["scale", "3", "--wait", "--timeout", "120"]);
    assert!(
        out.status.success(),
        "scale --wait failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.diagnostics()
    );
    eprintln!("MEASURE scale 0->3 until all ready: {:.2}s", t0.elapsed().as_secs_f64());
    let s = c.status().expect("status");
    assert!(at_size(&s, 3), "{s:#}");
    for n in nodes(&s) {
        let want = if n["role"] == "master" {
            (cores() as f64 * 1.5).floor()
        } else {
            (cores() as f64 * 0.5).floor()
        };
        let want = (want as u64).max(1);
        assert_eq!(n["cores"].as_u64().unwrap() as u32, cores(), "{n}");
        assert_eq!(n["workers"].as_u64().unwrap(), want, "workers of {n}");
        assert!(n["last_heartbeat_ms"].as_u64().unwrap() < 3_000, "{n}");
        // Every node ran its plan: keys installed, post_init last with its role.
        let dir = c.state_dir().join("nodes").join(n["node_id"].as_str().unwrap());
        let keys = std::fs::read_to_string(dir.join("home/.ssh/authorized_keys")).unwrap();
        assert_eq!(keys, "ssh-ed25519 AAAAC3NzaTEST test@ddisco\n");
        let post = std::fs::read_to_string(dir.join("post_init.out")).unwrap();
        assert_eq!(post.trim(), format!("role={} workers={want}", n["role"].as_str().unwrap()));
        // The bootstrap token is spent and no longer on disk.
        let boot = std::fs::read_to_string(dir.join("bootstrap.json")).unwrap();
        assert!(boot.contains("\"token\":\"\""), "{boot}");
    }
    let slaves = node_ids(&s, "slave");

    // --- kill -9 a slave's agent: replaced, back to size --------------------
    let victim = slaves[0].clone();
    let pid = c.node_pid(&victim);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let s = c.wait_until("the killed slave is replaced", READY, |s| {
        at_size(s, 3) && !node_ids(s, "slave").contains(&victim)
    });
    assert!(
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains(&format!("{victim} lost")))
    );

    // --- kill -STOP a slave's agent: declared lost after the timeout --------
    let frozen = node_ids(&s, "slave")[0].clone();
    let pid = c.node_pid(&frozen);
    let t_stop = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let s = c.wait_until("the frozen slave is declared lost and replaced", READY, |s| {
        at_size(s, 3) && !node_ids(s, "slave").contains(&frozen)
    });
    let lost_after = t_stop.elapsed();
    eprintln!(
        "MEASURE frozen slave replaced and cluster ready again after {:.2}s (timeout 3.0s)",
        lost_after.as_secs_f64()
    );
    assert!(
        lost_after >= Duration::from_millis(2_500),
        "declared lost before the heartbeat timeout: {lost_after:?}"
    );
    assert!(
        s["events"].as_array().unwrap().iter().any(|e| {
            let e = e.as_str().unwrap();
            e.contains(&frozen) && e.contains("no heartbeat")
        }),
        "{s:#}"
    );
    assert!(wait_gone(pid, Duration::from_secs(5)), "the frozen agent {pid} was not killed");

    // --- scale 3 -> 1: exactly one slave left, the others' processes gone ---
    let before = node_ids(&s, "slave");
    let pids: Vec<(String, i32)> = before.iter().map(|id| (id.clone(), c.node_pid(id))).collect();
    let out = c.ctl(&["scale", "1", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = c.status().unwrap();
    assert!(at_size(&s, 1), "{s:#}");
    let kept = node_ids(&s, "slave");
    for (id, pid) in &pids {
        if kept.contains(id) {
            assert!(alive(*pid), "kept slave {id} is not running");
        } else {
            assert!(wait_gone(*pid, Duration::from_secs(5)), "removed slave {id} (pid {pid}) still runs");
        }
    }

    // --- destroy: no node process remains; serve stops ----------------------
    assert!(!node_processes(&c.state_dir()).is_empty());
    let out = c.ctl(&["destroy", "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 nodes terminated"), "{text}");
    assert!(
        node_processes(&c.state_dir()).is_empty(),
        "node processes remain: {:?}",
        node_processes(&c.state_dir())
    );
    assert!(c.wait_serve_exit(Duration::from_secs(10)), "serve did not stop after destroy");
}

#[test]
fn controller_restart_readopts_nodes_without_duplicates() {
    // A production-like timeout: agents reconnect with backoff.
    let mut c = Cluster::start("num_slaves = 2\nheartbeat_timeout_secs = 5.0");
    let s = c.wait_until("2 slaves ready", READY, |s| at_size(s, 2));
    let ids: Vec<String> = nodes(&s).iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
    let pids: Vec<i32> = ids.iter().map(|id| c.node_pid(id)).collect();

    // Stop the controller (SIGTERM): nodes keep running, like instances.
    let s = c.wait_until("all connected", READY, |s| nodes(s).iter().all(|n| n["connected"] == true));
    assert!(at_size(&s, 2));
    c.stop_serve();
    for p in &pids {
        assert!(alive(*p));
    }
    c.restart_serve();
    // Same nodes, reconnected with their certificates; nothing launched.
    let again = reconnected(&mut c, 2);
    let mut ids = ids;
    ids.sort();
    assert_eq!(again, ids, "{}", c.serve_log());
    for (id, p) in ids.iter().zip(&pids) {
        let _ = id;
        assert!(alive(*p));
    }
}

/// Issue 22, item 4: a failed node stops billing. Every node fails its
/// package step: each is terminated (no process of it left) and replaced,
/// what it reported stays in status and `logs` after it is gone, and once
/// the step failed on 3 nodes (the failure budget) nothing more is
/// launched: the cluster stays short and status says why.
#[test]
fn failed_nodes_are_terminated_replaced_and_then_held_by_the_failure_budget() {
    let mut c = Cluster::start(
        r#"
num_slaves = 1
additional_packages = ["ddisco-no-such-package"]
"#,
    );
    let s = c.wait_until("the failure budget holds launches and every failed node is gone", READY, |s| {
        s["controller_notes"].to_string().contains("FAILURE BUDGET") && nodes(s).is_empty()
    });
    let gone = s["failed_nodes"].as_array().expect("failed_nodes").clone();
    // Master and slave fail together: the budget of 3 is passed by the
    // second pair.
    assert_eq!(gone.len(), 4, "{s:#}");
    for n in &gone {
        assert_eq!(n["current_step"], "system_packages");
        let detail = n["detail"].as_str().unwrap();
        assert!(detail.contains("missing packages: ddisco-no-such-package"), "{detail}");
    }
    let notes = s["controller_notes"].to_string();
    assert!(notes.contains("step system_packages failed on 4 nodes"), "{notes}");
    // Every failed node's processes end.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !node_processes(&c.state_dir()).is_empty() {
        assert!(std::time::Instant::now() < end, "processes of failed nodes left");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = String::from_utf8(c.ctl(&["status"]).stdout).unwrap();
    assert!(table.contains("failed and terminated") && table.contains("FAILURE BUDGET"), "{table}");
    // Several reconcile passes later (0.3 s apart), still nothing launched.
    std::thread::sleep(Duration::from_secs(2));
    let later = c.status().unwrap();
    assert!(nodes(&later).is_empty() && later["failed_nodes"].as_array().unwrap().len() == 4, "{later:#}");

    // A terminated node's diagnostics: phases and the step's output.
    let id = gone.iter().find(|n| n["role"] == "slave").unwrap()["node_id"].as_str().unwrap().to_string();
    let out = c.ctl(&["status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for phase in [
        "requested",
        "running",
        "agent downloaded and started",
        "enrolled",
        "step system_packages",
        "failed at system_packages",
    ] {
        assert!(text.contains(&format!("s  {phase}")), "phase {phase:?} missing:\n{text}");
    }
    let out = c.ctl(&["logs", &id, "system_packages"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("missing packages: ddisco-no-such-package"), "{text}");
    let out = c.ctl(&["logs", &id, "no_such_step"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("system_packages"), "known steps are named");
    let out = c.ctl(&["status", "slave-9999"]);
    assert_eq!(out.status.code(), Some(2));
    // Nothing on the host was installed: the package is still missing.
    let q = Command::new("dpkg-query").args(["-W", "ddisco-no-such-package"]).output().unwrap();
    assert!(!q.status.success());
}

#[test]
fn pip_requirements_go_into_a_per_node_virtualenv() {
    let mut c = Cluster::start("num_slaves = 0\npip_requirements = [\"iso8601\"]");
    let s = c.wait_until("master ready after pip", Duration::from_secs(180), |s| at_size(s, 0));
    let venv = c.state_dir().join("nodes").join(node_ids(&s, "master")[0].as_str()).join("venv");
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import iso8601; print(iso8601.__name__)"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn metrics_are_served_and_token_protected() {
    let mut c = Cluster::start("num_slaves = 1\ndashboard_token = \"t0ken-for-the-test-0123456789\"");
    c.wait_until("1 slave ready", READY, |s| at_size(s, 1));
    let (code, _) = c.dashboard_get("/metrics", None);
    assert_eq!(code, 401, "metrics without the token");
    let (code, _) = c.dashboard_get("/metrics", Some("wrong"));
    assert_eq!(code, 401);
    // Wait for a heartbeat to be counted (0.5 s interval).
    let end = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (code, body) = c.dashboard_get("/metrics", Some("t0ken-for-the-test-0123456789"));
        assert_eq!(code, 200);
        if !body.contains("ddisco_heartbeats_total 0\n") {
            break body;
        }
        assert!(Instant::now() < end, "no heartbeat counted: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for line in [
        "ddisco_nodes{role=\"master\",state=\"ready\"} 1",
        "ddisco_nodes{role=\"slave\",state=\"ready\"} 1",
        "ddisco_desired_slaves 1",
        "ddisco_enrollments_total 2",
        "ddisco_launches_total 2",
        "# TYPE ddisco_reconcile_duration_seconds summary",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in:\n{body}");
    }
    assert!(!body.contains("t0ken"), "the token leaked into metrics");
}

#[test]
fn status_watch_redraws_until_interrupted() {
    use std::io::Read;
    let mut c = Cluster::start("num_slaves = 0");
    c.wait_until("master ready", READY, |s| at_size(s, 0));
    let mut child = Command::new(bin("ddisco-controller"))
        .args(["status", "--watch", "--config"])
        .arg(&c.config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Read until the table has been drawn twice (deadline: 20 s).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.matches("cluster ddisco").count() >= 2 {
                let _ = tx.send(text.clone());
                break;
            }
        }
    });
    let text = rx.recv_timeout(Duration::from_secs(20)).expect("status --watch did not redraw");
    assert!(text.contains("\x1b[2J"), "no screen clear");
    // Ctrl-C ends it with success.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < end, "status --watch ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 22, item 2: the dead man's switch, on the local provider. With
/// `orphan_timeout_secs = 20` (the least allowed: agents reconnect with up
/// to 10 s of backoff): a controller killed (-9) and back within the
/// window keeps every node (same processes, nothing launched), even once
/// the window has passed since the crash; a controller killed for good
/// leaves nodes that end themselves, every process of theirs with them (a
/// process the node's `post_init` left in the background too), once the
/// window has passed and not before.
#[test]
fn nodes_outlive_a_dead_controller_only_for_the_orphan_window() {
    let mut c = Cluster::start(
        "num_slaves = 2\norphan_timeout_secs = 20\npost_init = \"nohup sleep 600 >/dev/null 2>&1 &\"",
    );
    let s = c.wait_until("2 slaves ready and connected", READY, |s| {
        at_size(s, 2) && nodes(s).iter().all(|n| n["connected"] == true)
    });
    let notes = s["controller_notes"].to_string();
    assert!(notes.contains("20 s without a session") && notes.contains("orphan_timeout_secs"), "{notes}");
    let mut ids: Vec<String> = nodes(&s).iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    let pids: Vec<i32> = ids.iter().map(|id| c.node_pid(id)).collect();
    let before = node_processes(&c.state_dir());
    assert!(before.len() >= 6, "each node's agent and its background sleep: {before:?}");

    // Down for 3 s of the 20: back in time.
    c.crash_serve();
    let crashed = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    c.restart_serve();
    let again = reconnected(&mut c, 2);
    assert_eq!(again, ids, "{}", c.serve_log());
    // Past the window as counted from the crash: the sessions since reset it.
    std::thread::sleep(Duration::from_secs(22).saturating_sub(crashed.elapsed()));
    for p in &pids {
        assert!(alive(*p), "a node ended although its controller came back in time");
    }

    // Killed for good.
    c.crash_serve();
    let crashed = Instant::now();
    std::thread::sleep(Duration::from_secs(15));
    for p in &pids {
        assert!(alive(*p), "a node ended before its window passed");
    }
    let end = crashed + Duration::from_secs(60);
    loop {
        let left = node_processes(&c.state_dir());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "node processes left 60 s after the controller died: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = crashed.elapsed().as_secs_f64();
    assert!(took >= 19.0, "nodes ended {took:.1} s after the crash, before the 20 s window");
    eprintln!("every node process ended {took:.1} s after the controller was killed (window 20 s)");
}
