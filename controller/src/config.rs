//! Cluster configuration: the TOML file `init` prints, and the original
//! disposabledisco `config.json` (upper-case keys), accepted unchanged.
//!
//! Parsing goes through [`RawConfig`] (every key optional, unknown keys
//! refused, each key also accepted in the original's upper-case spelling),
//! then [`Config::from_raw`] applies defaults and validates. Every error names
//! the file and the key.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which infrastructure runs the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Every node is a process tree on this machine (the embedded default).
    Local,
    /// AWS EC2 spot instances.
    Ec2,
    /// Benchmarks and tests: records launches, starts nothing.
    Record,
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Local => "local",
            ProviderKind::Ec2 => "ec2",
            ProviderKind::Record => "record",
        })
    }
}

/// A validated configuration. Durations and paths are resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub provider: ProviderKind,
    pub region: Option<String>,
    pub tag_key: String,
    pub num_slaves: u32,
    pub master_multiplier: f64,
    pub slave_multiplier: f64,
    pub base_packages: Vec<String>,
    pub additional_packages: Vec<String>,
    pub pip_requirements: Vec<String>,
    pub ami: String,
    pub max_bid: String,
    pub instance_type: String,
    pub master_instance_type: String,
    pub slave_instance_type: String,
    pub key_name: String,
    pub security_groups: Vec<String>,
    /// Public keys, one per line, added to every node's authorized_keys.
    pub mgmt_keys: Vec<String>,
    pub post_init: String,
    pub ssh_user: String,
    pub listen: SocketAddr,
    pub download_listen: SocketAddr,
    /// Host (name or IP) nodes use to reach the controller.
    pub advertise: Option<String>,
    pub state_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub boot_timeout: Duration,
    pub token_ttl: Duration,
    pub reconcile_interval: Duration,
    pub agent_binary: Option<PathBuf>,
    /// Local provider only: allow `apt-get install` of missing packages.
    pub local_install_packages: bool,
    /// Legacy AWS keys found in the file (the credential chain is preferred).
    pub aws_keys_in_file: bool,
    /// The legacy AWS_ACCESS / AWS_SECRET values, when given.
    pub aws_keys: Option<(String, Secret)>,
    /// EC2-compatible endpoint (moto, LocalStack); `None`: AWS itself.
    pub endpoint_url: Option<String>,
    /// Subnets to launch into, tried in order; empty: the default VPC.
    pub subnet_ids: Vec<String>,
    /// Slave pools as configured (empty: one pool from num_slaves).
    pub slave_pools: Vec<Pool>,
    /// Attempts the AWS SDK makes per call (its own retries).
    pub ec2_max_attempts: u32,
    /// Launch the master on-demand instead of spot (slaves stay spot).
    pub master_on_demand: bool,
    /// How long a (pool, type, subnet) that hit a capacity error is skipped.
    pub capacity_cooldown: Duration,
    /// Instance profile (name or ARN) attached to every node: S3 access
    /// through the instance role, no keys on nodes.
    pub iam_instance_profile: Option<String>,
    /// Which roles may fall back to on-demand when spot keeps failing.
    pub on_demand_fallback: FallbackRoles,
    /// Spot capacity/price failures of a pool, within the window, that
    /// switch it to on-demand.
    pub fallback_failures: u32,
    /// Spot interruptions of a pool, within the window, that do the same.
    pub fallback_interruptions: u32,
    pub fallback_window: Duration,
    /// Replace on-demand slaves of pools back on spot once the cluster has
    /// been idle this long; zero: only at scale changes.
    pub on_demand_idle_replace: Duration,
    /// Where each node's scratch space (instance store) is mounted.
    pub scratch_path: String,
    pub engine: EngineKind,
    /// How long a slave being removed is drained before it is terminated.
    pub drain_timeout: Duration,
    pub dask_version: String,
    pub dask_scheduler_port: u16,
    pub dask_dashboard_port: u16,
    /// Disco install source: `git+URL@REF` or a tarball URL; empty: preinstalled.
    pub disco_source: String,
    pub disco_port: u16,
    pub disco_root: String,
    pub disco_gc_after: u32,
    /// Dashboard and /metrics (HTTP); local by default.
    pub dashboard_listen: SocketAddr,
    /// Bearer token required by the dashboard and /metrics; mandatory when
    /// `dashboard_listen` is not a loopback address.
    pub dashboard_token: Option<Secret>,
}

/// Roles allowed to fall back to on-demand (`on_demand_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackRoles {
    None,
    Slaves,
    Master,
    Both,
}

impl FallbackRoles {
    pub fn covers(self, role: crate::model::Role) -> bool {
        use crate::model::Role;
        matches!(
            (self, role),
            (FallbackRoles::Both, _)
                | (FallbackRoles::Slaves, Role::Slave)
                | (FallbackRoles::Master, Role::Master)
        )
    }
}

/// Which map/reduce engine the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Disco,
    Dask,
    None,
}

/// A secret string: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// A group of slaves of the same kind.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// Instance types, tried in order (then the other pools' types).
    #[serde(alias = "INSTANCE_TYPES")]
    pub instance_types: Vec<String>,
    /// Slaves of this pool at first start; `scale N` keeps the proportions.
    #[serde(alias = "COUNT", default)]
    pub count: u32,
}

/// Keys of the original `config.json` that it marked required (its AWS keys
/// excepted: ddisco prefers the standard credential chain).
const LEGACY_REQUIRED: &[(&str, &str)] = &[
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
    provider: Option<String>,
    #[serde(alias = "REGION")]
    region: Option<String>,
    #[serde(alias = "TAG_KEY")]
    tag_key: Option<String>,
    #[serde(alias = "NUM_SLAVES")]
    num_slaves: Option<i64>,
    #[serde(alias = "MASTER_MULTIPLIER")]
    master_multiplier: Option<f64>,
    #[serde(alias = "SLAVE_MULTIPLIER")]
    slave_multiplier: Option<f64>,
    #[serde(alias = "BASE_PACKAGES")]
    base_packages: Option<Vec<String>>,
    #[serde(alias = "ADDITIONAL_PACKAGES")]
    additional_packages: Option<Vec<String>>,
    #[serde(alias = "PIP_REQUIREMENTS")]
    pip_requirements: Option<Vec<String>>,
    #[serde(alias = "AMI")]
    ami: Option<String>,
    #[serde(alias = "MAX_BID")]
    max_bid: Option<StringOrNumber>,
    #[serde(alias = "INSTANCE_TYPE")]
    instance_type: Option<String>,
    #[serde(alias = "MASTER_INSTANCE_TYPE")]
    master_instance_type: Option<String>,
    #[serde(alias = "SLAVE_INSTANCE_TYPE")]
    slave_instance_type: Option<String>,
    #[serde(alias = "KEY_NAME")]
    key_name: Option<String>,
    #[serde(alias = "SECURITY_GROUPS")]
    security_groups: Option<Vec<String>>,
    #[serde(alias = "MGMT_KEY")]
    mgmt_key: Option<String>,
    #[serde(alias = "POST_INIT")]
    post_init: Option<String>,
    #[serde(alias = "AWS_ACCESS")]
    aws_access: Option<String>,
    #[serde(alias = "AWS_SECRET")]
    aws_secret: Option<String>,
    #[serde(alias = "SSH_USER")]
    ssh_user: Option<String>,
    #[serde(alias = "LISTEN")]
    listen: Option<String>,
    #[serde(alias = "DOWNLOAD_LISTEN")]
    download_listen: Option<String>,
    #[serde(alias = "ADVERTISE")]
    advertise: Option<String>,
    #[serde(alias = "STATE_DIR")]
    state_dir: Option<String>,
    #[serde(alias = "HEARTBEAT_INTERVAL_SECS")]
    heartbeat_interval_secs: Option<f64>,
    #[serde(alias = "HEARTBEAT_TIMEOUT_SECS")]
    heartbeat_timeout_secs: Option<f64>,
    #[serde(alias = "BOOT_TIMEOUT_SECS")]
    boot_timeout_secs: Option<f64>,
    #[serde(alias = "TOKEN_TTL_SECS")]
    token_ttl_secs: Option<f64>,
    #[serde(alias = "RECONCILE_INTERVAL_SECS")]
    reconcile_interval_secs: Option<f64>,
    #[serde(alias = "AGENT_BINARY")]
    agent_binary: Option<String>,
    #[serde(alias = "LOCAL_INSTALL_PACKAGES")]
    local_install_packages: Option<bool>,
    #[serde(alias = "ENDPOINT_URL")]
    endpoint_url: Option<String>,
    #[serde(alias = "SUBNET_IDS")]
    subnet_ids: Option<Vec<String>>,
    #[serde(alias = "SLAVE_POOLS")]
    slave_pools: Option<Vec<Pool>>,
    #[serde(alias = "EC2_MAX_ATTEMPTS")]
    ec2_max_attempts: Option<u32>,
    #[serde(alias = "MASTER_ON_DEMAND")]
    master_on_demand: Option<bool>,
    #[serde(alias = "CAPACITY_COOLDOWN_SECS")]
    capacity_cooldown_secs: Option<f64>,
    #[serde(alias = "IAM_INSTANCE_PROFILE")]
    iam_instance_profile: Option<String>,
    #[serde(alias = "ON_DEMAND_FALLBACK")]
    on_demand_fallback: Option<String>,
    #[serde(alias = "FALLBACK_FAILURES")]
    fallback_failures: Option<u32>,
    #[serde(alias = "FALLBACK_INTERRUPTIONS")]
    fallback_interruptions: Option<u32>,
    #[serde(alias = "FALLBACK_WINDOW_SECS")]
    fallback_window_secs: Option<f64>,
    #[serde(alias = "ON_DEMAND_IDLE_REPLACE_SECS")]
    on_demand_idle_replace_secs: Option<f64>,
    #[serde(alias = "SCRATCH_PATH")]
    scratch_path: Option<String>,
    #[serde(alias = "ENGINE")]
    engine: Option<String>,
    #[serde(alias = "DRAIN_TIMEOUT_SECS")]
    drain_timeout_secs: Option<f64>,
    #[serde(alias = "DASK_VERSION")]
    dask_version: Option<String>,
    #[serde(alias = "DASK_SCHEDULER_PORT")]
    dask_scheduler_port: Option<u16>,
    #[serde(alias = "DASK_DASHBOARD_PORT")]
    dask_dashboard_port: Option<u16>,
    #[serde(alias = "DISCO_SOURCE")]
    disco_source: Option<String>,
    #[serde(alias = "DISCO_PORT")]
    disco_port: Option<u16>,
    #[serde(alias = "DISCO_ROOT")]
    disco_root: Option<String>,
    #[serde(alias = "DISCO_GC_AFTER")]
    disco_gc_after: Option<u32>,
    #[serde(alias = "DASHBOARD_LISTEN")]
    dashboard_listen: Option<String>,
    #[serde(alias = "DASHBOARD_TOKEN")]
    dashboard_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    S(String),
    N(f64),
}

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

/// File format, chosen by extension (`.json` is the original's format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    LegacyJson,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            provider: ProviderKind::Local,
            region: None,
            tag_key: "ddisco".into(),
            num_slaves: 0,
            master_multiplier: 1.0,
            slave_multiplier: 1.0,
            base_packages: strings(&["python3-pip", "python3-venv", "python3-dev", "lighttpd"]),
            additional_packages: strings(&[
                "git",
                "libwww-perl",
                "python3-numpy",
                "python3-scipy",
                "libzmq3-dev",
                "s3cmd",
                "chrony",
                "libguess1",
                "python3-dnspython",
                "python3-dateutil",
                "pigz",
            ]),
            pip_requirements: strings(&["iso8601"]),
            ami: "ubuntu:24.04".into(),
            max_bid: "0.10".into(),
            instance_type: "c5.xlarge".into(),
            master_instance_type: String::new(),
            slave_instance_type: String::new(),
            key_name: String::new(),
            security_groups: vec![],
            mgmt_keys: vec![],
            post_init: String::new(),
            ssh_user: "ubuntu".into(),
            listen: "127.0.0.1:7443".parse().expect("literal"),
            download_listen: "127.0.0.1:7444".parse().expect("literal"),
            advertise: None,
            state_dir: PathBuf::from(".ddisco"),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            boot_timeout: Duration::from_secs(600),
            token_ttl: Duration::from_secs(3600),
            reconcile_interval: Duration::from_secs(2),
            agent_binary: None,
            local_install_packages: false,
            aws_keys_in_file: false,
            aws_keys: None,
            endpoint_url: None,
            subnet_ids: vec![],
            slave_pools: vec![],
            ec2_max_attempts: 3,
            master_on_demand: false,
            capacity_cooldown: Duration::from_secs(300),
            iam_instance_profile: None,
            on_demand_fallback: FallbackRoles::None,
            fallback_failures: 3,
            fallback_interruptions: 3,
            fallback_window: Duration::from_secs(900),
            on_demand_idle_replace: Duration::from_secs(600),
            scratch_path: "/mnt".into(),
            engine: EngineKind::Disco,
            drain_timeout: Duration::from_secs(60),
            dask_version: crate::engine::dask::DASK_VERSION.into(),
            dask_scheduler_port: 8786,
            dask_dashboard_port: 8787,
            disco_source: "git+https://github.com/discoproject/disco.git@0.5.4".into(),
            disco_port: 8989,
            disco_root: "/mnt/disco".into(),
            disco_gc_after: 6400,
            dashboard_listen: "127.0.0.1:7445".parse().expect("literal"),
            dashboard_token: None,
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Config {
    /// Loads and validates `path`. Relative paths inside the file
    /// (`state_dir`, `agent_binary`) are resolved against the file's folder.
    pub fn load(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let format =
            if path.extension().is_some_and(|e| e == "json") { Format::LegacyJson } else { Format::Toml };
        let (mut cfg, notes) = Config::parse(&text, format, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.state_dir.is_relative() {
            cfg.state_dir = base.join(&cfg.state_dir);
        }
        if let Some(bin) = &cfg.agent_binary
            && bin.is_relative()
        {
            cfg.agent_binary = Some(base.join(bin));
        }
        Ok((cfg, notes))
    }

    /// Parses text in the given format. Returns the config and notes for the
    /// user (warnings that do not stop anything). `path` is only for messages.
    pub fn parse(text: &str, format: Format, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let err = |key: Option<String>, message: String| ConfigError { path: path.to_owned(), key, message };
        let raw: RawConfig = match format {
            Format::Toml => {
                let de = toml::Deserializer::parse(text)
                    .map_err(|e| err(None, format!("not valid TOML: {}", e.to_string().trim_end())))?;
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let key = key_of(&e.path().to_string(), e.inner().message());
                    err(key, explain(e.inner().message()))
                })?
            }
            Format::LegacyJson => {
                let mut de = serde_json::Deserializer::from_str(text);
                let value: serde_json::Value = serde::Deserialize::deserialize(&mut de)
                    .map_err(|e| err(None, format!("not valid JSON: {e}")))?;
                if let Some(obj) = value.as_object() {
                    for (upper, _) in LEGACY_REQUIRED {
                        if !obj.contains_key(*upper) && !obj.contains_key(&upper.to_lowercase()) {
                            return Err(err(
                                Some((*upper).to_string()),
                                "required by the original config.json format but missing; \
                                 add it (see `ddisco-controller init`)"
                                    .into(),
                            ));
                        }
                    }
                }
                serde_path_to_error::deserialize(value).map_err(|e| {
                    let inner = e.inner().to_string();
                    let key = key_of(&e.path().to_string(), &inner);
                    err(key, explain(&inner))
                })?
            }
        };
        Config::from_raw(raw, format, path)
    }

    fn from_raw(raw: RawConfig, format: Format, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            path: path.to_owned(),
            key: Some(key.to_string()),
            message,
        };
        let d = Config::default();
        let mut notes = Vec::new();

        let provider = match raw.provider.as_deref() {
            None => {
                if format == Format::LegacyJson {
                    notes.push(
                        "config.json (disposabledisco format): PROVIDER is not set, so the \
                         local provider runs the nodes on this machine; add \"PROVIDER\": \"ec2\" \
                         to launch on EC2"
                            .to_string(),
                    );
                }
                d.provider
            }
            Some("local") => ProviderKind::Local,
            Some("ec2") => ProviderKind::Ec2,
            Some("record") => ProviderKind::Record,
            Some(other) => {
                return Err(err("provider", format!("unknown provider {other:?}; use \"local\" or \"ec2\"")));
            }
        };

        let tag_key = raw.tag_key.unwrap_or(d.tag_key);
        if tag_key.is_empty()
            || tag_key.len() > 100
            || !tag_key.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(err(
                "tag_key",
                format!(
                    "{tag_key:?} is not a usable cluster tag: use 1-100 letters, digits, '-', '_', '.' or ':'"
                ),
            ));
        }

        let num_slaves = match raw.num_slaves {
            None => d.num_slaves,
            Some(n) if n < 0 => {
                return Err(err("num_slaves", format!("must be 0 or more, got {n}")));
            }
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| err("num_slaves", format!("{n} is more than 100000")))?,
        };

        let multiplier = |key: &str, v: Option<f64>, def: f64| -> Result<f64, ConfigError> {
            match v {
                None => Ok(def),
                Some(m) if m.is_finite() && m > 0.0 => Ok(m),
                Some(m) => Err(err(key, format!("must be greater than 0, got {m}"))),
            }
        };
        let master_multiplier = multiplier("master_multiplier", raw.master_multiplier, d.master_multiplier)?;
        let slave_multiplier = multiplier("slave_multiplier", raw.slave_multiplier, d.slave_multiplier)?;

        let max_bid = match raw.max_bid {
            None => d.max_bid,
            Some(StringOrNumber::S(s)) => s,
            Some(StringOrNumber::N(n)) => n.to_string(),
        };
        match max_bid.trim().parse::<f64>() {
            Ok(p) if p.is_finite() && p > 0.0 => {}
            _ => {
                return Err(err(
                    "max_bid",
                    format!("{max_bid:?} is not a price: give USD per instance-hour, e.g. \"0.10\""),
                ));
            }
        }

        let secs = |key: &str, v: Option<f64>, def: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(def),
                Some(s) if s.is_finite() && s > 0.0 && s < 1e7 => Ok(Duration::from_secs_f64(s)),
                Some(s) => Err(err(key, format!("must be a positive number of seconds, got {s}"))),
            }
        };
        let heartbeat_interval =
            secs("heartbeat_interval_secs", raw.heartbeat_interval_secs, d.heartbeat_interval)?;
        let heartbeat_timeout =
            secs("heartbeat_timeout_secs", raw.heartbeat_timeout_secs, d.heartbeat_timeout)?;
        if heartbeat_timeout < heartbeat_interval * 2 {
            return Err(err(
                "heartbeat_timeout_secs",
                format!(
                    "{:.1}s must be at least twice heartbeat_interval_secs ({:.1}s), or one late heartbeat replaces a healthy node",
                    heartbeat_timeout.as_secs_f64(),
                    heartbeat_interval.as_secs_f64()
                ),
            ));
        }
        let boot_timeout = secs("boot_timeout_secs", raw.boot_timeout_secs, d.boot_timeout)?;
        let capacity_cooldown =
            secs("capacity_cooldown_secs", raw.capacity_cooldown_secs, d.capacity_cooldown)?;
        let fallback_window = secs("fallback_window_secs", raw.fallback_window_secs, d.fallback_window)?;
        let on_demand_idle_replace = match raw.on_demand_idle_replace_secs {
            Some(0.0) => Duration::ZERO,
            other => secs("on_demand_idle_replace_secs", other, d.on_demand_idle_replace)?,
        };
        let on_demand_fallback = match raw.on_demand_fallback.as_deref() {
            None => d.on_demand_fallback,
            Some("none") => FallbackRoles::None,
            Some("slaves") => FallbackRoles::Slaves,
            Some("master") => FallbackRoles::Master,
            Some("both") => FallbackRoles::Both,
            Some(other) => {
                return Err(err(
                    "on_demand_fallback",
                    format!("{other:?}: use \"none\", \"slaves\", \"master\" or \"both\""),
                ));
            }
        };
        for (key, v) in [
            ("fallback_failures", raw.fallback_failures),
            ("fallback_interruptions", raw.fallback_interruptions),
        ] {
            if v == Some(0) {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        let iam_instance_profile =
            raw.iam_instance_profile.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(p) = &iam_instance_profile
            && !is_instance_profile(p)
        {
            return Err(err(
                "iam_instance_profile",
                format!(
                    "{p:?} is neither an instance profile name (letters, digits and +=,.@_-, up to 128) nor its \
                     ARN (arn:aws:iam::ACCOUNT:instance-profile/NAME)"
                ),
            ));
        }
        let scratch_path = raw.scratch_path.unwrap_or(d.scratch_path.clone());
        if !scratch_path.starts_with('/') || scratch_path == "/" || scratch_path.contains("..") {
            return Err(err(
                "scratch_path",
                format!("{scratch_path:?}: use an absolute directory such as \"/mnt\""),
            ));
        }
        let drain_timeout = match raw.drain_timeout_secs {
            Some(0.0) => Duration::ZERO,
            other => secs("drain_timeout_secs", other, d.drain_timeout)?,
        };
        let engine = match raw.engine.as_deref() {
            None => d.engine,
            Some("disco") => EngineKind::Disco,
            Some("dask") => EngineKind::Dask,
            Some("none") => EngineKind::None,
            Some(other) => {
                return Err(err(
                    "engine",
                    format!("unknown engine {other:?}; use \"disco\", \"dask\" or \"none\""),
                ));
            }
        };
        if raw.disco_root.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(err("disco_root", "must be an absolute path, e.g. \"/mnt/disco\"".into()));
        }
        let token_ttl = secs("token_ttl_secs", raw.token_ttl_secs, d.token_ttl)?;
        let reconcile_interval =
            secs("reconcile_interval_secs", raw.reconcile_interval_secs, d.reconcile_interval)?;

        let addr = |key: &str, v: Option<String>, def: SocketAddr| -> Result<SocketAddr, ConfigError> {
            match v {
                None => Ok(def),
                Some(s) => s.parse().map_err(|_| {
                    err(key, format!("{s:?} is not an address: use IP:PORT, e.g. \"0.0.0.0:7443\""))
                }),
            }
        };
        let listen = addr("listen", raw.listen, d.listen)?;
        let download_listen = addr("download_listen", raw.download_listen, d.download_listen)?;
        let dashboard_listen = addr("dashboard_listen", raw.dashboard_listen, d.dashboard_listen)?;
        let dashboard_token = non_empty_secret(raw.dashboard_token);
        if !dashboard_listen.ip().is_loopback() && dashboard_token.is_none() {
            return Err(err(
                "dashboard_token",
                format!(
                    "required because dashboard_listen ({dashboard_listen}) is not a loopback address: \
                     anyone who reaches it would see the cluster; set a long random token"
                ),
            ));
        }

        let aws_keys_in_file = raw.aws_access.is_some() || raw.aws_secret.is_some();
        if raw.aws_access.is_some() != raw.aws_secret.is_some() {
            return Err(err("aws_secret", "give both AWS_ACCESS and AWS_SECRET, or neither".into()));
        }
        if aws_keys_in_file {
            notes.push(format!(
                "{}: AWS_ACCESS/AWS_SECRET found in the config file. They are accepted, but keys \
                 in files leak: prefer the standard AWS credential chain (environment, profile, \
                 SSO, instance role) and remove them from the file",
                path.display()
            ));
        }

        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let mgmt_keys = raw
            .mgmt_key
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();

        let cfg = Config {
            provider,
            region: non_empty(raw.region),
            tag_key,
            num_slaves,
            master_multiplier,
            slave_multiplier,
            base_packages: raw.base_packages.unwrap_or(d.base_packages),
            additional_packages: raw.additional_packages.unwrap_or(d.additional_packages),
            pip_requirements: raw.pip_requirements.unwrap_or(d.pip_requirements),
            ami: raw.ami.unwrap_or(d.ami),
            max_bid,
            instance_type: raw.instance_type.unwrap_or(d.instance_type),
            master_instance_type: raw.master_instance_type.unwrap_or_default(),
            slave_instance_type: raw.slave_instance_type.unwrap_or_default(),
            key_name: raw.key_name.unwrap_or_default(),
            security_groups: raw.security_groups.unwrap_or_default(),
            mgmt_keys,
            post_init: raw.post_init.unwrap_or_default(),
            ssh_user: raw.ssh_user.unwrap_or(d.ssh_user),
            listen,
            download_listen,
            advertise: non_empty(raw.advertise),
            state_dir: non_empty(raw.state_dir).map(PathBuf::from).unwrap_or(d.state_dir),
            heartbeat_interval,
            heartbeat_timeout,
            boot_timeout,
            token_ttl,
            reconcile_interval,
            agent_binary: non_empty(raw.agent_binary).map(PathBuf::from),
            local_install_packages: raw.local_install_packages.unwrap_or(false),
            aws_keys_in_file,
            aws_keys: match (raw.aws_access, raw.aws_secret) {
                (Some(a), Some(s))
                    if !a.trim().is_empty() && !s.trim().is_empty() && !a.contains("FILL THIS") =>
                {
                    Some((a, Secret(s)))
                }
                _ => None,
            },
            endpoint_url: non_empty(raw.endpoint_url),
            subnet_ids: raw.subnet_ids.unwrap_or_default(),
            slave_pools: raw.slave_pools.unwrap_or_default(),
            ec2_max_attempts: raw.ec2_max_attempts.unwrap_or(d.ec2_max_attempts).clamp(1, 10),
            master_on_demand: raw.master_on_demand.unwrap_or(false),
            capacity_cooldown,
            iam_instance_profile,
            on_demand_fallback,
            fallback_failures: raw.fallback_failures.unwrap_or(d.fallback_failures),
            fallback_interruptions: raw.fallback_interruptions.unwrap_or(d.fallback_interruptions),
            fallback_window,
            on_demand_idle_replace,
            scratch_path,
            engine,
            drain_timeout,
            dask_version: non_empty(raw.dask_version).unwrap_or(d.dask_version),
            dask_scheduler_port: raw.dask_scheduler_port.unwrap_or(d.dask_scheduler_port),
            dask_dashboard_port: raw.dask_dashboard_port.unwrap_or(d.dask_dashboard_port),
            disco_source: raw.disco_source.unwrap_or(d.disco_source),
            disco_port: raw.disco_port.unwrap_or(d.disco_port),
            disco_root: raw.disco_root.unwrap_or(d.disco_root),
            disco_gc_after: raw.disco_gc_after.unwrap_or(d.disco_gc_after),
            dashboard_listen,
            dashboard_token,
        };
        for (key, list) in
            [("base_packages", &cfg.base_packages), ("additional_packages", &cfg.additional_packages)]
        {
            if let Some(bad) = list.iter().find(|p| !is_package_name(p)) {
                return Err(err(key, format!("{bad:?} is not a Debian package name")));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in cfg.slave_pools.iter().enumerate() {
            let key = format!("slave_pools[{i}]");
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(err(&key, format!("name {:?}: use letters, digits, '-', '_' or '.'", p.name)));
            }
            if !names.insert(p.name.clone()) {
                return Err(err(&key, format!("pool name {:?} is used twice", p.name)));
            }
            if p.instance_types.is_empty() {
                return Err(err(&key, format!("pool {:?} names no instance_types", p.name)));
            }
        }
        if !cfg.slave_pools.is_empty() && raw.num_slaves.is_some_and(|n| n != 0) {
            return Err(err(
                "num_slaves",
                "set either num_slaves or the counts of slave_pools, not both".into(),
            ));
        }
        if cfg.provider == ProviderKind::Ec2 {
            if cfg.ami.trim().is_empty() {
                return Err(err(
                    "ami",
                    "required with provider = \"ec2\": an official Ubuntu image alias such as \"ubuntu:24.04\", \
                     or an image id (ami-...)"
                        .into(),
                ));
            }
            if let Err(e) = crate::provider::images::parse(&cfg.ami) {
                return Err(err("ami", e));
            }
            if cfg.security_groups.is_empty() {
                return Err(err(
                    "security_groups",
                    "required with provider = \"ec2\": at least one group (id sg-... or name)".into(),
                ));
            }
            if cfg.advertise.is_none() {
                return Err(err(
                    "advertise",
                    "required with provider = \"ec2\": the host name or IP instances use to reach this \
                     controller"
                        .into(),
                ));
            }
        }
        if cfg.provider == ProviderKind::Ec2
            && cfg.engine == EngineKind::Disco
            && !Path::new(&cfg.disco_root).starts_with(&cfg.scratch_path)
        {
            notes.push(format!(
                "disco_root {:?} is not under scratch_path {:?}: Disco's data will be on the root volume, not \
                 on instance store",
                cfg.disco_root, cfg.scratch_path
            ));
        }
        Ok((cfg, notes))
    }

    pub fn master_instance_type(&self) -> &str {
        if self.master_instance_type.is_empty() { &self.instance_type } else { &self.master_instance_type }
    }

    pub fn slave_instance_type(&self) -> &str {
        if self.slave_instance_type.is_empty() { &self.instance_type } else { &self.slave_instance_type }
    }

    /// The slave pools in force: as configured, or one pool named
    /// `default` of `slave_instance_type` x `num_slaves`.
    pub fn pools(&self) -> Vec<Pool> {
        if self.slave_pools.is_empty() {
            vec![Pool {
                name: DEFAULT_POOL.into(),
                instance_types: vec![self.slave_instance_type().to_string()],
                count: self.num_slaves,
            }]
        } else {
            self.slave_pools.clone()
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
}

/// The pool of a cluster configured with `num_slaves` only.
pub const DEFAULT_POOL: &str = "default";

/// The master's pool name.
pub const MASTER_POOL: &str = "master";

/// An IAM instance profile name, or an instance profile ARN.
fn is_instance_profile(v: &str) -> bool {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 128
            && n.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
    };
    match v.strip_prefix("arn:") {
        Some(rest) => {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            parts.len() == 5
                && parts[0].starts_with("aws")
                && parts[1] == "iam"
                && parts[3].len() == 12
                && parts[3].chars().all(|c| c.is_ascii_digit())
                && parts[4]
                    .strip_prefix("instance-profile/")
                    .is_some_and(|p| p.rsplit('/').next().is_some_and(name_ok))
        }
        None => name_ok(v),
    }
}

fn non_empty_secret(v: Option<String>) -> Option<Secret> {
    v.filter(|s| !s.trim().is_empty()).map(Secret)
}

/// Debian package names: lower-case alphanumerics and `+-.`, optionally
/// `:arch` or `=version`. Refusing anything else keeps them shell-safe.
fn is_package_name(p: &str) -> bool {
    !p.is_empty()
        && p.len() < 200
        && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.:=~".contains(c))
}

/// The key a serde error is about: its path, or the field named in an
/// "unknown field `x`" message.
fn key_of(path: &str, message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        return Some(rest[..end].to_string());
    }
    (!path.is_empty() && path != ".").then(|| path.to_string())
}

/// A serde message made for people: an unknown key gets the closest
/// accepted one ("did you mean") instead of the list of all ~120.
fn explain(message: &str) -> String {
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

/// The commented configuration `ddisco-controller init` prints. Parsing it
/// gives exactly `Config::default()` (a unit test holds them together).
pub fn template(mgmt_key: Option<&str>) -> String {
    let mgmt = mgmt_key.unwrap_or("").trim();
    format!(
        r#"# ddisco cluster configuration (TOML). Every setting is shown with its default.
# The original disposabledisco config.json (upper-case keys) is accepted as-is too.

# Where nodes run: "local" (processes on this machine, no cloud account) or "ec2".
provider = "local"
# EC2 region; empty: the standard AWS chain (AWS_REGION, profile).
region = ""
# Marks every resource of this cluster; must be unique per cluster.  (TAG_KEY)
tag_key = "ddisco"
# Number of slaves; change a running cluster with `ddisco-controller scale N`.  (NUM_SLAVES)
num_slaves = 0
# Map/reduce engine the nodes run: "disco", "dask" or "none".
engine = "disco"
# A slave being removed is drained (Disco: blacklisted; Dask: retired) this
# long before it is terminated; 0: terminate at once.
drain_timeout_secs = 60.0
# Engine workers per node = max(1, floor(cores x multiplier)).
master_multiplier = 1.0
slave_multiplier = 1.0

# Packages every node gets (apt), then pip requirements (into a virtualenv).
base_packages = ["python3-pip", "python3-venv", "python3-dev", "lighttpd"]
additional_packages = ["git", "libwww-perl", "python3-numpy", "python3-scipy", "libzmq3-dev", "s3cmd", "chrony", "libguess1", "python3-dnspython", "python3-dateutil", "pigz"]
pip_requirements = ["iso8601"]
# Bash run as root after everything else on every node.
post_init = ""

# EC2 settings (provider = "ec2").
# Image: an official Ubuntu LTS alias ("ubuntu:24.04", "ubuntu:22.04", ...),
# resolved per region and architecture to Canonical's newest server image,
# or an image id (ami-...).
ami = "ubuntu:24.04"
# Spot max price per instance-hour, USD.
max_bid = "0.10"
instance_type = "c5.xlarge"
# Empty: instance_type.
master_instance_type = ""
slave_instance_type = ""
# EC2 key pair for ssh as ssh_user.
key_name = ""
security_groups = []
ssh_user = "ubuntu"
# EC2-compatible endpoint (e.g. moto, LocalStack); empty: AWS.
endpoint_url = ""
# Subnets (and so zones) to launch into, tried in order; empty: default VPC.
subnet_ids = []
# Attempts per EC2 call made by the AWS SDK itself.
ec2_max_attempts = 3
# Run the master on-demand (it holds the cluster together; slaves stay spot).
master_on_demand = false
# A type/subnet that reported no capacity is skipped this long.
capacity_cooldown_secs = 300.0
# On-demand fallback: "none", "slaves", "master" or "both". A pool whose spot
# launches failed for capacity or price fallback_failures times, or whose
# spot nodes were interrupted fallback_interruptions times, within
# fallback_window_secs launches on-demand until that many seconds pass
# quietly; then new nodes are spot again, and its on-demand slaves are
# replaced by spot ones at the next scale change or once the cluster has been
# idle (every node's load below 0.1 per core) for
# on_demand_idle_replace_secs (0: only at scale changes).
on_demand_fallback = "none"
fallback_failures = 3
fallback_interruptions = 3
fallback_window_secs = 900.0
on_demand_idle_replace_secs = 600.0
# Instance profile (name or ARN) for every node: jobs reach S3 through the
# instance role; no AWS key ever goes to a node.
iam_instance_profile = ""
# Scratch space: instance-store volumes (striped if several) are formatted
# and mounted here; without instance store, a directory on the root volume.
scratch_path = "/mnt"
# Slave pools: different instance types with counts (instead of num_slaves).
# Types are tried in order on capacity errors, then the other pools' types.
# [[slave_pools]]
# name = "c5"
# instance_types = ["c5.xlarge", "c5a.xlarge"]
# count = 10
# [[slave_pools]]
# name = "m5"
# instance_types = ["m5.xlarge"]
# count = 10
# Public keys (one per line) added to every node's authorized_keys.
mgmt_key = "{mgmt}"

# Disco engine: install source ("git+URL@REF" or a tarball URL, built with
# make install / make install-node; empty: Disco is preinstalled on the AMI),
# its port, DISCO_ROOT (instance store) and DISCO_GC_AFTER.
disco_source = "git+https://github.com/discoproject/disco.git@0.5.4"
disco_port = 8989
disco_root = "/mnt/disco"
disco_gc_after = 6400

# Dask engine: version installed with pip on every node; scheduler and
# dashboard ports on the master.
dask_version = "{dask}"
dask_scheduler_port = 8786
dask_dashboard_port = 8787

# Dashboard and Prometheus /metrics (HTTP). Local by default; any other
# address requires dashboard_token (sent as "Authorization: Bearer <token>").
dashboard_listen = "127.0.0.1:7445"
dashboard_token = ""

# Controller.
# gRPC (agents, TLS) and agent download (HTTPS) listen addresses.
listen = "127.0.0.1:7443"
download_listen = "127.0.0.1:7444"
# Host name or IP nodes use to reach the controller; empty: the listen IP
# (127.0.0.1 when listening on 0.0.0.0).
advertise = ""
# CA, certificates, node records, admin socket, local nodes. Relative paths
# are resolved against this file's folder.
state_dir = ".ddisco"
heartbeat_interval_secs = 5.0
# A node silent for this long is lost and replaced.
heartbeat_timeout_secs = 15.0
# A node that has not enrolled this long after launch is replaced.
boot_timeout_secs = 600.0
# Lifetime of a node's one-time bootstrap token.
token_ttl_secs = 3600.0
reconcile_interval_secs = 2.0
# The agent binary served to nodes; empty: ddisco-agent next to this program.
agent_binary = ""
# Local provider: install missing apt packages on this host (changes the host!).
local_install_packages = false
"#,
        dask = crate::engine::dask::DASK_VERSION,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Format::Toml, Path::new("c.toml")).map(|(c, _)| c)
    }

    fn json(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        Config::parse(text, Format::LegacyJson, Path::new("config.json"))
    }

    #[test]
    fn template_parses_to_defaults() {
        assert_eq!(toml(&template(None)).unwrap(), Config::default());
    }

    #[test]
    fn template_carries_mgmt_key() {
        let c = toml(&template(Some("ssh-ed25519 AAAA me@host\n"))).unwrap();
        assert_eq!(c.mgmt_keys, vec!["ssh-ed25519 AAAA me@host".to_string()]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = toml("num_slavez = 3").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("num_slavez"));
        assert!(e.to_string().starts_with("c.toml: key `num_slavez`"), "{e}");
        // The closest key is suggested, not the list of all of them.
        assert!(e.message.contains("did you mean `num_slaves`?"), "{e}");
        assert!(!e.message.contains("provider"), "{e}");
        let e = toml("slave_multipler = 2").unwrap_err();
        assert!(e.message.contains("did you mean `slave_multiplier`?"), "{e}");
        let e = toml("completely_different = 1").unwrap_err();
        assert!(e.message.starts_with("unknown key (`ddisco-controller init`"), "{e}");
        // Inside a pool, and in the original's upper-case spelling.
        let e = toml("[[slave_pools]]\nname = \"a\"\ninstance_typs = [\"x\"]").unwrap_err();
        assert!(e.message.contains("did you mean `instance_types`?"), "{e}");
        let e = json(&ORIGINAL.replace("\"POST_INIT\"", "\"POST_INT\"")).unwrap_err();
        assert!(e.message.contains("did you mean `POST_INIT`?"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = toml("num_slaves = \"three\"").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("num_slaves"), "{e}");
    }

    #[test]
    fn impossible_values_are_named() {
        for (text, key) in [
            ("num_slaves = -1", "num_slaves"),
            ("master_multiplier = 0", "master_multiplier"),
            ("slave_multiplier = -0.5", "slave_multiplier"),
            ("max_bid = \"cheap\"", "max_bid"),
            ("heartbeat_interval_secs = 5.0\nheartbeat_timeout_secs = 6.0", "heartbeat_timeout_secs"),
            ("listen = \"nowhere\"", "listen"),
            ("tag_key = \"\"", "tag_key"),
            ("provider = \"gcp\"", "provider"),
            ("base_packages = [\"rm -rf /\"]", "base_packages"),
            ("engine = \"spark\"", "engine"),
            ("dashboard_listen = \"0.0.0.0:7445\"", "dashboard_token"),
            ("disco_root = \"mnt\"", "disco_root"),
            ("on_demand_fallback = \"always\"", "on_demand_fallback"),
            ("fallback_failures = 0", "fallback_failures"),
            ("fallback_window_secs = -1", "fallback_window_secs"),
            ("iam_instance_profile = \"has space\"", "iam_instance_profile"),
            ("iam_instance_profile = \"arn:aws:iam::12:instance-profile/x\"", "iam_instance_profile"),
            ("scratch_path = \"mnt\"", "scratch_path"),
            ("scratch_path = \"/\"", "scratch_path"),
        ] {
            let e = toml(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
    }

    const ORIGINAL: &str = r#"{
        "BASE_PACKAGES": ["python-pip", "python-dev", "lighttpd"],
        "ADDITIONAL_PACKAGES": ["git"],
        "PIP_REQUIREMENTS": ["iso8601"],
        "AWS_ACCESS": "IMPORTANT FILL THIS!!!1",
        "AWS_SECRET": "IMPORTANT FILL THIS!!!1",
        "AMI": "ami-6d3f9704",
        "MAX_BID": "0.10",
        "INSTANCE_TYPE": "c1.xlarge",
        "KEY_NAME": "",
        "SECURITY_GROUPS": ["disco"],
        "MGMT_KEY": "ssh-rsa AAAA a@b\nssh-rsa BBBB c@d",
        "TAG_KEY": "disposabledisco",
        "NUM_SLAVES": 3,
        "MASTER_MULTIPLIER": 2,
        "SLAVE_MULTIPLIER": 1,
        "POST_INIT": ""
    }"#;

    #[test]
    fn pools_default_and_configured() {
        let c = toml("num_slaves = 4\nslave_instance_type = \"m5.large\"").unwrap();
        assert_eq!(
            c.pools(),
            vec![Pool { name: "default".into(), instance_types: vec!["m5.large".into()], count: 4 }]
        );
        let c = toml(
            "[[slave_pools]]\nname = \"a\"\ninstance_types = [\"c5.large\"]\ncount = 2\n\
             [[slave_pools]]\nname = \"b\"\ninstance_types = [\"m5.large\", \"m5a.large\"]\ncount = 3\n",
        )
        .unwrap();
        assert_eq!(c.pools().len(), 2);
        assert_eq!(c.pools()[1].instance_types.len(), 2);
        for (text, key) in [
            ("num_slaves = 2\n[[slave_pools]]\nname = \"a\"\ninstance_types = [\"x\"]", "num_slaves"),
            ("[[slave_pools]]\nname = \"a\"\ninstance_types = []", "slave_pools[0]"),
            (
                "[[slave_pools]]\nname = \"a\"\ninstance_types = [\"x\"]\n[[slave_pools]]\nname = \"a\"\ninstance_types = [\"y\"]",
                "slave_pools[1]",
            ),
        ] {
            assert_eq!(toml(text).unwrap_err().key.as_deref(), Some(key), "{text}");
        }
    }

    #[test]
    fn instance_profile_names_and_arns() {
        for ok in [
            "ddisco-nodes",
            "a+b=c,d.e@f_g",
            "arn:aws:iam::123456789012:instance-profile/ddisco-nodes",
            "arn:aws-cn:iam::123456789012:instance-profile/path/x",
        ] {
            assert!(is_instance_profile(ok), "{ok}");
        }
        for bad in ["", "a b", "arn:aws:iam::123456789012:role/x", "arn:aws:s3:::bucket"] {
            assert!(!is_instance_profile(bad), "{bad}");
        }
        let c = toml("iam_instance_profile = \"ddisco-nodes\"\non_demand_fallback = \"both\"").unwrap();
        assert_eq!(c.iam_instance_profile.as_deref(), Some("ddisco-nodes"));
        assert_eq!(c.on_demand_fallback, FallbackRoles::Both);
        assert!(FallbackRoles::Slaves.covers(crate::model::Role::Slave));
        assert!(!FallbackRoles::Slaves.covers(crate::model::Role::Master));
    }

    #[test]
    fn ec2_requires_what_it_needs() {
        let base = "provider = \"ec2\"\n";
        // The image defaults to the newest Ubuntu LTS alias.
        assert_eq!(toml(base).unwrap_err().key.as_deref(), Some("security_groups"));
        for bad in ["ami = \"\"", "ami = \"ubuntu:18.04\"", "ami = \"centos:7\"", "ami = \"ami-zz\""] {
            assert_eq!(toml(&format!("{base}{bad}\n")).unwrap_err().key.as_deref(), Some("ami"), "{bad}");
        }
        let t = format!("{base}ami = \"ami-1\"\n");
        assert_eq!(toml(&t).unwrap_err().key.as_deref(), Some("security_groups"));
        let t = format!("{t}security_groups = [\"sg-1\"]\n");
        assert_eq!(toml(&t).unwrap_err().key.as_deref(), Some("advertise"));
        let t = format!("{t}advertise = \"10.0.0.5\"\n");
        assert_eq!(toml(&t).unwrap().provider, ProviderKind::Ec2);
    }

    #[test]
    fn original_config_json_is_accepted() {
        let (c, notes) = json(ORIGINAL).unwrap();
        assert_eq!(c.num_slaves, 3);
        assert_eq!(c.tag_key, "disposabledisco");
        assert_eq!(c.master_multiplier, 2.0);
        assert_eq!(c.mgmt_keys.len(), 2);
        assert_eq!(c.master_instance_type(), "c1.xlarge");
        assert!(c.aws_keys_in_file);
        assert!(notes.iter().any(|n| n.contains("credential chain")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("PROVIDER")), "{notes:?}");
    }

    #[test]
    fn original_missing_required_key_is_named() {
        let text = ORIGINAL.replace("\"TAG_KEY\": \"disposabledisco\",", "");
        let e = json(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("TAG_KEY"), "{e}");
    }

    #[test]
    fn original_wrong_type_is_named() {
        let text = ORIGINAL.replace("\"NUM_SLAVES\": 3", "\"NUM_SLAVES\": \"3\"");
        let e = json(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("NUM_SLAVES"), "{e}");
    }

    #[test]
    fn numeric_max_bid_is_accepted() {
        let text = ORIGINAL.replace("\"MAX_BID\": \"0.10\"", "\"MAX_BID\": 0.25");
        assert_eq!(json(&text).unwrap().0.max_bid, "0.25");
    }
}
