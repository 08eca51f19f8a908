//! Engines on a real local cluster: a real Dask cluster runs a real word
//! count; the Disco engine drives a stand-in Disco master through scale up,
//! replacement and scale down, and a real Disco cluster (on machine nodes)
//! runs Disco's own word count through a lost slave and a scale down.

use ddisco_tests::disco::{DiscoStandIn, http};
use ddisco_tests::real_disco::{
    disco_on, master_log, real_disco_cluster, real_disco_cluster_of, require_root,
};
use ddisco_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

fn killpg(pid: i32) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

fn script() -> String {
    format!("{}/python/dask_job.py", env!("CARGO_MANIFEST_DIR"))
}

/// The client credential (`ddisco-controller credentials`) the jobs use.
static TLS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Runs the Dask client with the master's own interpreter (same versions),
/// with the client credential once `TLS` is set.
fn dask_job(python: &std::path::Path, args: &[&str]) -> Result<Value, String> {
    dask_job_with(python, args, &[])
}

fn dask_job_with(python: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Result<Value, String> {
    let mut cmd = Command::new(python);
    if let Some(dir) = TLS.get() {
        cmd.env("DDISCO_DASK_TLS", dir);
    }
    let out = cmd.arg(script()).args(args).envs(env.iter().copied()).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn wait_workers(python: &std::path::Path, scheduler: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(180);
    let mut last;
    loop {
        match dask_job(python, &["workers", scheduler]) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => last = v.to_string(),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < end,
            "scheduler {scheduler} never reported the workers wanted; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn dask_cluster_runs_a_word_count_and_heals() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    let t0 = Instant::now();
    let mut c = Cluster::start(
        r#"
engine = "dask"
num_slaves = 2
master_multiplier = 0.5
slave_multiplier = 1.0
heartbeat_timeout_secs = 5.0
drain_timeout_secs = 3.0
"#,
    );
    let s = c.wait_until("a ready Dask cluster", Duration::from_secs(600), |s| {
        at_size(s, 2) && s["engine_endpoints"]["scheduler"].is_string()
    });
    let scheduler = s["engine_endpoints"]["scheduler"].as_str().unwrap().to_string();
    assert!(scheduler.starts_with("tls://"), "{scheduler}");
    assert!(s["engine_endpoints"]["dashboard"].as_str().unwrap().ends_with(":8787/status"));
    let expected: u64 = nodes(&s).iter().map(|n| n["workers"].as_u64().unwrap()).sum();
    let master = node_ids(&s, "master")[0].clone();
    let python = c.state_dir().join("nodes").join(&master).join("venv/bin/python");
    // The controller compiled the packages for the nodes' Python once: no
    // node compiles them, and the bytecode is valid for the unpacked
    // sources (same size and mtime), so imports use it: it was not written
    // again after the unpacking (the venv's marker is written last).
    for n in nodes(&s) {
        let steps = n["steps"].as_array().unwrap();
        let env = steps.iter().find(|st| st["name"] == "python_env").unwrap();
        assert!(env["output_tail"].as_str().unwrap().contains("with its bytecode"), "{n:#}");
    }
    let fresh = Command::new(&python)
        .args(["-c", "import importlib.util as u, os, struct, sys, dask.base as b; \
                 h = open(u.cache_from_source(b.__file__), 'rb').read(16); st = os.stat(b.__file__); \
                 m = os.stat(os.path.join(sys.prefix, '.ddisco-env')).st_mtime; \
                 print(struct.unpack('<II', h[8:16]) == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF), \
                       os.stat(u.cache_from_source(b.__file__)).st_mtime < m)"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fresh.stdout).trim(),
        "True True",
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );

    // Issue 13, part 5: Dask speaks mutual TLS only: a client needs the
    // certificate `credentials` writes.
    let creds = c.dir.path().join("client");
    let out = c.ctl(&["credentials", "--out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("Security(tls_ca_file=") && printed.contains(&scheduler), "{printed}");
    let key_mode = std::fs::metadata(creds.join("client.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    TLS.set(creds).unwrap();
    wait_workers(&python, &scheduler, |v| v["workers"].as_u64() == Some(expected));
    // Without one the running scheduler refuses: a TLS client with no
    // certificate, one with a certificate of another CA, and plain TCP.
    let foreign = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "dask client user");
        let (cert, key_pem) = (c.dir.path().join("foreign.pem"), c.dir.path().join("foreign.key"));
        std::fs::write(&cert, p.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        (cert.display().to_string(), key_pem.display().to_string())
    };
    let tls = TLS.get().unwrap();
    let (mine_cert, mine_key) =
        (tls.join("client.pem").display().to_string(), tls.join("client.key").display().to_string());
    let probe =
        |args: &[&str]| dask_job(&python, &[&["tls-probe", scheduler.as_str()], args].concat()).unwrap();
    for (what, args) in
        [("no client certificate", vec![]), ("another CA's certificate", vec![&foreign.0, &foreign.1])]
    {
        let v = probe(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(v["refused"], true, "{what}: the scheduler accepted it: {v}");
        eprintln!("{what}: refused: {}", v["why"]);
    }
    // The same probe with the credential is kept (the probe can tell).
    let v = probe(&[&mine_cert, &mine_key]);
    assert_eq!(v["refused"], false, "with the credential: {v}");
    let plain = scheduler.replace("tls://", "tcp://");
    let e = dask_job_with(
        &python,
        &["workers", &plain],
        &[("DDISCO_DASK_TIMEOUT", "5s"), ("DDISCO_DASK_TLS", "")],
    )
    .expect_err("plain TCP reached the scheduler");
    eprintln!("plain TCP: refused: {}", e.lines().last().unwrap_or(""));

    // A real map/reduce: word count over generated text.
    let vocab = ["map", "reduce", "spot", "disco", "dask", "cluster", "node", "slave", "master", "worker"];
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut text = String::new();
    for i in 0..3000usize {
        let words: Vec<&str> = (0..(i % 9 + 1)).map(|j| vocab[(i * 7 + j * 3) % vocab.len()]).collect();
        for w in &words {
            *want.entry(w.to_string()).or_default() += 1;
        }
        text.push_str(&words.join(" "));
        text.push('\n');
    }
    let file = c.dir.path().join("words.txt");
    std::fs::write(&file, text).unwrap();
    let result =
        dask_job(&python, &["wordcount", &scheduler, file.to_str().unwrap(), "12"]).expect("word count");
    let got: BTreeMap<String, u64> =
        result["counts"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(got, want);
    assert_eq!(result["workers"].as_u64(), Some(expected));
    eprintln!(
        "MEASURE serve -> word count result on a local Dask cluster (1 master + 2 slaves): {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // Issue 22, item 7: half the slaves (1 of 2, its whole process tree)
    // lost at once while the controller is down (killed -9, started again),
    // with a job running: the job completes (Dask reschedules the lost
    // worker's tasks), the lost slave is replaced once, and its worker
    // joins.
    let before = node_ids(&s, "slave");
    let victim = before[0].clone();
    let counts = s["engine_endpoints"]["dashboard"].as_str().unwrap().replace("/status", "/json/counts.json");
    let mut job = Command::new(&python)
        .env("DDISCO_DASK_TLS", TLS.get().unwrap())
        .arg(script())
        .args(["burst", &scheduler, "40", "1.0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = ddisco_tests::disco::http("GET", &counts, "");
        let busy = serde_json::from_str::<Value>(&body).is_ok_and(|v| v["processing"].as_u64() > Some(0));
        if busy {
            break;
        }
        assert!(Instant::now() < end, "the job never started: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim_pid = c.node_pid(&victim);
    c.crash_serve();
    killpg(victim_pid);
    c.restart_serve();
    let end = Instant::now() + Duration::from_secs(300);
    while job.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = job.kill();
            panic!("the job did not finish within 300 s of the loss");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = job.wait_with_output().unwrap();
    assert!(out.status.success(), "the job failed: {}", String::from_utf8_lossy(&out.stderr));
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["done"], 40, "{done}");
    let s = c.wait_until("the slave is replaced", Duration::from_secs(600), |s| {
        at_size(s, 2) && !node_ids(s, "slave").contains(&victim)
    });
    let new: Vec<String> = node_ids(&s, "slave").into_iter().filter(|id| !before.contains(id)).collect();
    assert_eq!(new.len(), 1, "one launch for one lost slave: {new:?}");
    let v = wait_workers(&python, &scheduler, |v| {
        v["workers"].as_u64() == Some(expected)
            && !v["names"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with(&victim))
    });
    let replacement = node_ids(&s, "slave").into_iter().find(|id| !before.contains(id)).unwrap();
    assert!(
        v["names"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with(&replacement)),
        "the replacement {replacement} has no worker: {v}"
    );
    let lines = String::from_utf8(c.ctl(&["status"]).stdout).unwrap();
    assert!(lines.contains("Dask scheduler: tls://"), "{lines}");
}

/// Issue 25, item 3: machine nodes reach the cluster's bridge and nothing
/// else (no route out: a private subnet without a NAT). A Dask cluster
/// still starts, its packages served by the controller (no package index
/// on the nodes' path), and runs a word count. (The real Disco tests below
/// run on the same machine nodes.)
#[test]
fn dask_on_machine_nodes_with_no_route_out() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    require_root();
    let mut c = Cluster::start(
        "engine = \"dask\"\nlocal_machines = true\nnum_slaves = 2\nmaster_multiplier = 0.5\n\
         slave_multiplier = 1.0\nheartbeat_timeout_secs = 5.0\n",
    );
    let s = c.wait_until("a ready Dask cluster of machine nodes", Duration::from_secs(600), |s| {
        at_size(s, 2) && s["engine_endpoints"]["scheduler"].is_string()
    });
    let scheduler = s["engine_endpoints"]["scheduler"].as_str().unwrap().to_string();
    let master = node_ids(&s, "master")[0].clone();
    let pid = c.node_pid(&master).to_string();
    // Nothing beyond the bridge: no route to the internet.
    let out = Command::new("nsenter")
        .args(["-t", &pid, "--net", "--", "ip", "route", "get", "1.1.1.1"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "a node has a route out: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every node's packages came from the controller.
    for id in node_ids(&s, "master").into_iter().chain(node_ids(&s, "slave")) {
        let out = c.ctl(&["logs", &id, "python_env"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("from the controller"), "{id}: {text}");
    }
    // The word count, run on the master (its namespaces: the cluster's
    // network) with the node's Python and a client certificate.
    let node_tmp = c.state_dir().join("nodes").join(&master).join("fs/tmp");
    let out = c.ctl(&["credentials", "--out", node_tmp.join("client").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vocab = ["spot", "node", "bridge", "wheel", "venv"];
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut text = String::new();
    for i in 0..2000usize {
        let words: Vec<&str> = (0..(i % 5 + 1)).map(|j| vocab[(i * 3 + j) % vocab.len()]).collect();
        for w in &words {
            *want.entry(w.to_string()).or_default() += 1;
        }
        text.push_str(&words.join(" "));
        text.push('\n');
    }
    std::fs::write(node_tmp.join("words.txt"), text).unwrap();
    let code = std::fs::read_to_string(script()).unwrap();
    // (Its PID namespace too, the node's /proc being that namespace's: the
    // node's init, the child of its `unshare`, is in it.)
    let init = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the node's init")
        .to_string();
    let out = Command::new("nsenter")
        .args(["-t", &init, "--net", "--uts", "--mount", "--pid", "--"])
        .args(["env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", "DDISCO_DASK_TLS=/tmp/client"])
        .args(["timeout", "300", "/opt/ddisco/venv/bin/python", "-c", &code])
        .args(["wordcount", &scheduler, "/tmp/words.txt", "6"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the word count failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.diagnostics()
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: BTreeMap<String, u64> =
        result["counts"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(got, want);

    // Issue 26, item 3: a job (running as `dask`) on a slave points the
    // Dask home's `tls` at a root-owned folder; the plan is changed, so the
    // node runs its steps again, as root. Root never follows the link: the
    // folder keeps its owner and mode (the step, run as `dask`, fails
    // instead, and the node with it).
    let slave = node_ids(&s, "slave")[0].clone();
    let spid = c.node_pid(&slave).to_string();
    let sinit = std::fs::read_to_string(format!("/proc/{spid}/task/{spid}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the slave's init")
        .to_string();
    let victim = c.state_dir().join("nodes").join(&slave).join("fs/tmp/victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let in_slave = |argv: &[&str]| {
        let out = Command::new("nsenter")
            .args(["-t", &sinit, "--net", "--uts", "--mount", "--pid", "--"])
            .args(argv)
            .output()
            .unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    in_slave(&[
        "runuser",
        "-u",
        "dask",
        "--",
        "sh",
        "-c",
        "mv /var/lib/dask/tls /var/lib/dask/tls.job && ln -s /tmp/victim /var/lib/dask/tls",
    ]);
    c.stop_serve();
    let config = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        format!(
            "{config}
post_init = \"true\"\n"
        ),
    )
    .unwrap();
    c.restart_serve();
    c.wait_until("the slave ran dask_user again", Duration::from_secs(120), |s| {
        nodes(s).iter().chain(s["failed_nodes"].as_array().into_iter().flatten()).any(|n| {
            n["node_id"] == slave.as_str()
                && n["steps"].as_array().is_some_and(|st| {
                    st.iter().any(|x| x["name"] == "post_init") || st.iter().any(|x| x["status"] == "failed")
                })
        })
    });
    let steps_now = c.status().map(|s| {
        nodes(&s)
            .iter()
            .chain(s["failed_nodes"].as_array().into_iter().flatten())
            .filter(|n| n["node_id"] == slave.as_str())
            .map(|n| format!("{} {}", n["state"], n["steps"]))
            .collect::<Vec<_>>()
    });
    eprintln!("{slave} after the plan change: {steps_now:?}");
    let md = std::fs::metadata(&victim).unwrap();
    let (uid, mode) = (std::os::unix::fs::MetadataExt::uid(&md), md.permissions().mode() & 0o777);
    // Put the host's Dask home back as it was (machine nodes share /var/lib).
    in_slave(&["sh", "-c", "rm /var/lib/dask/tls && mv /var/lib/dask/tls.job /var/lib/dask/tls"]);
    assert_eq!((uid, mode), (0, 0o755), "root followed the job's symlink");
}

#[test]
fn disco_engine_keeps_the_master_config_table_in_step() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let standin = DiscoStandIn::start(&rt);
    // Stand-in for Disco's Erlang VM (`disco nodaemon`), which cannot be
    // installed here: the agent supervises it like the real one.
    let fakebin = tempfile::tempdir().unwrap();
    let disco = fakebin.path().join("disco");
    std::fs::write(&disco, "#!/bin/sh\nexec sleep 100000\n").unwrap();
    std::fs::set_permissions(&disco, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fakebin.path().display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Cluster::start_with_env(
        &format!(
            r#"
engine = "disco"
disco_source = ""
disco_port = {}
num_slaves = 2
master_multiplier = 2.0
slave_multiplier = 1.0
drain_timeout_secs = 1.5
heartbeat_timeout_secs = 5.0
"#,
            standin.port
        ),
        vec![("PATH".into(), path)],
    );
    let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let table_of = |s: &Value| -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = nodes(s)
            .iter()
            .map(|n| (n["node_id"].as_str().unwrap().to_string(), n["workers"].as_u64().unwrap().to_string()))
            .collect();
        rows.sort_by_key(|(h, _)| (!h.starts_with("master"), h.clone()));
        rows
    };
    let wait_table = |c: &mut Cluster, what: &str, slaves: usize| -> Value {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let s = c.wait_until(what, Duration::from_secs(120), |s| at_size(s, slaves));
            if standin.table() == table_of(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "{what}: table {:?} != {:?}\ncalls: {:#?}",
                standin.table(),
                table_of(&s),
                standin.calls()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let s = wait_table(&mut c, "master + 2 slaves in the table", 2);
    assert_eq!(standin.table()[0].1, (cores * 2).to_string(), "master first, MASTER_MULTIPLIER");
    // One cookie per cluster, mode 0400, on every node; never in userdata.
    let cookie = std::fs::read_to_string(c.state_dir().join("erlang.cookie")).unwrap();
    assert!(cookie.len() >= 32);
    let node_dir = |id: &str| c.state_dir().join("nodes").join(id);
    let master = node_ids(&s, "master")[0].clone();
    let master_key =
        std::fs::read_to_string(node_dir(&master).join("home/disco/.ssh/id_ed25519.pub")).unwrap();
    for n in nodes(&s) {
        let id = n["node_id"].as_str().unwrap();
        let f = node_dir(id).join("home/disco/.erlang.cookie");
        let end = Instant::now() + Duration::from_secs(30);
        while !f.exists() {
            assert!(Instant::now() < end, "no cookie on {id}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(std::fs::read_to_string(&f).unwrap(), cookie);
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o400);
        assert!(!std::fs::read_to_string(node_dir(id).join("userdata.sh")).unwrap().contains(&cookie));
        let hosts = std::fs::read_to_string(node_dir(id).join("etc/hosts")).unwrap();
        assert!(hosts.contains("# BEGIN ddisco") && hosts.contains(&master), "{hosts}");
        let settings = std::fs::read_to_string(node_dir(id).join("etc/disco/settings.py")).unwrap();
        assert!(
            // The local provider's nodes keep Disco's data under their own root.
            settings.contains(&format!("DISCO_ROOT = \"{}\"", node_dir(id).join("mnt/disco").display()))
                && settings.contains("DDFS_BLOB_REPLICAS = \"3\""),
            "{settings}"
        );
        if n["role"] == "slave" {
            // SSH trust: the master's disco key in every slave's authorized_keys.
            let ak = std::fs::read_to_string(node_dir(id).join("home/disco/.ssh/authorized_keys")).unwrap();
            assert!(ak.contains(master_key.trim()), "{ak}");
        }
    }
    let table = String::from_utf8(c.ctl(&["status"]).stdout).unwrap();
    // The tunnel goes through the login user (the one mgmt_key reaches).
    assert!(table.contains("ssh ubuntu@") && table.contains("DISCO_PROXY=http://localhost:8090"), "{table}");

    // A user of a slave replaces its managed /etc/hosts by a symlink to a
    // secret (the agent, as root, used to read and write through it): at
    // the next membership change the agent refuses and says so, and the
    // secret is untouched.
    let attacked = node_ids(&s, "slave")[0].clone();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("shadow");
    std::fs::write(&secret, "SECRET\n").unwrap();
    let hosts = node_dir(&attacked).join("etc/hosts");
    std::fs::remove_file(&hosts).unwrap();
    std::os::unix::fs::symlink(&secret, &hosts).unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(node_dir(&attacked).join("etc"), Some(65534), Some(65534)).unwrap();
    }

    // Scale up.
    assert!(c.ctl(&["scale", "3"]).status.success());
    wait_table(&mut c, "3 slaves in the table", 3);
    let s = c.wait_until("the attacked slave to report the refusal", Duration::from_secs(60), |s| {
        nodes(s).iter().any(|n| {
            n["node_id"] == attacked.as_str()
                && n["detail"].as_str().unwrap_or("").contains("refusing to read")
        })
    });
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET\n", "{s:#}");
    assert!(std::fs::symlink_metadata(&hosts).unwrap().file_type().is_symlink());

    // Replacement: a dead slave leaves the table, its replacement joins.
    let victim = node_ids(&s, "slave")[0].clone();
    killpg(c.node_pid(&victim));
    let s = {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let s = wait_table(&mut c, "the replacement in the table", 3);
            if !node_ids(&s, "slave").contains(&victim) {
                break s;
            }
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(!standin.table().iter().any(|(h, _)| *h == victim));

    // Scale down: leaving slaves are blacklisted before the table drops them.
    let before = standin.calls().len();
    let out = c.ctl(&["scale", "1", "--wait", "--timeout", "120"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s2 = wait_table(&mut c, "1 slave in the table", 1);
    let kept = node_ids(&s2, "slave");
    let removed: Vec<String> = node_ids(&s, "slave").into_iter().filter(|id| !kept.contains(id)).collect();
    assert_eq!(removed.len(), 2);
    let calls = standin.calls()[before..].to_vec();
    for h in &removed {
        let bl = calls.iter().position(|c| c.op == "blacklist" && c.body == format!("\"{h}\""));
        let dropped = calls.iter().position(|c| c.op == "save_config_table" && !c.body.contains(h.as_str()));
        let (bl, dropped) =
            (bl.unwrap_or_else(|| panic!("{h} never blacklisted: {calls:#?}")), dropped.unwrap());
        assert!(bl < dropped, "{h} dropped before being blacklisted: {calls:#?}");
    }
    // Every call honoured Disco's contract.
    let refused: Vec<_> = standin.calls().into_iter().filter(|c| c.status != 200).collect();
    assert!(refused.is_empty(), "the stand-in refused: {refused:#?}");
}

/// Issue 15: the real Disco master (Disco 0.5.4 built once by
/// scripts/build-disco from shared/vendor/disco with the project's patches,
/// Erlang/OTP 25, Python 3; served by the controller as `disco_bundle` and
/// installed by every node, checked by digest) started by the engine on
/// the local provider's master: it loads the settings the engine writes
/// (with Disco's own settings loader), takes the config table the
/// controller computes,
/// blacklists a slave leaving on `scale 1` while it drains, and its Erlang
/// VM is gone when the cluster is destroyed (the service is stopped as a
/// process group). Its slaves are plain local nodes (no sshd): the next
/// test runs the whole cluster on machine nodes.
#[test]
fn real_disco_master_takes_the_table_and_blacklists_a_leaving_slave() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut c, s, bundle_sha) = real_disco_cluster(&format!("disco_port = {port}\ndrain_timeout_secs = 20"));
    // Every node installed the one build, checked by its digest, in a step
    // of its own.
    for n in nodes(&s) {
        let id = n["node_id"].as_str().unwrap();
        let installed = c.state_dir().join("nodes").join(id).join("opt/disco/.ddisco-bundle");
        assert_eq!(std::fs::read_to_string(&installed).unwrap().trim(), bundle_sha, "{id}");
        let step = n["steps"].as_array().unwrap().iter().find(|st| st["name"] == "disco_bundle").cloned();
        let step = step.unwrap_or_else(|| panic!("no disco_bundle step: {n:#}"));
        eprintln!("MEASURE {id}: Disco build installed in {} ms", step["duration_ms"]);
    }
    let ctrl = |op: &str| format!("http://127.0.0.1:{port}/disco/ctrl/{op}");
    let table_of = |s: &Value| -> Value {
        let mut rows: Vec<(String, String)> = nodes(s)
            .iter()
            .filter(|n| n["state"] == "ready")
            .map(|n| (n["node_id"].as_str().unwrap().to_string(), n["workers"].as_u64().unwrap().to_string()))
            .collect();
        rows.sort_by_key(|(h, _)| (!h.starts_with("master"), h.clone()));
        serde_json::to_value(rows.iter().map(|(h, w)| [h, w]).collect::<Vec<_>>()).unwrap()
    };
    let master_dir = c.state_dir().join("nodes").join(&node_ids(&s, "master")[0]);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < end, "{what}; the master's log:\n{}", master_log(&master_dir));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let load = || serde_json::from_str::<Value>(&http("GET", &ctrl("load_config_table"), "").1).ok();
    let want = table_of(&s);
    wait("the real master has the cluster's table", &|| load().as_ref() == Some(&want));

    // The settings the engine wrote, read by Disco's own loader.
    let node_root = master_dir.clone();
    let home = node_root.join("opt/disco");
    let out = Command::new("python3")
        .args(["-c", "from disco.settings import DiscoSettings as S; s = S(); print(s['DISCO_HOME']); print(s['DISCO_ROOT'])"])
        .env("PYTHONPATH", home.join("lib"))
        .env("DISCO_SETTINGS_FILE", node_root.join("etc/disco/settings.py"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = printed.lines();
    assert_eq!(lines.next(), Some(home.to_str().unwrap()));
    assert_eq!(lines.next(), Some(node_root.join("mnt/disco").to_str().unwrap()));

    // scale 1: the slave that leaves is blacklisted at the master while it
    // drains, then leaves the table.
    assert!(c.ctl(&["scale", "1"]).status.success());
    let s2 = c.wait_until("a slave draining", Duration::from_secs(30), |s| {
        nodes(s).iter().any(|n| n["state"] == "draining")
    });
    let leaving = nodes(&s2).iter().find(|n| n["state"] == "draining").unwrap()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait("the leaving slave blacklisted by the real master", &|| {
        serde_json::from_str::<Value>(&http("GET", &ctrl("nodeinfo"), "").1)
            .is_ok_and(|v| v[&leaving]["blacklisted"] == true)
    });
    // ...and for DDFS, whose GC moves its data away during the drain.
    wait("the leaving slave on the DDFS GC blacklist", &|| {
        serde_json::from_str::<Value>(&http("GET", &ctrl("get_gc_blacklist"), "").1)
            .is_ok_and(|v| v.as_array().is_some_and(|a| a.iter().any(|h| h == leaving.as_str())))
    });
    let s3 = c.wait_until("master + 1 slave", Duration::from_secs(60), |s| at_size(s, 1));
    let want = table_of(&s3);
    wait("the table without the slave", &|| load().as_ref() == Some(&want));

    // Disco's proxy (lighttpd) daemonized: out of the service's process
    // tree and the node's process group.
    let proxies = || -> Vec<i32> {
        node_processes(&c.state_dir())
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with(b"lighttpd")))
            .collect()
    };
    wait("Disco's proxy running", &|| !proxies().is_empty());
    // Destroyed: the master's Erlang VM is gone with its service, and so is
    // every process of every node, the proxy included (issue 22, item 6).
    assert!(c.ctl(&["destroy", "--yes"]).status.success());
    let vm = format!("disco_{port}_master");
    wait("no Disco VM left", &|| {
        !String::from_utf8_lossy(&Command::new("ps").args(["-eo", "args"]).output().unwrap().stdout)
            .contains(&vm)
    });
    wait("no process of any node left (Disco's proxy included)", &|| {
        node_processes(&c.state_dir()).is_empty()
    });
}

/// Issue 15: a real Disco cluster end to end. Disco 0.5.4 built once by
/// scripts/build-disco (from shared/vendor/disco, the project's patches,
/// Erlang/OTP and Python of this machine), served by the controller and
/// installed on every node by digest. The nodes are local machines
/// (`local_machines`: own network, host name, /etc, processes and sshd),
/// so the real master takes its slaves over SSH as the `disco` user,
/// checking their host keys, with the cookie from the controller, exactly
/// as on EC2. Disco's own word count example (examples/util/wordcount.py)
/// runs with Disco's own Python client on the master: right counts, tasks
/// on the slaves; a blob goes into DDFS and comes back; a killed slave is
/// replaced and the next job (over the DDFS blob) is right; on `scale 1`
/// the leaving slave goes once DDFS's GC has copied its data away, a third
/// job is right, the first blob is still read by a job and DDFS takes and
/// gives a new blob; `destroy` leaves no process and no network behind.
#[test]
fn real_disco_word_count_survives_a_lost_slave_and_scale_down() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    require_root();
    let (mut c, s, _) = real_disco_cluster("local_machines = true\ndrain_timeout_secs = 120");
    let master = node_ids(&s, "master")[0].clone();
    let slaves = node_ids(&s, "slave");
    let addr_of = |s: &Value, id: &str| -> String {
        nodes(s).iter().find(|n| n["node_id"] == id).unwrap()["address"].as_str().unwrap().to_string()
    };
    let master_addr = addr_of(&s, &master);
    let node_file = |id: &str, rel: &str| {
        std::fs::read_to_string(c.state_dir().join("nodes").join(id).join("fs").join(rel)).unwrap_or_default()
    };
    // SSH trust as on EC2: each slave's own host key (made at its first
    // boot) in the master's known_hosts, the master's key in each slave's
    // authorized_keys; the cookie on every node, the disco user's only.
    // (Relayed through the controller once both sides are ready.)
    let trusted = || {
        let known = node_file(&master, "home/disco/.ssh/known_hosts");
        let master_key = node_file(&master, "home/disco/.ssh/id_ed25519.pub");
        let master_key = master_key.split_whitespace().nth(1).unwrap_or("no key").to_string();
        slaves.iter().all(|id| {
            let host_key = node_file(id, "etc/ssh/ssh_host_ed25519_key.pub");
            let key = host_key.split_whitespace().nth(1).unwrap_or_else(|| panic!("{id} has no host key"));
            known.contains(&format!("{id},{} ssh-ed25519 {key}", addr_of(&s, id)))
                && node_file(id, "home/disco/.ssh/authorized_keys").contains(&master_key)
        })
    };
    let end = Instant::now() + Duration::from_secs(30);
    while !trusted() {
        assert!(
            Instant::now() < end,
            "SSH trust not set up: master's known_hosts:\n{}",
            node_file(&master, "home/disco/.ssh/known_hosts")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in &slaves {
        let cookie = c.state_dir().join("nodes").join(id).join("fs/home/disco/.erlang.cookie");
        assert_eq!(std::fs::metadata(&cookie).unwrap().permissions().mode() & 0o777, 0o400, "{id}");
    }
    let nodeinfo = || {
        serde_json::from_str::<Value>(
            &http("GET", &format!("http://{master_addr}:8989/disco/ctrl/nodeinfo"), "").1,
        )
        .unwrap_or(Value::Null)
    };
    let master_dir = c.state_dir().join("nodes").join(&master);
    let wait_master = |what: &str, f: &dyn Fn(&Value) -> bool| {
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let info = nodeinfo();
            if f(&info) {
                return info;
            }
            assert!(Instant::now() < end, "{what}: {info:#}\nthe master's log:\n{}", master_log(&master_dir));
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let connected = |hosts: Vec<String>| {
        move |info: &Value| {
            info.as_object().is_some_and(|o| o.len() == hosts.len())
                && hosts.iter().all(|h| info[h]["connected"] == true)
        }
    };
    let mut all = slaves.clone();
    all.push(master.clone());
    wait_master("the slaves' Erlang nodes started over SSH", &connected(all));

    // 1. Disco's word count over raw inputs, tasks on the slaves too.
    let inputs: Vec<String> =
        ["to", "be", "or", "not", "to", "be", "that", "is"].iter().map(|w| format!("raw://{w}")).collect();
    let mut args = vec!["count"];
    args.extend(inputs.iter().map(String::as_str));
    let job = disco_on(&c, &master, &args).unwrap_or_else(|e| panic!("job 1: {e}\n{}", c.diagnostics()));
    let want = serde_json::json!({"to": 2, "be": 2, "or": 1, "not": 1, "that": 1, "is": 1});
    assert_eq!(job["counts"], want, "{job}");
    let ran: Vec<&str> = job["hosts"].as_array().unwrap().iter().filter_map(|h| h.as_str()).collect();
    assert!(ran.iter().any(|h| slaves.iter().any(|s| s == h)), "no task ran on a slave: {job}");
    // The same job sorted (`sort=True`: Unix sort on the reduce's input, as
    // every sorted Disco job does): unpatched, it failed on /bin/sh and
    // Disco retried it forever (`disco_on` gives up after 120 s).
    args[0] = "sortcount";
    let job = disco_on(&c, &master, &args).unwrap_or_else(|e| panic!("sorted job: {e}\n{}", c.diagnostics()));
    assert_eq!(job["counts"], want, "{job}");
    // One group per key, in order: the reduce's input was sorted.
    assert_eq!(job["keys"], serde_json::json!(["be", "is", "not", "or", "that", "to"]), "{job}");
    args[0] = "count";

    // 2. DDFS: a blob in, on every node (replicas = planned size, 3), and out.
    let text = "one two two three three three";
    let put = disco_on(&c, &master, &["put", "data:words", "words", text]).unwrap();
    assert_eq!(put["urls"][0].as_array().map(Vec::len), Some(3), "{put}");
    let got = disco_on(&c, &master, &["get", "data:words"]).unwrap();
    assert_eq!(got["blobs"], serde_json::json!([text]), "{got}");

    // 3. A slave dies (its machine and every process on it): replaced, and
    // the table follows; the next job reads the DDFS blob.
    let victim = slaves[0].clone();
    killpg(c.node_pid(&victim));
    let s2 = c.wait_until("the killed slave replaced", Duration::from_secs(90), |s| {
        at_size(s, 2) && !node_ids(s, "slave").contains(&victim)
    });
    let mut all = node_ids(&s2, "slave");
    all.push(master.clone());
    wait_master("the replacement connected, the dead slave gone", &connected(all));
    let job = disco_on(&c, &master, &["count", "tag://data:words"])
        .unwrap_or_else(|e| panic!("job 2: {e}\n{}", c.diagnostics()));
    assert_eq!(job["counts"], serde_json::json!({"one": 1, "two": 2, "three": 3}), "{job}");

    // DDFS's client skips a replica on a host whose name does not resolve
    // (a lost node) for the next one, instead of nine retries over up to
    // ~17 minutes (patch disco-0010).
    let fast = disco_on(&c, &master, &["unresolvable", "data:words"]).unwrap();
    assert_eq!(fast["blobs"], serde_json::json!([text]), "{fast}");
    assert!(fast["first"].as_str().unwrap().contains("gone-node"), "{fast}");
    assert!(fast["secs"].as_f64().unwrap() < 60.0, "{fast}");
    eprintln!("MEASURE pull past an unresolvable replica: {} s", fast["secs"]);

    // 4. scale 1: the leaving slave drains (blacklisted), the third job is
    // right, the blob is still readable. A job running across the change
    // lives on: the planned size falls below 3, DDFS's replicas follow it
    // without restarting the master (patch disco-0012; before, the restart
    // killed the job).
    let long: Vec<String> = (0..6).map(|i| format!("raw://long{i}")).collect();
    let mut submit = vec!["submit", "2"];
    submit.extend(long.iter().map(String::as_str));
    let running = disco_on(&c, &master, &submit).unwrap();
    assert!(c.ctl(&["scale", "1"]).status.success());
    // It goes once DDFS's GC has copied its data away (the master's
    // `safe_gc_blacklist`), well before the 120 s drain timeout.
    let s3 = c.wait_until("master + 1 slave", Duration::from_secs(90), |s| at_size(s, 1));
    assert!(c.serve_log().contains("drained: the engine holds nothing"), "{}", c.serve_log());
    let mut all = node_ids(&s3, "slave");
    all.push(master.clone());
    wait_master("the table without the leaving slave", &connected(all));
    let job = disco_on(&c, &master, &["wait", running["job"].as_str().unwrap()])
        .unwrap_or_else(|e| panic!("the job across the scale down: {e}\n{}", c.diagnostics()));
    let counts: BTreeMap<String, u64> = (0..6).map(|i| (format!("long{i}"), 1)).collect();
    assert_eq!(job["counts"], serde_json::json!(counts), "{job}");
    let job = disco_on(&c, &master, &args).unwrap_or_else(|e| panic!("job 3: {e}\n{}", c.diagnostics()));
    assert_eq!(job["counts"], want, "{job}");
    // The first blob is still read by a job (two nodes of three gone), and
    // DDFS takes and gives a new one on the cluster as it is now.
    let job = disco_on(&c, &master, &["count", "tag://data:words"])
        .unwrap_or_else(|e| panic!("job 4: {e}\n{}", c.diagnostics()));
    assert_eq!(job["counts"], serde_json::json!({"one": 1, "two": 2, "three": 3}), "{job}");
    disco_on(&c, &master, &["put", "data:more", "more", "after the scale down"]).unwrap();
    let got = disco_on(&c, &master, &["get", "data:more"]).unwrap();
    assert_eq!(got["blobs"], serde_json::json!(["after the scale down"]), "{got}");
    assert_eq!(got["replicas"], serde_json::json!([2]), "replicas follow the planned size: {got}");

    // 5. destroy: nothing left in any node's namespaces, no bridge.
    let namespaces: Vec<String> = node_ids(&s3, "slave")
        .iter()
        .chain([&master])
        .map(|id| {
            std::fs::read_link(format!("/proc/{}/ns/net", c.node_pid(id))).unwrap().display().to_string()
        })
        .collect();
    assert!(c.ctl(&["destroy", "--yes"]).status.success());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_in(&namespaces);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "processes left on destroyed nodes: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The bridge (the nodes' gateway, 10.X.0.1) is gone with the cluster.
    let octets: Vec<&str> = master_addr.split('.').collect();
    let gateway = format!("inet {}.{}.0.1/16", octets[0], octets[1]);
    let addrs = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap().stdout;
    assert!(!String::from_utf8_lossy(&addrs).contains(&gateway), "{}", String::from_utf8_lossy(&addrs));
}

/// Live processes in any of these network namespaces (`net:[inode]`).
fn processes_in(namespaces: &[String]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            && namespaces.iter().any(|n| *n == ns.display().to_string())
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Issue 24, item 3: a scale-in that takes away more DDFS nodes at once
/// than there are replicas (4 slaves -> 1: three of five nodes, replicas
/// 3) loses no blob. The leaving slaves are blacklisted for DDFS, its GC
/// copies their data onto the nodes that stay, and each goes only once the
/// master reports it safe (`safe_gc_blacklist`); the replica count follows
/// the planned size (2) without restarting the master. Every blob is then
/// read back, by DDFS's client and by a job.
#[test]
fn real_disco_scale_in_from_4_slaves_to_1_keeps_every_blob() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    require_root();
    let (mut c, s, _) = real_disco_cluster_of(4, "local_machines = true\ndrain_timeout_secs = 600");
    let master = node_ids(&s, "master")[0].clone();
    disco_on(&c, &master, &["connected", "5"]).unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let blobs: Vec<String> = (0..12).map(|i| format!("blob{i} kept {}", "x".repeat(i))).collect();
    for (i, text) in blobs.iter().enumerate() {
        let put = disco_on(&c, &master, &["put", "data:keep", &format!("b{i}"), text]).unwrap();
        assert_eq!(put["urls"][0].as_array().map(Vec::len), Some(3), "{put}");
    }
    let started = Instant::now();
    assert!(c.ctl(&["scale", "1"]).status.success());
    c.wait_until("master + 1 slave", Duration::from_secs(600), |s| at_size(s, 1));
    eprintln!("MEASURE scale 4 -> 1 with 12 blobs: {:.1} s", started.elapsed().as_secs_f64());
    // Each went because DDFS's GC had moved its data, not at the timeout.
    let log = c.serve_log();
    assert_eq!(log.matches("drained: the engine holds nothing").count(), 3, "{log}");
    // Read once the master has let the gone nodes go (its node table).
    let kept = c.status().expect("status");
    let master_addr = nodes(&kept).iter().find(|n| n["node_id"] == master.as_str()).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let info = http("GET", &format!("http://{master_addr}:8989/disco/ctrl/nodeinfo"), "").1;
        let info: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
        if info.as_object().is_some_and(|o| o.len() == 2) {
            break;
        }
        assert!(Instant::now() < end, "the master still lists the gone slaves: {info:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let got =
        disco_on(&c, &master, &["get", "data:keep"]).unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let mut read: Vec<String> =
        got["blobs"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect();
    read.sort();
    let mut want = blobs.clone();
    want.sort();
    assert_eq!(read, want, "{got}");
    // A job reads every blob too (its tasks on the two nodes left).
    let job = disco_on(&c, &master, &["count", "tag://data:keep"]).unwrap();
    assert_eq!(job["counts"]["kept"], 12, "{job}");
    assert!(c.ctl(&["destroy", "--yes"]).status.success());
}
