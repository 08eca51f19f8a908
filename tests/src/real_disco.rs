//! The real Disco on a local cluster of machine nodes: a cluster of it, and
//! Disco's own Python client run on one of its nodes (in the node's
//! namespaces, where the nodes' host names resolve), for the `real_disco_*`
//! tests of `engines.rs` and `disco_suite.rs`.

use crate::disco::built_disco;
use crate::{Cluster, at_size};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// The master node's Disco log (service output), for failure messages.
pub fn master_log(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for rel in ["logs/disco.log", "mnt/disco/log/console.log"] {
        if let Ok(t) = std::fs::read_to_string(dir.join(rel)) {
            out.push_str(&format!(
                "--- {rel}\n{}\n",
                t.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Machine nodes need root (namespaces, a bridge): says so, or panics.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "local machine nodes need root (namespaces, a bridge): run the suite as root, as scripts/test does"
    );
}

/// A cluster of the real Disco (master + 2 slaves, the build of
/// scripts/build-disco served as `disco_bundle`) with `extra` config, once
/// at size; with the bundle's SHA-256.
pub fn real_disco_cluster(extra: &str) -> (Cluster, Value, String) {
    real_disco_cluster_of(2, extra)
}

/// Like `real_disco_cluster`, with `slaves` slaves.
pub fn real_disco_cluster_of(slaves: usize, extra: &str) -> (Cluster, Value, String) {
    let bundle = built_disco().parent().unwrap().join("disco.tar.gz");
    let sha = sha256_hex(&std::fs::read(&bundle).unwrap());
    let mut c = Cluster::start(&format!(
        "engine = \"disco\"\ndisco_source = \"\"\ndisco_bundle = \"{}\"\nnum_slaves = {slaves}\n\
         heartbeat_timeout_secs = 5.0\n{extra}\n",
        bundle.display()
    ));
    let s = c.wait_until(&format!("master + {slaves} slaves ready"), Duration::from_secs(120), |s| {
        at_size(s, slaves)
    });
    (c, s, sha)
}

/// Runs tests/python/disco_job.py on `node` (in its namespaces, as a user
/// logged into the master would), with the Disco client of the node's own
/// build; its JSON answer.
pub fn disco_on(c: &Cluster, node: &str, args: &[&str]) -> Result<Value, String> {
    let out = python_on(c, node, "disco_job.py", args, &[], 120)?;
    serde_json::from_str(out.trim()).map_err(|e| format!("{args:?}: {e}: {out}"))
}

/// Runs `tests/python/<script>` with `args` on `node` (its network, UTS and
/// mount namespaces; a clean environment with `DISCO_MASTER` and `env`),
/// under `timeout secs`: its standard output, or why it failed.
pub fn python_on(
    c: &Cluster,
    node: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    secs: u64,
) -> Result<String, String> {
    let code = std::fs::read_to_string(format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let out = Command::new("nsenter")
        .args(["-t", &c.node_pid(node).to_string(), "--net", "--uts", "--mount", "--"])
        .args(["env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8"])
        .arg(format!("DISCO_MASTER=http://{node}:8989"))
        .arg("PYTHONPATH=/opt/disco/examples/util")
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .args([
            "timeout",
            &secs.to_string(),
            "sh",
            "-c",
            "cd /opt/disco && exec python3 -W ignore -c \"$0\" \"$@\"",
        ])
        .arg(code)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{script} {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}
