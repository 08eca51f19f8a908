//! From [`RawConfig`] to [`Config`]: defaults applied, every value checked,
//! each error naming the file and the key.

use super::raw::{RawConfig, StringOrNumber};
use super::*;

impl Config {
    pub(super) fn from_raw(
        raw: RawConfig,
        format: Format,
        path: &Path,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            path: path.to_owned(),
            key: Some(key.to_string()),
            message,
        };
        let d = Config::default();
        let mut notes = Vec::new();

        let provider = match raw.provider.as_deref() {
            // The original ran only on EC2: its config.json means EC2.
            None if format == Format::LegacyJson => {
                notes.push(
                    "config.json (disposabledisco format) launches on EC2, like the original; add \
                     \"PROVIDER\": \"local\" to run the nodes on this machine instead"
                        .to_string(),
                );
                ProviderKind::Ec2
            }
            None => d.provider,
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
            None => d.ec2.max_bid,
            Some(StringOrNumber::S(s)) => s,
            Some(StringOrNumber::N(n)) => n.to_string(),
        };
        // Empty: no maximum price is sent, so spot is capped at the
        // on-demand price (AWS's recommendation).
        match max_bid.trim().parse::<f64>() {
            _ if max_bid.trim().is_empty() => {}
            Ok(p) if p.is_finite() && p > 0.0 => {}
            _ => {
                return Err(err(
                    "max_bid",
                    format!(
                        "{max_bid:?} is not a price: give USD per instance-hour, e.g. \"0.10\", or leave it \
                         empty (spot capped at the on-demand price)"
                    ),
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
            secs("capacity_cooldown_secs", raw.capacity_cooldown_secs, d.ec2.capacity_cooldown)?;
        let iam_propagation = match raw.iam_propagation_secs {
            Some(0.0) => Duration::ZERO,
            other => secs("iam_propagation_secs", other, d.ec2.iam_propagation)?,
        };
        let fallback_window = secs("fallback_window_secs", raw.fallback_window_secs, d.ec2.fallback_window)?;
        let on_demand_idle_replace = match raw.on_demand_idle_replace_secs {
            Some(0.0) => Duration::ZERO,
            other => secs("on_demand_idle_replace_secs", other, d.on_demand_idle_replace)?,
        };
        let on_demand_fallback = match raw.on_demand_fallback.as_deref() {
            None => d.ec2.on_demand_fallback,
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
        // gp3 volumes are 1 GiB to 16 TiB.
        let root_volume_gb = match raw.root_volume_gb {
            None | Some(0) => 0,
            Some(n @ 1..=16384) => n,
            Some(n) => {
                return Err(err(
                    "root_volume_gb",
                    format!("{n} GiB: a gp3 root volume is 1 to 16384 GiB (0: the image's size)"),
                ));
            }
        };
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
        let max_spend_usd = match raw.max_spend_usd {
            None => 0.0,
            Some(v) if v.is_finite() && v >= 0.0 => v,
            Some(v) => return Err(err("max_spend_usd", format!("{v}: give the cap in USD (0: no cap)"))),
        };
        let autostop_idle = match raw.autostop_idle_mins {
            None => Duration::ZERO,
            Some(v) if v.is_finite() && v >= 0.0 => Duration::from_secs_f64(v * 60.0),
            Some(v) => {
                return Err(err("autostop_idle_mins", format!("{v}: give minutes (0: never)")));
            }
        };
        let adaptive_cooldown =
            secs("adaptive_cooldown_secs", raw.adaptive_cooldown_secs, d.adaptive_cooldown)?;
        // Longer than a silent node is waited for, and than an agent's
        // reconnect backoff (10 s at most) plus a controller's restart.
        let orphan_floor = heartbeat_timeout.as_secs_f64().max(20.0);
        let orphan_timeout = match raw.orphan_timeout_secs {
            None => d.orphan_timeout,
            Some(0.0) => Duration::ZERO,
            Some(v) if v.is_finite() && v >= orphan_floor && v < 1e7 => Duration::from_secs_f64(v),
            Some(v) => {
                return Err(err(
                    "orphan_timeout_secs",
                    format!(
                        "{v}: give at least {orphan_floor} seconds (agents reconnect with up to 10 s of backoff, and \
                         heartbeat_timeout_secs is {}), or 0 for never; nodes shut themselves down after this long \
                         without the controller",
                        heartbeat_timeout.as_secs_f64()
                    ),
                ));
            }
        };
        let max_runtime = match raw.max_runtime_mins {
            None => d.max_runtime,
            Some(v) if v.is_finite() && (0.0..1e6).contains(&v) => Duration::from_secs_f64(v * 60.0),
            Some(v) => return Err(err("max_runtime_mins", format!("{v}: give minutes (0: no limit)"))),
        };
        let failure_budget = raw.failure_budget.unwrap_or(d.failure_budget);
        let failure_window = match raw.failure_window_mins {
            None => d.failure_window,
            Some(v) if v.is_finite() && v > 0.0 && v < 1e6 => Duration::from_secs_f64(v * 60.0),
            Some(v) => {
                return Err(err("failure_window_mins", format!("{v}: give a positive number of minutes")));
            }
        };
        let on_budget = match raw.on_budget.as_deref() {
            None | Some("destroy") => crate::budget::OnBudget::Destroy,
            Some("stop-launching") => crate::budget::OnBudget::StopLaunching,
            Some(other) => {
                return Err(err("on_budget", format!("{other:?}: use \"destroy\" or \"stop-launching\"")));
            }
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
        if raw.disco_home.as_deref().is_some_and(|h| {
            let h = h.trim();
            !h.is_empty() && (!h.starts_with('/') || h.contains(['"', '\'', '\\', '\n']))
        }) {
            return Err(err(
                "disco_home",
                "must be an absolute path (the Disco home scripts/build-disco prints), or empty".into(),
            ));
        }
        if raw.disco_root.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(err("disco_root", "must be an absolute path, e.g. \"/mnt/disco\"".into()));
        }
        let token_ttl = secs("token_ttl_secs", raw.token_ttl_secs, d.token_ttl)?;
        let cert_validity = secs("cert_validity_secs", raw.cert_validity_secs, d.cert_validity)?;
        if cert_validity < Duration::from_secs(10) {
            return Err(err("cert_validity_secs", "must be at least 10 seconds".into()));
        }
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
        if let Some(t) = &dashboard_token
            && t.0.chars().count() < 16
        {
            return Err(err(
                "dashboard_token",
                format!(
                    "{} characters: at least 16 (a password anyone who reaches the dashboard can try); \
                     e.g. `openssl rand -hex 16`",
                    t.0.chars().count()
                ),
            ));
        }
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
            tag_key,
            num_slaves,
            master_multiplier,
            slave_multiplier,
            base_packages: raw.base_packages.unwrap_or(d.base_packages),
            additional_packages: raw.additional_packages.unwrap_or(d.additional_packages),
            pip_requirements: raw.pip_requirements.unwrap_or(d.pip_requirements),
            instance_type: raw.instance_type.unwrap_or(d.instance_type),
            master_instance_type: raw.master_instance_type.unwrap_or_default(),
            slave_instance_type: raw.slave_instance_type.unwrap_or_default(),
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
            cert_validity,
            reconcile_interval,
            agent_binary: non_empty(raw.agent_binary).map(PathBuf::from),
            agent_binary_arm64: non_empty(raw.agent_binary_arm64).map(PathBuf::from),
            local_install_packages: raw.local_install_packages.unwrap_or(false),
            local_machines: raw.local_machines.unwrap_or(false),
            slave_pools: raw.slave_pools.unwrap_or_default(),
            on_demand_idle_replace,
            scratch_path,
            engine,
            drain_timeout,
            max_spend_usd,
            on_budget,
            autostop_idle,
            adaptive_cooldown,
            orphan_timeout,
            max_runtime,
            failure_budget,
            failure_window,
            dashboard_listen,
            dashboard_token,
            ec2: Ec2Config {
                region: non_empty(raw.region),
                ami: raw.ami.unwrap_or(d.ec2.ami),
                max_bid,
                key_name: raw.key_name.unwrap_or_default(),
                security_groups: raw.security_groups.unwrap_or_default(),
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
                ec2_max_attempts: raw.ec2_max_attempts.unwrap_or(d.ec2.ec2_max_attempts).clamp(1, 10),
                root_volume_gb,
                master_on_demand: raw.master_on_demand.unwrap_or(false),
                capacity_cooldown,
                iam_instance_profile,
                iam_propagation,
                identity_certificate: non_empty(raw.identity_certificate).map(PathBuf::from),
                on_demand_fallback,
                fallback_failures: raw.fallback_failures.unwrap_or(d.ec2.fallback_failures),
                fallback_interruptions: raw.fallback_interruptions.unwrap_or(d.ec2.fallback_interruptions),
                fallback_window,
            },
            dask: DaskConfig {
                version: non_empty(raw.dask_version).unwrap_or(d.dask.version),
                scheduler_port: raw.dask_scheduler_port.unwrap_or(d.dask.scheduler_port),
                dashboard_port: raw.dask_dashboard_port.unwrap_or(d.dask.dashboard_port),
            },
            disco: DiscoConfig {
                source: raw.disco_source.unwrap_or(d.disco.source),
                port: raw.disco_port.unwrap_or(d.disco.port),
                root: raw.disco_root.unwrap_or(d.disco.root),
                gc_after: raw.disco_gc_after.unwrap_or(d.disco.gc_after),
                home: raw.disco_home.unwrap_or_default().trim().to_string(),
                bundle: non_empty(raw.disco_bundle).map(PathBuf::from),
            },
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
            if cfg.ec2.ami.trim().is_empty() {
                return Err(err(
                    "ami",
                    "required with provider = \"ec2\": an official Ubuntu image alias such as \"ubuntu:24.04\", \
                     or an image id (ami-...)"
                        .into(),
                ));
            }
            if let Err(e) = image::parse(&cfg.ec2.ami) {
                return Err(err("ami", e));
            }
            if cfg.ec2.security_groups.is_empty() {
                return Err(err(
                    "security_groups",
                    "required with provider = \"ec2\": at least one group (id sg-... or name)".into(),
                ));
            }
        }
        if cfg.provider == ProviderKind::Ec2
            && cfg.engine == EngineKind::Disco
            && !Path::new(&cfg.disco.root).starts_with(&cfg.scratch_path)
        {
            notes.push(format!(
                "disco_root {:?} is not under scratch_path {:?}: Disco's data will be on the root volume, not \
                 on instance store",
                cfg.disco.root, cfg.scratch_path
            ));
        }
        Ok((cfg, notes))
    }
}

/// An IAM instance profile name, or an instance profile ARN.
pub(super) fn is_instance_profile(v: &str) -> bool {
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
