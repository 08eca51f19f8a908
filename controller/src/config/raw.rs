//! The file as written: [`RawConfig`] (every key optional, unknown keys
//! refused, each also accepted in the original's upper-case spelling), and
//! what serde's errors are about, for people.

use super::{EngineKind, FallbackRoles, Pool, ProviderKind};
use serde::Deserialize;

/// Keys of the original `config.json` that it marked required (its AWS keys
/// excepted: ddisco prefers the standard credential chain).
pub(super) const LEGACY_REQUIRED: &[(&str, &str)] = &[
    ("BASE_PACKAGES", "base_packages"),
    ("ADDITIONAL_PACKAGES", "additional_packages"),
    ("PIP_REQUIREMENTS", "pip_requirements"),
    ("AMI", "ami"),
    ("MAX_BID", "max_bid"),
    ("INSTANCE_TYPE", "instance_type"),
    ("KEY_NAME", "key_name"),
    ("SECURITY_GROUPS", "security_groups"),
    ("MGMT_KEY", "mgmt_key"),
    ("TAG_KEY", "tag_key"),
    ("NUM_SLAVES", "num_slaves"),
];

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(alias = "PROVIDER")]
    pub(super) provider: Option<ProviderKind>,
    #[serde(alias = "REGION")]
    pub(super) region: Option<String>,
    #[serde(alias = "TAG_KEY")]
    pub(super) tag_key: Option<String>,
    #[serde(alias = "NUM_SLAVES")]
    pub(super) num_slaves: Option<i64>,
    #[serde(alias = "MASTER_MULTIPLIER")]
    pub(super) master_multiplier: Option<f64>,
    #[serde(alias = "SLAVE_MULTIPLIER")]
    pub(super) slave_multiplier: Option<f64>,
    #[serde(alias = "BASE_PACKAGES")]
    pub(super) base_packages: Option<Vec<String>>,
    #[serde(alias = "ADDITIONAL_PACKAGES")]
    pub(super) additional_packages: Option<Vec<String>>,
    #[serde(alias = "PIP_REQUIREMENTS")]
    pub(super) pip_requirements: Option<Vec<String>>,
    pub(super) pip_source: Option<super::PipSource>,
    pub(super) node_python: Option<String>,
    #[serde(alias = "AMI")]
    pub(super) ami: Option<String>,
    #[serde(alias = "MAX_BID")]
    pub(super) max_bid: Option<StringOrNumber>,
    #[serde(alias = "INSTANCE_TYPE")]
    pub(super) instance_type: Option<String>,
    #[serde(alias = "MASTER_INSTANCE_TYPE")]
    pub(super) master_instance_type: Option<String>,
    #[serde(alias = "SLAVE_INSTANCE_TYPE")]
    pub(super) slave_instance_type: Option<String>,
    #[serde(alias = "KEY_NAME")]
    pub(super) key_name: Option<String>,
    #[serde(alias = "SECURITY_GROUPS")]
    pub(super) security_groups: Option<Vec<String>>,
    #[serde(alias = "MGMT_KEY")]
    pub(super) mgmt_key: Option<String>,
    #[serde(alias = "POST_INIT")]
    pub(super) post_init: Option<String>,
    #[serde(alias = "AWS_ACCESS")]
    pub(super) aws_access: Option<String>,
    #[serde(alias = "AWS_SECRET")]
    pub(super) aws_secret: Option<String>,
    #[serde(alias = "SSH_USER")]
    pub(super) ssh_user: Option<String>,
    #[serde(alias = "LISTEN")]
    pub(super) listen: Option<String>,
    #[serde(alias = "DOWNLOAD_LISTEN")]
    pub(super) download_listen: Option<String>,
    #[serde(alias = "ADVERTISE")]
    pub(super) advertise: Option<String>,
    #[serde(alias = "STATE_DIR")]
    pub(super) state_dir: Option<String>,
    #[serde(alias = "HEARTBEAT_INTERVAL_SECS")]
    pub(super) heartbeat_interval_secs: Option<f64>,
    #[serde(alias = "HEARTBEAT_TIMEOUT_SECS")]
    pub(super) heartbeat_timeout_secs: Option<f64>,
    #[serde(alias = "BOOT_TIMEOUT_SECS")]
    pub(super) boot_timeout_secs: Option<f64>,
    #[serde(alias = "TOKEN_TTL_SECS")]
    pub(super) token_ttl_secs: Option<f64>,
    #[serde(alias = "CERT_VALIDITY_SECS")]
    pub(super) cert_validity_secs: Option<f64>,
    #[serde(alias = "RECONCILE_INTERVAL_SECS")]
    pub(super) reconcile_interval_secs: Option<f64>,
    #[serde(alias = "AGENT_BINARY")]
    pub(super) agent_binary: Option<String>,
    pub(super) agent_binary_arm64: Option<String>,
    #[serde(alias = "LOCAL_INSTALL_PACKAGES")]
    pub(super) local_install_packages: Option<bool>,
    pub(super) local_machines: Option<bool>,
    #[serde(alias = "ENDPOINT_URL")]
    pub(super) endpoint_url: Option<String>,
    #[serde(alias = "SUBNET_IDS")]
    pub(super) subnet_ids: Option<Vec<String>>,
    #[serde(alias = "SLAVE_POOLS")]
    pub(super) slave_pools: Option<Vec<Pool>>,
    #[serde(alias = "EC2_MAX_ATTEMPTS")]
    pub(super) ec2_max_attempts: Option<u32>,
    #[serde(alias = "ROOT_VOLUME_GB")]
    pub(super) root_volume_gb: Option<u32>,
    #[serde(alias = "MASTER_ON_DEMAND")]
    pub(super) master_on_demand: Option<bool>,
    pub(super) spread: Option<super::Spread>,
    #[serde(alias = "CAPACITY_COOLDOWN_SECS")]
    pub(super) capacity_cooldown_secs: Option<f64>,
    #[serde(alias = "IAM_INSTANCE_PROFILE")]
    pub(super) iam_instance_profile: Option<String>,
    #[serde(alias = "IAM_PROPAGATION_SECS")]
    pub(super) iam_propagation_secs: Option<f64>,
    #[serde(alias = "IDENTITY_CERTIFICATE")]
    pub(super) identity_certificate: Option<String>,
    #[serde(alias = "ON_DEMAND_FALLBACK")]
    pub(super) on_demand_fallback: Option<FallbackRoles>,
    #[serde(alias = "FALLBACK_FAILURES")]
    pub(super) fallback_failures: Option<u32>,
    #[serde(alias = "FALLBACK_INTERRUPTIONS")]
    pub(super) fallback_interruptions: Option<u32>,
    #[serde(alias = "FALLBACK_WINDOW_SECS")]
    pub(super) fallback_window_secs: Option<f64>,
    #[serde(alias = "ON_DEMAND_IDLE_REPLACE_SECS")]
    pub(super) on_demand_idle_replace_secs: Option<f64>,
    #[serde(alias = "SCRATCH_PATH")]
    pub(super) scratch_path: Option<String>,
    #[serde(alias = "ENGINE")]
    pub(super) engine: Option<EngineKind>,
    #[serde(alias = "DRAIN_TIMEOUT_SECS")]
    pub(super) drain_timeout_secs: Option<f64>,
    pub(super) max_spend_usd: Option<f64>,
    pub(super) on_budget: Option<crate::budget::OnBudget>,
    pub(super) autostop_idle_mins: Option<f64>,
    pub(super) adaptive_cooldown_secs: Option<f64>,
    pub(super) orphan_timeout_secs: Option<f64>,
    pub(super) max_runtime_mins: Option<f64>,
    pub(super) failure_budget: Option<u32>,
    pub(super) failure_window_mins: Option<f64>,
    #[serde(alias = "DASK_VERSION")]
    pub(super) dask_version: Option<String>,
    #[serde(alias = "DASK_EXTRAS")]
    pub(super) dask_extras: Option<Vec<String>>,
    #[serde(alias = "DASK_SCHEDULER_PORT")]
    pub(super) dask_scheduler_port: Option<u16>,
    #[serde(alias = "DASK_DASHBOARD_PORT")]
    pub(super) dask_dashboard_port: Option<u16>,
    #[serde(alias = "DISCO_SOURCE")]
    pub(super) disco_source: Option<String>,
    #[serde(alias = "DISCO_PORT")]
    pub(super) disco_port: Option<u16>,
    #[serde(alias = "DISCO_ROOT")]
    pub(super) disco_root: Option<String>,
    #[serde(alias = "DISCO_GC_AFTER")]
    pub(super) disco_gc_after: Option<u32>,
    #[serde(alias = "DISCO_HOME")]
    pub(super) disco_home: Option<String>,
    pub(super) disco_bundle: Option<String>,
    #[serde(alias = "DASHBOARD_LISTEN")]
    pub(super) dashboard_listen: Option<String>,
    #[serde(alias = "DASHBOARD_TOKEN")]
    pub(super) dashboard_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StringOrNumber {
    S(String),
    N(f64),
}

/// The key a serde error is about: its path, or the field named in an
/// "unknown field `x`" message.
pub(super) fn key_of(path: &str, message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        return Some(rest[..end].to_string());
    }
    (!path.is_empty() && path != ".").then(|| path.to_string())
}

/// A serde message made for people: an unknown key gets the closest
/// accepted one ("did you mean") instead of the list of all ~120.
pub(super) fn explain(message: &str) -> String {
    // A typed choice (provider, engine, ...): "unknown variant `x`,
    // expected one of `a`, `b`" says it as people do.
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((unknown, tail)) = rest.split_once('`')
    {
        let accepted: Vec<String> = tail.split('`').skip(1).step_by(2).map(|k| format!("\"{k}\"")).collect();
        let choices = match accepted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => return message.to_string(),
        };
        return format!("{unknown:?}: use {choices}");
    }
    let Some(rest) = message.strip_prefix("unknown field `") else { return message.to_string() };
    let Some((unknown, tail)) = rest.split_once('`') else { return message.to_string() };
    // serde lists the accepted names after "expected": `a`, `b`, ...
    let accepted: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    let closest = accepted
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min();
    match closest {
        Some((_, k)) => format!(
            "unknown key; did you mean `{k}`? (`ddisco-controller init` prints every key with its default)"
        ),
        None => {
            "unknown key (`ddisco-controller init` prints every accepted key with its default)".to_string()
        }
    }
}
