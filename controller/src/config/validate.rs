//! From [`RawConfig`] to [`Config`]: defaults applied, every value checked,
//! each error naming the file and the key.

use super::raw::{RawConfig, StringOrNumber};
use super::*;

impl Config {
    /// Defaults, then each section of the file in turn; errors name the
    /// file and the key.
    pub(super) fn from_raw(
        mut raw: RawConfig,
        format: Format,
        path: &Path,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let c = Check { path };
        let mut cfg = Config::default();
        let mut notes = Vec::new();
        c.cluster(&mut cfg, &mut raw, format, &mut notes)?;
        c.timings(&mut cfg, &mut raw)?;
        c.limits(&mut cfg, &mut raw)?;
        c.listeners(&mut cfg, &mut raw)?;
        c.ec2(&mut cfg, &mut raw, &mut notes)?;
        c.engines(&mut cfg, &mut raw, &mut notes)?;
        Ok((cfg, notes))
    }
}

/// The checks of one file: every error names it and the key.
struct Check<'a> {
    path: &'a Path,
}

impl Check<'_> {
    fn err(&self, key: &str, message: String) -> ConfigError {
        ConfigError { path: self.path.to_owned(), key: Some(key.to_string()), message }
    }

    /// Positive seconds, or the default.
    fn secs(&self, key: &str, v: Option<f64>, def: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(def),
            Some(s) if s.is_finite() && s > 0.0 && s < 1e7 => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(self.err(key, format!("must be a positive number of seconds, got {s}"))),
        }
    }

    /// Like `secs`, 0 meaning off.
    fn secs_or_off(&self, key: &str, v: Option<f64>, def: Duration) -> Result<Duration, ConfigError> {
        match v {
            Some(0.0) => Ok(Duration::ZERO),
            other => self.secs(key, other, def),
        }
    }

    fn multiplier(&self, key: &str, v: Option<f64>, def: f64) -> Result<f64, ConfigError> {
        match v {
            None => Ok(def),
            Some(m) if m.is_finite() && m > 0.0 => Ok(m),
            Some(m) => Err(self.err(key, format!("must be greater than 0, got {m}"))),
        }
    }

    fn addr(&self, key: &str, v: Option<String>, def: SocketAddr) -> Result<SocketAddr, ConfigError> {
        match v {
            None => Ok(def),
            Some(s) => s.parse().map_err(|_| {
                self.err(key, format!("{s:?} is not an address: use IP:PORT, e.g. \"0.0.0.0:7443\""))
            }),
        }
    }

    /// What the cluster is: provider, name, size, shape, packages, pools,
    /// the engine's kind, where state and binaries are.
    fn cluster(
        &self,
        cfg: &mut Config,
        raw: &mut RawConfig,
        format: Format,
        notes: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        cfg.provider = match raw.provider {
            // The original ran only on EC2: its config.json means EC2.
            None if format == Format::LegacyJson => {
                notes.push(
                    "config.json (disposabledisco format) launches on EC2, like the original; add \
                     \"PROVIDER\": \"local\" to run the nodes on this machine instead"
                        .to_string(),
                );
                ProviderKind::Ec2
            }
            None => cfg.provider,
            Some(p) => p,
        };
        if let Some(tag_key) = raw.tag_key.take() {
            cfg.tag_key = tag_key;
        }
        let tag_key = &cfg.tag_key;
        if tag_key.is_empty()
            || tag_key.len() > 100
            || !tag_key.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(self.err(
                "tag_key",
                format!(
                    "{tag_key:?} is not a usable cluster tag: use 1-100 letters, digits, '-', '_', '.' or ':'"
                ),
            ));
        }
        cfg.num_slaves = match raw.num_slaves {
            None => cfg.num_slaves,
            Some(n) if n < 0 => return Err(self.err("num_slaves", format!("must be 0 or more, got {n}"))),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| self.err("num_slaves", format!("{n} is more than 100000")))?,
        };
        cfg.master_multiplier =
            self.multiplier("master_multiplier", raw.master_multiplier, cfg.master_multiplier)?;
        cfg.slave_multiplier =
            self.multiplier("slave_multiplier", raw.slave_multiplier, cfg.slave_multiplier)?;
        cfg.engine = raw.engine.unwrap_or(cfg.engine);
        if let Some(v) = raw.base_packages.take() {
            cfg.base_packages = v;
        }
        if let Some(v) = raw.additional_packages.take() {
            cfg.additional_packages = v;
        }
        for (key, list) in
            [("base_packages", &cfg.base_packages), ("additional_packages", &cfg.additional_packages)]
        {
            if let Some(bad) = list.iter().find(|p| !is_package_name(p)) {
                return Err(self.err(key, format!("{bad:?} is not a Debian package name")));
            }
        }
        if let Some(v) = raw.pip_requirements.take() {
            cfg.pip_requirements = v;
        }
        cfg.pip_source = raw.pip_source.unwrap_or(cfg.pip_source);
        if let Some(v) = non_empty(raw.node_python.take()) {
            let v = v.trim().to_string();
            let valid = v.split_once('.').is_some_and(|(a, b)| {
                a == "3" && !b.is_empty() && b.len() <= 2 && b.bytes().all(|c| c.is_ascii_digit())
            });
            if !valid {
                return Err(self.err(
                    "node_python",
                    format!(
                        "{:?}: the nodes' Python as major.minor, e.g. \"3.12\" (or empty: found out)",
                        crate::text::prefix(&v, 32)
                    ),
                ));
            }
            cfg.node_python = v;
        }
        if let Some(v) = raw.instance_type.take() {
            cfg.instance_type = v;
        }
        cfg.master_instance_type = raw.master_instance_type.take().unwrap_or_default();
        cfg.slave_instance_type = raw.slave_instance_type.take().unwrap_or_default();
        cfg.mgmt_keys = raw
            .mgmt_key
            .take()
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        cfg.post_init = raw.post_init.take().unwrap_or_default();
        if let Some(v) = raw.ssh_user.take() {
            cfg.ssh_user = v;
        }
        if let Some(dir) = non_empty(raw.state_dir.take()) {
            cfg.state_dir = PathBuf::from(dir);
        }
        cfg.agent_binary = non_empty(raw.agent_binary.take()).map(PathBuf::from);
        cfg.agent_binary_arm64 = non_empty(raw.agent_binary_arm64.take()).map(PathBuf::from);
        cfg.local_install_packages = raw.local_install_packages.unwrap_or(false);
        cfg.local_machines = raw.local_machines.unwrap_or(false);
        cfg.slave_pools = raw.slave_pools.take().unwrap_or_default();
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in cfg.slave_pools.iter().enumerate() {
            let key = format!("slave_pools[{i}]");
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(
                    self.err(&key, format!("name {:?}: use letters, digits, '-', '_' or '.'", p.name))
                );
            }
            if !names.insert(p.name.clone()) {
                return Err(self.err(&key, format!("pool name {:?} is used twice", p.name)));
            }
            let req = super::requirements::parse(&p.vcpus, &p.memory_gib, &p.arch, &p.exclude, p.max_types)
                .map_err(|(k, e)| self.err(&format!("{key}.{k}"), e))?;
            match (p.instance_types.is_empty(), req.is_some()) {
                (true, false) => {
                    return Err(self.err(
                        &key,
                        format!(
                            "pool {:?} names no instance_types: give them, or requirements (vcpus = \"4..8\", \
                             memory_gib = \"16..\")",
                            p.name
                        ),
                    ));
                }
                (false, true) => {
                    return Err(self.err(
                        &key,
                        format!(
                            "pool {:?}: give instance_types or requirements (vcpus, memory_gib), not both",
                            p.name
                        ),
                    ));
                }
                _ => {}
            }
        }
        if !cfg.slave_pools.is_empty() && raw.num_slaves.is_some_and(|n| n != 0) {
            return Err(
                self.err("num_slaves", "set either num_slaves or the counts of slave_pools, not both".into())
            );
        }
        Ok(())
    }

    /// How often and how long: heartbeats, deadlines, certificates, the
    /// loop's interval, drains, the orphan window.
    fn timings(&self, cfg: &mut Config, raw: &mut RawConfig) -> Result<(), ConfigError> {
        cfg.heartbeat_interval =
            self.secs("heartbeat_interval_secs", raw.heartbeat_interval_secs, cfg.heartbeat_interval)?;
        cfg.heartbeat_timeout =
            self.secs("heartbeat_timeout_secs", raw.heartbeat_timeout_secs, cfg.heartbeat_timeout)?;
        if cfg.heartbeat_timeout < cfg.heartbeat_interval * 2 {
            return Err(self.err(
                "heartbeat_timeout_secs",
                format!(
                    "{:.1}s must be at least twice heartbeat_interval_secs ({:.1}s), or one late heartbeat replaces a healthy node",
                    cfg.heartbeat_timeout.as_secs_f64(),
                    cfg.heartbeat_interval.as_secs_f64()
                ),
            ));
        }
        cfg.boot_timeout = self.secs("boot_timeout_secs", raw.boot_timeout_secs, cfg.boot_timeout)?;
        cfg.token_ttl = self.secs("token_ttl_secs", raw.token_ttl_secs, cfg.token_ttl)?;
        cfg.cert_validity = self.secs("cert_validity_secs", raw.cert_validity_secs, cfg.cert_validity)?;
        if cfg.cert_validity < Duration::from_secs(10) {
            return Err(self.err("cert_validity_secs", "must be at least 10 seconds".into()));
        }
        cfg.reconcile_interval =
            self.secs("reconcile_interval_secs", raw.reconcile_interval_secs, cfg.reconcile_interval)?;
        cfg.on_demand_idle_replace = self.secs_or_off(
            "on_demand_idle_replace_secs",
            raw.on_demand_idle_replace_secs,
            cfg.on_demand_idle_replace,
        )?;
        cfg.drain_timeout =
            self.secs_or_off("drain_timeout_secs", raw.drain_timeout_secs, cfg.drain_timeout)?;
        cfg.adaptive_cooldown =
            self.secs("adaptive_cooldown_secs", raw.adaptive_cooldown_secs, cfg.adaptive_cooldown)?;
        // Longer than a silent node is waited for, and than an agent's
        // reconnect backoff (10 s at most) plus a controller's restart.
        let orphan_floor = cfg.heartbeat_timeout.as_secs_f64().max(20.0);
        cfg.orphan_timeout = match raw.orphan_timeout_secs {
            None => cfg.orphan_timeout,
            Some(0.0) => Duration::ZERO,
            Some(v) if v.is_finite() && v >= orphan_floor && v < 1e7 => Duration::from_secs_f64(v),
            Some(v) => {
                return Err(self.err(
                    "orphan_timeout_secs",
                    format!(
                        "{v}: give at least {orphan_floor} seconds (agents reconnect with up to 10 s of backoff, and \
                         heartbeat_timeout_secs is {}), or 0 for never; nodes shut themselves down after this long \
                         without the controller",
                        cfg.heartbeat_timeout.as_secs_f64()
                    ),
                ));
            }
        };
        Ok(())
    }

    /// What ends or holds the cluster: spend cap, autostop, max runtime,
    /// failure budget.
    fn limits(&self, cfg: &mut Config, raw: &mut RawConfig) -> Result<(), ConfigError> {
        cfg.max_spend_usd = match raw.max_spend_usd {
            None => 0.0,
            Some(v) if v.is_finite() && v >= 0.0 => v,
            Some(v) => return Err(self.err("max_spend_usd", format!("{v}: give the cap in USD (0: no cap)"))),
        };
        cfg.on_budget = raw.on_budget.unwrap_or(cfg.on_budget);
        cfg.autostop_idle = match raw.autostop_idle_mins {
            None => Duration::ZERO,
            Some(v) if v.is_finite() && v >= 0.0 => Duration::from_secs_f64(v * 60.0),
            Some(v) => return Err(self.err("autostop_idle_mins", format!("{v}: give minutes (0: never)"))),
        };
        cfg.max_runtime = match raw.max_runtime_mins {
            None => cfg.max_runtime,
            Some(v) if v.is_finite() && (0.0..1e6).contains(&v) => Duration::from_secs_f64(v * 60.0),
            Some(v) => return Err(self.err("max_runtime_mins", format!("{v}: give minutes (0: no limit)"))),
        };
        cfg.failure_budget = raw.failure_budget.unwrap_or(cfg.failure_budget);
        cfg.failure_window = match raw.failure_window_mins {
            None => cfg.failure_window,
            Some(v) if v.is_finite() && v > 0.0 && v < 1e6 => Duration::from_secs_f64(v * 60.0),
            Some(v) => {
                return Err(
                    self.err("failure_window_mins", format!("{v}: give a positive number of minutes"))
                );
            }
        };
        Ok(())
    }

    /// The controller's ports, its advertised address, the dashboard's
    /// token.
    fn listeners(&self, cfg: &mut Config, raw: &mut RawConfig) -> Result<(), ConfigError> {
        cfg.listen = self.addr("listen", raw.listen.take(), cfg.listen)?;
        cfg.download_listen =
            self.addr("download_listen", raw.download_listen.take(), cfg.download_listen)?;
        cfg.dashboard_listen =
            self.addr("dashboard_listen", raw.dashboard_listen.take(), cfg.dashboard_listen)?;
        cfg.advertise = non_empty(raw.advertise.take());
        cfg.dashboard_token = non_empty_secret(raw.dashboard_token.take());
        if let Some(t) = &cfg.dashboard_token
            && t.0.chars().count() < 16
        {
            return Err(self.err(
                "dashboard_token",
                format!(
                    "{} characters: at least 16 (a password anyone who reaches the dashboard can try); \
                     e.g. `openssl rand -hex 16`",
                    t.0.chars().count()
                ),
            ));
        }
        if !cfg.dashboard_listen.ip().is_loopback() && cfg.dashboard_token.is_none() {
            return Err(self.err(
                "dashboard_token",
                format!(
                    "required because dashboard_listen ({}) is not a loopback address: \
                     anyone who reaches it would see the cluster; set a long random token",
                    cfg.dashboard_listen
                ),
            ));
        }
        Ok(())
    }

    /// Everything the EC2 provider reads (`Ec2Config`), and what EC2
    /// requires.
    fn ec2(&self, cfg: &mut Config, raw: &mut RawConfig, notes: &mut Vec<String>) -> Result<(), ConfigError> {
        let e = &mut cfg.ec2;
        e.max_bid = match raw.max_bid.take() {
            None => std::mem::take(&mut e.max_bid),
            Some(StringOrNumber::S(s)) => s,
            Some(StringOrNumber::N(n)) => n.to_string(),
        };
        // Empty: no maximum price is sent, so spot is capped at the
        // on-demand price (AWS's recommendation).
        match e.max_bid.trim().parse::<f64>() {
            _ if e.max_bid.trim().is_empty() => {}
            Ok(p) if p.is_finite() && p > 0.0 => {}
            _ => {
                return Err(self.err(
                    "max_bid",
                    format!(
                        "{:?} is not a price: give USD per instance-hour, e.g. \"0.10\", or leave it \
                         empty (spot capped at the on-demand price)",
                        e.max_bid
                    ),
                ));
            }
        }
        e.capacity_cooldown =
            self.secs("capacity_cooldown_secs", raw.capacity_cooldown_secs, e.capacity_cooldown)?;
        e.iam_propagation =
            self.secs_or_off("iam_propagation_secs", raw.iam_propagation_secs, e.iam_propagation)?;
        e.fallback_window = self.secs("fallback_window_secs", raw.fallback_window_secs, e.fallback_window)?;
        e.on_demand_fallback = raw.on_demand_fallback.unwrap_or(e.on_demand_fallback);
        for (key, v) in [
            ("fallback_failures", raw.fallback_failures),
            ("fallback_interruptions", raw.fallback_interruptions),
        ] {
            if v == Some(0) {
                return Err(self.err(key, "must be at least 1".into()));
            }
        }
        e.fallback_failures = raw.fallback_failures.unwrap_or(e.fallback_failures);
        e.fallback_interruptions = raw.fallback_interruptions.unwrap_or(e.fallback_interruptions);
        e.iam_instance_profile =
            raw.iam_instance_profile.take().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(p) = &e.iam_instance_profile
            && !is_instance_profile(p)
        {
            return Err(self.err(
                "iam_instance_profile",
                format!(
                    "{p:?} is neither an instance profile name (letters, digits and +=,.@_-, up to 128) nor its \
                     ARN (arn:aws:iam::ACCOUNT:instance-profile/NAME)"
                ),
            ));
        }
        // gp3 volumes are 1 GiB to 16 TiB.
        e.root_volume_gb = match raw.root_volume_gb {
            None | Some(0) => 0,
            Some(n @ 1..=16384) => n,
            Some(n) => {
                return Err(self.err(
                    "root_volume_gb",
                    format!("{n} GiB: a gp3 root volume is 1 to 16384 GiB (0: the image's size)"),
                ));
            }
        };
        e.aws_keys_in_file = raw.aws_access.is_some() || raw.aws_secret.is_some();
        if raw.aws_access.is_some() != raw.aws_secret.is_some() {
            return Err(self.err("aws_secret", "give both AWS_ACCESS and AWS_SECRET, or neither".into()));
        }
        if e.aws_keys_in_file {
            notes.push(format!(
                "{}: AWS_ACCESS/AWS_SECRET found in the config file. They are accepted, but keys \
                 in files leak: prefer the standard AWS credential chain (environment, profile, \
                 SSO, instance role) and remove them from the file",
                self.path.display()
            ));
        }
        e.aws_keys = match (raw.aws_access.take(), raw.aws_secret.take()) {
            (Some(a), Some(s))
                if !a.trim().is_empty() && !s.trim().is_empty() && !a.contains("FILL THIS") =>
            {
                Some((a, Secret(s)))
            }
            _ => None,
        };
        e.region = non_empty(raw.region.take());
        if let Some(ami) = raw.ami.take() {
            e.ami = ami;
        }
        e.key_name = raw.key_name.take().unwrap_or_default();
        e.security_groups = raw.security_groups.take().unwrap_or_default();
        e.endpoint_url = non_empty(raw.endpoint_url.take());
        e.subnet_ids = raw.subnet_ids.take().unwrap_or_default();
        e.ec2_max_attempts = raw.ec2_max_attempts.unwrap_or(e.ec2_max_attempts).clamp(1, 10);
        e.master_on_demand = raw.master_on_demand.unwrap_or(false);
        e.spread = raw.spread.unwrap_or_default();
        e.identity_certificate = non_empty(raw.identity_certificate.take()).map(PathBuf::from);
        if cfg.provider == ProviderKind::Ec2 {
            let e = &cfg.ec2;
            if e.ami.trim().is_empty() {
                return Err(self.err(
                    "ami",
                    "required with provider = \"ec2\": an official Ubuntu image alias such as \"ubuntu:24.04\", \
                     or an image id (ami-...)"
                        .into(),
                ));
            }
            if let Err(why) = image::parse(&e.ami) {
                return Err(self.err("ami", why));
            }
            if e.security_groups.is_empty() {
                return Err(self.err(
                    "security_groups",
                    "required with provider = \"ec2\": at least one group (id sg-... or name)".into(),
                ));
            }
        }
        Ok(())
    }

    /// The engines' settings (Dask, Disco) and the scratch path their data
    /// uses.
    fn engines(
        &self,
        cfg: &mut Config,
        raw: &mut RawConfig,
        notes: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = raw.scratch_path.take() {
            cfg.scratch_path = v;
        }
        let scratch = &cfg.scratch_path;
        if !scratch.starts_with('/') || scratch == "/" || scratch.contains("..") {
            return Err(
                self.err("scratch_path", format!("{scratch:?}: use an absolute directory such as \"/mnt\""))
            );
        }
        if raw.disco_home.as_deref().is_some_and(|h| {
            let h = h.trim();
            !h.is_empty() && (!h.starts_with('/') || h.contains(['"', '\'', '\\', '\n']))
        }) {
            return Err(self.err(
                "disco_home",
                "must be an absolute path (the Disco home scripts/build-disco prints), or empty".into(),
            ));
        }
        if raw.disco_root.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(self.err("disco_root", "must be an absolute path, e.g. \"/mnt/disco\"".into()));
        }
        if let Some(v) = non_empty(raw.dask_version.take()) {
            cfg.dask.version = v;
        }
        if let Some(extras) = raw.dask_extras.take() {
            let mut out: Vec<String> = Vec::new();
            for e in extras {
                let e = e.trim().to_ascii_lowercase();
                // PEP 685 names: letters, digits, '-', '_', '.'; it goes on pip's command line.
                let valid = e.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && e.len() <= 64
                    && e.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !valid {
                    return Err(self.err(
                        "dask_extras",
                        format!(
                            "{:?} is not a name of one of Dask's extras: use names such as \"dataframe\", \"array\" or \"diagnostics\"",
                            crate::text::prefix(&e, 64)
                        ),
                    ));
                }
                if e != "distributed" && !out.contains(&e) {
                    out.push(e);
                }
            }
            cfg.dask.extras = out;
        }
        cfg.dask.scheduler_port = raw.dask_scheduler_port.unwrap_or(cfg.dask.scheduler_port);
        cfg.dask.dashboard_port = raw.dask_dashboard_port.unwrap_or(cfg.dask.dashboard_port);
        let d = &mut cfg.disco;
        if let Some(v) = raw.disco_source.take() {
            d.source = v;
        }
        d.port = raw.disco_port.unwrap_or(d.port);
        if let Some(v) = raw.disco_root.take() {
            d.root = v;
        }
        d.gc_after = raw.disco_gc_after.unwrap_or(d.gc_after);
        d.home = raw.disco_home.take().unwrap_or_default().trim().to_string();
        d.bundle = non_empty(raw.disco_bundle.take()).map(PathBuf::from);
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
        Ok(())
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
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
