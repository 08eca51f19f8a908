//! Keeps the benchmark working: a short smoke run of `ddisco-bench --quick`
//! (small numbers). It checks that every scenario ran and reports its
//! figures, and the correctness facts (no false alarm, every frozen agent
//! detected); it asserts no timing: the figures go to BENCHMARKS.md.

use ddisco_tests::bin;
use std::process::Command;

#[test]
fn benchmark_smoke_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(bin("ddisco-bench")).args(["--quick", "--json"]).arg(&json).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for s in ["floor", "enroll", "scaling", "hold", "detect", "agent"] {
        assert!(v[s].is_object(), "scenario {s} missing: {v:#}");
    }
    assert_eq!(v["enroll"]["agents"], 50);
    assert!(v["enroll"]["agents_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["hold"]["false_alarms"], 0, "{v:#}");
    assert_eq!(v["hold"]["nodes_not_ready"], 0, "{v:#}");
    assert_eq!(v["detect"]["frozen_agents"], v["detect"]["within_timeout_plus_1s"], "{v:#}");
    assert_eq!(v["detect"]["false_alarms"], 0, "{v:#}");
    assert_eq!(v["scaling"]["points"].as_array().unwrap().len(), 2, "{v:#}");
    assert!(v["scaling"]["cpu_per_enrollment_ratio_largest_to_smallest"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(v["floor"]["enrollment_floor_ms"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(v["agent"]["binary_bytes"].as_u64().unwrap() > 0);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("agents_per_s") && table.contains("controller_rss_mb"), "{table}");
}
