//! Prometheus metrics: counters kept as atomics at the edges (one relaxed
//! add each, no lock), gauges computed from the registry when scraped
//! (`Cluster::node_counts`), rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub enrollments: AtomicU64,
    pub refusals: AtomicU64,
    /// Connections closed by `admission` (over a limit, handshake too slow).
    pub connections_refused: AtomicU64,
    pub heartbeats: AtomicU64,
    pub launches: AtomicU64,
    pub launch_failures: AtomicU64,
    pub replacements: AtomicU64,
    pub notices: AtomicU64,
    pub reconcile_ticks: AtomicU64,
    pub reconcile_micros: AtomicU64,
    /// Directive sets computed by `publish` (work accounting).
    pub directive_sets: AtomicU64,
    /// Bytes serialised for them.
    pub directive_bytes: AtomicU64,
    /// Bytes of `cluster.json` written.
    pub save_bytes: AtomicU64,
    /// Times `cluster.json` was written.
    pub saves: AtomicU64,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ =
        writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
}

/// The whole scrape: counters `m`, nodes by (role, state), the slaves
/// asked for, and the provider's API calls (action, calls, errors).
pub fn render(
    m: &Metrics,
    by: &BTreeMap<(String, String), u64>,
    desired: u32,
    calls: &[(String, u64, u64)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP ddisco_nodes Nodes by role and state.\n# TYPE ddisco_nodes gauge");
    for ((role, state), n) in by {
        let _ = writeln!(out, "ddisco_nodes{{role=\"{role}\",state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP ddisco_desired_slaves Slaves asked for.\n# TYPE ddisco_desired_slaves gauge\nddisco_desired_slaves {desired}"
    );
    counter(&mut out, "ddisco_enrollments_total", "Agents enrolled.", &m.enrollments);
    counter(&mut out, "ddisco_refusals_total", "Enrollments and sessions refused.", &m.refusals);
    counter(
        &mut out,
        "ddisco_connections_refused_total",
        "Connections closed before any exchange: over a limit for peers without a certificate, or a TLS \
         handshake not finished in time.",
        &m.connections_refused,
    );
    counter(&mut out, "ddisco_heartbeats_total", "Heartbeats received.", &m.heartbeats);
    counter(&mut out, "ddisco_launches_total", "Nodes launched.", &m.launches);
    counter(&mut out, "ddisco_launch_failures_total", "Launch calls that failed.", &m.launch_failures);
    counter(&mut out, "ddisco_replacements_total", "Nodes lost and replaced.", &m.replacements);
    counter(
        &mut out,
        "ddisco_interruption_notices_total",
        "Spot interruption/rebalance notices.",
        &m.notices,
    );
    counter(&mut out, "ddisco_directive_sets_total", "Engine directive sets computed.", &m.directive_sets);
    counter(&mut out, "ddisco_state_bytes_written_total", "Bytes of cluster.json written.", &m.save_bytes);
    let ticks = m.reconcile_ticks.load(Ordering::Relaxed);
    let secs = m.reconcile_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(
        out,
        "# HELP ddisco_reconcile_duration_seconds Time spent in reconcile passes.\n\
         # TYPE ddisco_reconcile_duration_seconds summary\n\
         ddisco_reconcile_duration_seconds_sum {secs}\nddisco_reconcile_duration_seconds_count {ticks}"
    );
    if !calls.is_empty() {
        let _ = writeln!(
            out,
            "# HELP ddisco_provider_api_calls_total Provider API calls by action.\n# TYPE ddisco_provider_api_calls_total counter"
        );
        for (action, n, _) in calls {
            let _ = writeln!(out, "ddisco_provider_api_calls_total{{action=\"{action}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ddisco_provider_api_errors_total Provider API errors by action.\n# TYPE ddisco_provider_api_errors_total counter"
        );
        for (action, _, e) in calls {
            let _ = writeln!(out, "ddisco_provider_api_errors_total{{action=\"{action}\"}} {e}");
        }
        // What the provider costs per node: every call (listings, prices,
        // terminations included) over the nodes launched.
        let launched = m.launches.load(Ordering::Relaxed);
        if launched > 0 {
            let total: u64 = calls.iter().map(|(_, n, _)| *n).sum();
            let _ = writeln!(
                out,
                "# HELP ddisco_provider_api_calls_per_launched_node Provider API calls so far per node launched.\n\
                 # TYPE ddisco_provider_api_calls_per_launched_node gauge\n\
                 ddisco_provider_api_calls_per_launched_node {:.3}",
                total as f64 / launched as f64
            );
        }
    }
    out
}
