//! Disco's own integration suite (`tests/` of Disco 0.5.4, run with
//! `disco test MODULE`) against a ddisco cluster of the real Disco: the
//! jobs Disco's users write (sorted reduces, pipelines, external programs,
//! chained jobs, DDFS tags and attributes, partitions, job kills, GC) run
//! unchanged on it.
//!
//! Real parts throughout: machine nodes (own network, host name, /etc,
//! sshd), Disco built by scripts/build-disco with the project's patches and
//! installed by the engine, Disco's own test runner on the master. The
//! module list, the tests left out (each with its reason) and the time
//! limits are `tests/python/disco_suite.py`'s.

use ddisco_tests::real_disco::{disco_on, python_on, real_disco_cluster, require_root};
use ddisco_tests::*;
use serde_json::Value;

/// Every module of Disco's suite but its load test (`test_50k`'s 50,000
/// map tasks, ~50 min on this machine: `scripts/demo-disco 2 --suite test_50k`,
/// BENCHMARKS.md) passes on a master + 2 slaves; the per-module results go
/// to `target/disco-suite.jsonl`.
#[test]
fn real_disco_own_suite() {
    let _heavy = ddisco_tests::one_heavy_at_a_time();
    require_root();
    let (c, s, _) = real_disco_cluster("local_machines = true");
    let master = node_ids(&s, "master")[0].clone();
    // Ready to the controller; usable to Disco once the master has started
    // each slave's Erlang over SSH.
    disco_on(&c, &master, &["connected", "3"]).unwrap_or_else(|e| panic!("{e}\n{}", c.diagnostics()));
    let out = python_on(&c, &master, "disco_suite.py", &["--without-load"], &[], 1800)
        .unwrap_or_else(|e| panic!("the suite did not finish: {e}\n{}", c.diagnostics()));
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/disco-suite.jsonl");
    let _ = std::fs::write(&target, &out);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    let (modules, summary): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|l| l["summary"].is_null());
    let mut table = String::new();
    for m in &modules {
        table.push_str(&format!(
            "{:<20} {:<8} {:>3} tests {:>6.1} s{}\n",
            m["module"].as_str().unwrap(),
            m["result"].as_str().unwrap(),
            m["tests"],
            m["secs"].as_f64().unwrap_or(0.0),
            m["excluded"].as_array().map_or(String::new(), |e| if e.is_empty() {
                String::new()
            } else {
                format!("  ({} left out)", e.len())
            }),
        ));
    }
    eprintln!("{table}{}", summary.first().map(|s| s.to_string()).unwrap_or_default());
    let failed: Vec<String> = modules
        .iter()
        .filter(|m| m["result"] != "pass")
        .map(|m| format!("{} ({}):\n{}", m["module"], m["result"], m["output"].as_str().unwrap_or("")))
        .collect();
    assert!(
        failed.is_empty(),
        "Disco's own tests failed on the cluster:\n{}\n\n{table}",
        failed.join("\n\n")
    );
    // Every module of the suite was run (a loader problem would show as
    // fewer modules, not as failures).
    assert!(modules.len() >= 44, "only {} modules ran:\n{table}", modules.len());
}
