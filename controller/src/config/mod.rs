//! Cluster configuration: the TOML file `init` prints, and the original
//! disposabledisco `config.json` (upper-case keys), accepted unchanged.
//!
//! Parsing goes through [`RawConfig`] (every key optional, unknown keys
//! refused, each key also accepted in the original's upper-case spelling),
//! then [`Config::from_raw`] applies defaults and validates. Every error names
//! the file and the key.

pub mod image;
mod raw;
pub mod requirements;
mod template;
mod validate;

pub use raw::RawConfig;
pub use template::template;

use raw::{LEGACY_REQUIRED, explain, key_of};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which infrastructure runs the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    pub tag_key: String,
    pub num_slaves: u32,
    pub master_multiplier: f64,
    pub slave_multiplier: f64,
    pub base_packages: Vec<String>,
    pub additional_packages: Vec<String>,
    pub pip_requirements: Vec<String>,
    /// Where nodes get their Python packages from.
    pub pip_source: PipSource,
    /// The nodes' Python ("3.12"); empty: found out (the local provider:
    /// this host's python3; EC2: the Ubuntu image's).
    pub node_python: String,
    pub instance_type: String,
    pub master_instance_type: String,
    pub slave_instance_type: String,
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
    /// Lifetime of a node's client certificate (renewed at two thirds).
    pub cert_validity: Duration,
    pub reconcile_interval: Duration,
    pub agent_binary: Option<PathBuf>,
    /// The arm64 (aarch64) agent served to Graviton nodes; `None`: pools of
    /// arm64 types are refused at preflight.
    pub agent_binary_arm64: Option<PathBuf>,
    /// Local provider only: allow `apt-get install` of missing packages.
    pub local_install_packages: bool,
    /// Local provider only: every node a "machine" of its own (network, UTS,
    /// mount and PID namespaces, its own `/etc`, sshd, an address on a
    /// bridge). Root only.
    pub local_machines: bool,
    /// Slave pools as configured (empty: one pool from num_slaves).
    pub slave_pools: Vec<Pool>,
    /// Replace on-demand slaves of pools back on spot once the cluster has
    /// been idle this long; zero: only at scale changes.
    pub on_demand_idle_replace: Duration,
    /// Where each node's scratch space (instance store) is mounted.
    pub scratch_path: String,
    pub engine: EngineKind,
    /// How long a slave being removed is drained before it is terminated.
    pub drain_timeout: Duration,
    /// Spend cap in USD over the cost estimate (0: none).
    pub max_spend_usd: f64,
    /// What reaching the cap does (launches stop either way).
    pub on_budget: crate::budget::OnBudget,
    /// Destroy the cluster after this long idle (zero: never).
    pub autostop_idle: Duration,
    /// `scale MIN..MAX`: how long the engine's target must stay below the
    /// size before it shrinks.
    pub adaptive_cooldown: Duration,
    /// The nodes' dead man's switch: a node without a session with this
    /// controller for this long shuts itself down (zero: never).
    pub orphan_timeout: Duration,
    /// The failure budget: the same step failing on this many nodes within
    /// `failure_window` holds their replacements (0: always replace).
    pub failure_budget: u32,
    pub failure_window: Duration,
    /// Destroy the cluster this long after `serve` started it (zero:
    /// never): a hard wall-clock limit, jobs or not.
    pub max_runtime: Duration,
    /// Dashboard and /metrics (HTTP); local by default.
    pub dashboard_listen: SocketAddr,
    /// Bearer token required by the dashboard and /metrics; mandatory when
    /// `dashboard_listen` is not a loopback address.
    pub dashboard_token: Option<Secret>,
    /// EC2 settings (provider = "ec2"): all the EC2 provider sees of the file.
    pub ec2: Ec2Config,
    pub dask: DaskConfig,
    pub disco: DiscoConfig,
    /// Set by `bake`, never by a file: this control plane provisions one
    /// node with the image steps of both roles' plans and seals it for the
    /// image of this name.
    pub bake: Option<String>,
}

/// The EC2 section: every setting only the EC2 provider reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Ec2Config {
    pub region: Option<String>,
    /// Root volume size (GiB, gp3) of every node; 0: the image's.
    pub root_volume_gb: u32,
    pub ami: String,
    pub max_bid: String,
    pub key_name: String,
    pub security_groups: Vec<String>,
    /// Legacy AWS keys found in the file (the credential chain is preferred).
    pub aws_keys_in_file: bool,
    /// The legacy AWS_ACCESS / AWS_SECRET values, when given.
    pub aws_keys: Option<(String, Secret)>,
    /// EC2-compatible endpoint (moto, LocalStack); `None`: AWS itself.
    pub endpoint_url: Option<String>,
    /// Subnets to launch into, tried in order; empty: the default VPC.
    pub subnet_ids: Vec<String>,
    /// Attempts the AWS SDK makes per call (its own retries).
    pub ec2_max_attempts: u32,
    /// Launch the master on-demand instead of spot (slaves stay spot).
    pub master_on_demand: bool,
    /// How long a (pool, type, subnet) that hit a capacity error is skipped.
    pub capacity_cooldown: Duration,
    /// How launches place nodes across zones.
    pub spread: Spread,
    /// Instance profile (name or ARN) attached to every node: S3 access
    /// through the instance role, no keys on nodes.
    pub iam_instance_profile: Option<String>,
    /// How long after the first "Invalid IAM Instance Profile" launches
    /// retry (IAM takes a while to show a new profile to EC2) before it is
    /// a configuration error.
    pub iam_propagation: Duration,
    /// PEM certificate whose key signs the instance identity documents
    /// (`None`: AWS's certificate for most regions, built in).
    pub identity_certificate: Option<PathBuf>,
    /// Which roles may fall back to on-demand when spot keeps failing.
    pub on_demand_fallback: FallbackRoles,
    /// Spot capacity/price failures of a pool, within the window, that
    /// switch it to on-demand.
    pub fallback_failures: u32,
    /// Spot interruptions of a pool, within the window, that do the same.
    pub fallback_interruptions: u32,
    pub fallback_window: Duration,
}

/// The Dask engine's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaskConfig {
    pub version: String,
    /// Dask's optional parts installed with it (`dask[distributed,<extras>]`),
    /// e.g. "dataframe" (pandas, pyarrow) or "array".
    pub extras: Vec<String>,
    pub scheduler_port: u16,
    pub dashboard_port: u16,
}

/// The Disco engine's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoConfig {
    /// Disco install source: `git+URL@REF` or a tarball URL; empty: preinstalled.
    pub source: String,
    pub port: u16,
    pub root: String,
    pub gc_after: u32,
    /// Where Disco lives on the nodes (`DISCO_HOME`): a relocatable build
    /// of `scripts/build-disco`, run as `python3 <home>/bin/disco`; empty:
    /// installed by `make install` (`/usr/lib/disco`, `disco` on PATH).
    pub home: String,
    /// The Disco build (`disco.tar.gz` of `scripts/build-disco`) the
    /// controller serves; every node installs it (checked by digest) into
    /// its Disco home. `None`: no such step.
    pub bundle: Option<PathBuf>,
}

/// What the EC2 provider needs to know of the nodes besides its section.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeShape {
    /// Marks every resource of the cluster.
    pub tag_key: String,
    pub master_instance_type: String,
    pub pools: Vec<Pool>,
    pub ssh_user: String,
    pub scratch_path: String,
    /// Architectures an agent is served for (`x86_64` always; `arm64` with
    /// `agent_binary_arm64`).
    pub agent_archs: Vec<String>,
}

/// Roles allowed to fall back to on-demand (`on_demand_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// How launches place nodes across zones (`spread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// The cheapest candidate with capacity, whatever its zone.
    #[default]
    None,
    /// The zone holding the fewest of the role's nodes first, then the
    /// cheapest there; one call puts at most that zone's share there.
    Zones,
}

/// Where nodes get their Python packages (`pip_requirements` and the
/// engine's) from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipSource {
    /// Prepared once by the controller, served over its download port:
    /// nodes contact no package index.
    Controller,
    /// Every node pip-installs from the package index itself.
    Index,
}

/// Which map/reduce engine the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// A group of slaves of the same kind: its instance types, or the
/// requirements they resolve from (EC2, at preflight).
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// Instance types, tried in order (then the other pools' types).
    #[serde(alias = "INSTANCE_TYPES", default)]
    pub instance_types: Vec<String>,
    /// Slaves of this pool at first start; `scale N` keeps the proportions.
    #[serde(alias = "COUNT", default)]
    pub count: u32,
    /// Instead of `instance_types`: a vCPU range ("4..8", "4..", "4").
    #[serde(default)]
    pub vcpus: String,
    /// Instead of `instance_types`: a memory range in GiB ("16..").
    #[serde(default)]
    pub memory_gib: String,
    /// With requirements: `x86_64` (default) or `arm64`.
    #[serde(default)]
    pub arch: String,
    /// With requirements: types left out (`t*`, `*.metal`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// With requirements: at most this many types (10).
    #[serde(default)]
    pub max_types: Option<usize>,
}

impl Pool {
    /// The pool's requirements, if it sizes by them (checked at load).
    pub fn requirements(&self) -> Option<requirements::Requirements> {
        requirements::parse(&self.vcpus, &self.memory_gib, &self.arch, &self.exclude, self.max_types)
            .ok()
            .flatten()
    }
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
            pip_source: PipSource::Controller,
            node_python: String::new(),
            instance_type: "c5.xlarge".into(),
            master_instance_type: String::new(),
            slave_instance_type: String::new(),
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
            cert_validity: Duration::from_secs(30 * 86_400),
            reconcile_interval: Duration::from_secs(2),
            agent_binary: None,
            agent_binary_arm64: None,
            local_install_packages: false,
            local_machines: false,
            slave_pools: vec![],
            on_demand_idle_replace: Duration::from_secs(600),
            scratch_path: "/mnt".into(),
            engine: EngineKind::Disco,
            drain_timeout: Duration::from_secs(60),
            max_spend_usd: 0.0,
            on_budget: crate::budget::OnBudget::Destroy,
            autostop_idle: Duration::ZERO,
            adaptive_cooldown: Duration::from_secs(60),
            orphan_timeout: Duration::from_secs(3600),
            max_runtime: Duration::ZERO,
            failure_budget: 3,
            failure_window: Duration::from_secs(30 * 60),
            dashboard_listen: "127.0.0.1:7445".parse().expect("literal"),
            dashboard_token: None,
            ec2: Ec2Config {
                root_volume_gb: 0,
                region: None,
                ami: "ubuntu:24.04".into(),
                max_bid: String::new(),
                key_name: String::new(),
                security_groups: vec![],
                aws_keys_in_file: false,
                aws_keys: None,
                endpoint_url: None,
                subnet_ids: vec![],
                ec2_max_attempts: 3,
                master_on_demand: false,
                spread: Spread::None,
                capacity_cooldown: Duration::from_secs(300),
                iam_instance_profile: None,
                iam_propagation: Duration::from_secs(120),
                identity_certificate: None,
                on_demand_fallback: FallbackRoles::None,
                fallback_failures: 3,
                fallback_interruptions: 3,
                fallback_window: Duration::from_secs(900),
            },
            dask: DaskConfig {
                version: DASK_VERSION.into(),
                extras: Vec::new(),
                scheduler_port: 8786,
                dashboard_port: 8787,
            },
            disco: DiscoConfig {
                source: "git+https://github.com/discoproject/disco.git@0.5.4".into(),
                port: 8989,
                root: "/mnt/disco".into(),
                gc_after: 6400,
                home: String::new(),
                bundle: None,
            },
            bake: None,
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
        for bin in
            [&mut cfg.agent_binary, &mut cfg.agent_binary_arm64, &mut cfg.disco.bundle].into_iter().flatten()
        {
            if bin.is_relative() {
                *bin = base.join(&*bin);
            }
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
                ..Pool::default()
            }]
        } else {
            self.slave_pools.clone()
        }
    }

    /// What the EC2 provider needs of the nodes (it reads `ec2` for the rest).
    pub fn node_shape(&self) -> NodeShape {
        NodeShape {
            tag_key: self.tag_key.clone(),
            master_instance_type: self.master_instance_type().to_string(),
            pools: self.pools(),
            ssh_user: self.ssh_user.clone(),
            scratch_path: self.scratch_path.clone(),
            agent_archs: std::iter::once("x86_64")
                .chain(self.agent_binary_arm64.is_some().then_some("arm64"))
                .map(String::from)
                .collect(),
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
}

/// The Dask version nodes install unless `dask_version` says otherwise.
/// Pinned so that clients can match it (`pip install dask[distributed]==...`).
pub const DASK_VERSION: &str = "2026.8.0";

/// The pool of a cluster configured with `num_slaves` only.
pub const DEFAULT_POOL: &str = "default";

/// The master's pool name.
pub const MASTER_POOL: &str = "master";

#[cfg(test)]
mod tests {
    use super::validate::is_instance_profile;
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
    fn dask_extras_are_names_once() {
        let c = toml("dask_extras = [\"DataFrame\", \"array\", \"dataframe\", \"distributed\"]").unwrap();
        assert_eq!(c.dask.extras, vec!["dataframe".to_string(), "array".to_string()]);
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
            ("max_spend_usd = -1.0", "max_spend_usd"),
            ("on_budget = \"explode\"", "on_budget"),
            ("autostop_idle_mins = -2.0", "autostop_idle_mins"),
            ("tag_key = \"\"", "tag_key"),
            ("provider = \"gcp\"", "provider"),
            ("base_packages = [\"rm -rf /\"]", "base_packages"),
            ("engine = \"spark\"", "engine"),
            ("dashboard_listen = \"0.0.0.0:7445\"", "dashboard_token"),
            ("dashboard_token = \"short-token\"", "dashboard_token"),
            ("disco_root = \"mnt\"", "disco_root"),
            ("on_demand_fallback = \"always\"", "on_demand_fallback"),
            ("fallback_failures = 0", "fallback_failures"),
            ("fallback_window_secs = -1", "fallback_window_secs"),
            ("iam_instance_profile = \"has space\"", "iam_instance_profile"),
            ("iam_instance_profile = \"arn:aws:iam::12:instance-profile/x\"", "iam_instance_profile"),
            ("scratch_path = \"mnt\"", "scratch_path"),
            ("scratch_path = \"/\"", "scratch_path"),
            ("root_volume_gb = 20000", "root_volume_gb"),
            ("iam_propagation_secs = -1", "iam_propagation_secs"),
            ("dask_extras = [\"dataframe --index-url=http://x\"]", "dask_extras"),
            ("dask_extras = [\"\"]", "dask_extras"),
            ("node_python = \"python3\"", "node_python"),
            ("node_python = \"2.7\"", "node_python"),
            ("pip_source = \"pypi\"", "pip_source"),
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
            vec![Pool {
                name: "default".into(),
                instance_types: vec!["m5.large".into()],
                count: 4,
                ..Pool::default()
            }]
        );
        let c = toml(
            "[[slave_pools]]\nname = \"a\"\ninstance_types = [\"c5.large\"]\ncount = 2\n\
             [[slave_pools]]\nname = \"b\"\ninstance_types = [\"m5.large\", \"m5a.large\"]\ncount = 3\n",
        )
        .unwrap();
        assert_eq!(c.pools().len(), 2);
        assert_eq!(c.pools()[1].instance_types.len(), 2);
        let c = toml("[[slave_pools]]\nname = \"r\"\nvcpus = \"4..8\"\nmemory_gib = \"16..\"\ncount = 3\n")
            .unwrap();
        let req = c.pools()[0].requirements().expect("requirements");
        assert_eq!((req.vcpus, req.memory_gib.0), ((Some(4), Some(8)), Some(16.0)));
        assert!(c.pools()[0].instance_types.is_empty());
        for (text, key) in [
            ("num_slaves = 2\n[[slave_pools]]\nname = \"a\"\ninstance_types = [\"x\"]", "num_slaves"),
            ("[[slave_pools]]\nname = \"a\"\ninstance_types = []", "slave_pools[0]"),
            (
                "[[slave_pools]]\nname = \"a\"\ninstance_types = [\"x\"]\n[[slave_pools]]\nname = \"a\"\ninstance_types = [\"y\"]",
                "slave_pools[1]",
            ),
            // Sized by requirements: instead of types, never with them.
            ("[[slave_pools]]\nname = \"a\"\ninstance_types = [\"x\"]\nvcpus = \"2..4\"", "slave_pools[0]"),
            ("[[slave_pools]]\nname = \"a\"\nvcpus = \"4..2\"", "slave_pools[0].vcpus"),
            ("[[slave_pools]]\nname = \"a\"\nmemory_gib = \"8..\"\narch = \"mips\"", "slave_pools[0].arch"),
            ("[[slave_pools]]\nname = \"a\"\nexclude = [\"t*\"]", "slave_pools[0].vcpus"),
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
        assert_eq!(c.ec2.iam_instance_profile.as_deref(), Some("ddisco-nodes"));
        assert_eq!(c.ec2.on_demand_fallback, FallbackRoles::Both);
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
        // advertise may stay empty: on an instance, serve takes its address.
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
        assert!(c.ec2.aws_keys_in_file);
        assert!(notes.iter().any(|n| n.contains("credential chain")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("PROVIDER")), "{notes:?}");
        // The original ran only on EC2.
        assert_eq!(c.provider, ProviderKind::Ec2);
        let (c, _) =
            json(&ORIGINAL.replace("\"POST_INIT\": \"\"", "\"POST_INIT\": \"\", \"PROVIDER\": \"local\""))
                .unwrap();
        assert_eq!(c.provider, ProviderKind::Local);
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
    fn max_bid_may_be_empty() {
        assert_eq!(toml("max_bid = \"\"").unwrap().ec2.max_bid, "");
        assert_eq!(toml("").unwrap().ec2.max_bid, "", "the default sends no MaxPrice");
    }

    #[test]
    fn numeric_max_bid_is_accepted() {
        let text = ORIGINAL.replace("\"MAX_BID\": \"0.10\"", "\"MAX_BID\": 0.25");
        assert_eq!(json(&text).unwrap().0.ec2.max_bid, "0.25");
    }
}
