//! Preflight: every setting checked against EC2 once at start, so a bad
//! value is one error naming its key instead of a storm of failed launches.

use super::errors::{Kind, classify, describe};
use super::*;

impl Ec2Provider {
    /// `Provider::preflight`: AMI, key pair, groups, subnets, instance types
    /// (and their architectures and instance store), then images. Long by
    /// design: a list of independent checks, each an API call and the error
    /// naming its config key, read top to bottom.
    pub(super) async fn preflight_checks(&self) -> Result<(), ProviderError> {
        let c = &self.client;
        if !self.key_name.is_empty() {
            self.check(
                "DescribeKeyPairs",
                c.describe_key_pairs().key_names(&self.key_name).send().await,
                "key_name",
                &self.key_name,
            )?;
        }
        let group_ids = self.group_ids.lock().clone();
        if !group_ids.is_empty() {
            let what = group_ids.join(", ");
            self.check(
                "DescribeSecurityGroups",
                c.describe_security_groups().set_group_ids(Some(group_ids)).send().await,
                "security_groups",
                &what,
            )?;
        }
        let group_names = self.group_names.lock().clone();
        // Names of groups of the default VPC, to their ids.
        let mut named_ids = Vec::new();
        if !group_names.is_empty() {
            let what = group_names.join(", ");
            let out = self.check(
                "DescribeSecurityGroups",
                c.describe_security_groups().set_group_names(Some(group_names)).send().await,
                "security_groups",
                &what,
            )?;
            named_ids = out.security_groups().iter().filter_map(|g| g.group_id()).map(String::from).collect();
        }
        if self.subnets.lock().iter().all(Option::is_none) {
            self.find_default_subnets().await?;
        }
        let subnets: Vec<String> = self.subnets.lock().iter().flatten().cloned().collect();
        // EC2 takes no group names with a subnet ("The parameter groupName
        // cannot be used with the parameter subnet"): launch with their ids.
        if !subnets.is_empty() && !named_ids.is_empty() {
            self.group_ids.lock().extend(named_ids);
            self.group_names.lock().clear();
        }
        // subnet id -> its availability zone.
        let mut zones: Vec<(String, String)> = Vec::new();
        if !subnets.is_empty() {
            let what = subnets.join(", ");
            let out = self.check(
                "DescribeSubnets",
                c.describe_subnets().set_subnet_ids(Some(subnets)).send().await,
                "subnet_ids",
                &what,
            )?;
            for s in out.subnets() {
                if let (Some(id), Some(z)) = (s.subnet_id(), s.availability_zone()) {
                    zones.push((id.to_string(), z.to_string()));
                }
            }
        }
        self.resolve_requirements().await?;
        // Instance types, and the architecture each one runs.
        let mut types: Vec<(String, String)> =
            vec![(self.master_type.clone(), "master_instance_type".into())];
        let pools = self.pools.lock().clone();
        for (i, p) in pools.iter().enumerate() {
            for t in &p.instance_types {
                types.push((t.clone(), format!("slave_pools[{i}].instance_types")));
            }
        }
        let mut arch_keys: Vec<(String, String, String)> = Vec::new(); // (arch, type, key)
        for (t, key) in types {
            let key = if pools.len() == 1 && pools[0].name == crate::config::DEFAULT_POOL {
                "instance_type".to_string()
            } else {
                key
            };
            if let Some(known) = self.type_arch.lock().get(&t).cloned() {
                arch_keys.push((known, t, key)); // checked already (master and a pool share it)
                continue;
            }
            let out = self.check(
                "DescribeInstanceTypes",
                c.describe_instance_types().instance_types(InstanceType::from(t.as_str())).send().await,
                &key,
                &t,
            )?;
            let supported: Vec<String> = out
                .instance_types()
                .iter()
                .filter_map(|i| i.processor_info())
                .flat_map(|p| p.supported_architectures())
                .map(|a| a.as_str().to_string())
                .collect();
            let arch = images::type_arch(&supported).unwrap_or_else(|| {
                tracing::warn!("{t}: the endpoint does not say which architecture it runs; assuming x86_64");
                "x86_64".into()
            });
            let vcpus =
                out.instance_types().first().and_then(|i| i.v_cpu_info()).and_then(|v| v.default_v_cpus());
            if let Some(n) = vcpus.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0) {
                self.type_vcpus.lock().insert(t.clone(), n);
            }
            let store = out.instance_types().first().and_then(|i| i.instance_storage_info()).map(|s| {
                let disks: Vec<String> = s
                    .disks()
                    .iter()
                    .map(|d| format!("{} x {} GB", d.count().unwrap_or(1), d.size_in_gb().unwrap_or(0)))
                    .collect();
                disks.join(" + ")
            });
            let root = match self.root_volume_gb {
                0 => String::new(),
                n => format!(" ({n} GiB gp3)"),
            };
            self.scratch_notes.lock().push(match store {
                Some(disks) if !disks.is_empty() => {
                    format!("scratch on {t}: {disks} instance store, mounted at {}", self.scratch_path)
                }
                _ => format!(
                    "scratch on {t}: no instance store, {} is on the root volume{root}",
                    self.scratch_path
                ),
            });
            self.type_arch.lock().insert(t.clone(), arch.clone());
            arch_keys.push((arch, t, key));
        }
        self.subnet_zones.lock().clone_from(&zones);
        self.check_offerings(&zones, &arch_keys).await?;
        self.resolve_images(&arch_keys).await?;
        self.check_baked().await;
        // Every type's architecture needs its agent (an x86_64 agent does
        // not run on Graviton).
        if let Some((arch, t, key)) = arch_keys.iter().find(|(a, _, _)| !self.agent_archs.contains(a)) {
            return Err(ProviderError::Config {
                key: "agent_binary_arm64".into(),
                message: format!(
                    "{t} ({key}) runs {arch}, and no {arch} agent is served: build it \
                     (scripts/build-agent --arch arm64) and set agent_binary_arm64 to its path, or use an \
                     x86_64 type"
                ),
            });
        }
        self.find_root_devices(&arch_keys).await
    }

    /// The types of each pool sized by requirements: every instance type of
    /// the region (`DescribeInstanceTypes`, paged, once), those that fit
    /// (`config::requirements::resolve`), smallest first. None fits: `serve`
    /// stops naming the pool.
    async fn resolve_requirements(&self) -> Result<(), ProviderError> {
        use crate::config::requirements::{TypeInfo, resolve};
        let wanted: Vec<(usize, crate::config::requirements::Requirements)> =
            self.pools.lock().iter().enumerate().filter_map(|(i, p)| Some((i, p.requirements()?))).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut all: Vec<TypeInfo> = Vec::new();
        let mut pages = self.client.describe_instance_types().max_results(100).into_paginator().send();
        while let Some(page) = pages.next().await {
            self.count("DescribeInstanceTypes", &page);
            let page = page.map_err(|e| {
                let (code, msg) = super::errors::describe(&e);
                ProviderError::Config {
                    key: "slave_pools".into(),
                    message: format!(
                        "DescribeInstanceTypes (to size pools by vcpus and memory_gib): {code}: {msg}"
                    ),
                }
            })?;
            for t in page.instance_types() {
                let Some(name) = t.instance_type() else { continue };
                all.push(TypeInfo {
                    name: name.as_str().to_string(),
                    vcpus: t.v_cpu_info().and_then(|v| v.default_v_cpus()).map_or(0, |n| n.max(0) as u32),
                    memory_mib: t.memory_info().and_then(|m| m.size_in_mib()).map_or(0, |n| n.max(0) as u64),
                    archs: t
                        .processor_info()
                        .map(|p| p.supported_architectures().iter().map(|a| a.as_str().to_string()).collect())
                        .unwrap_or_default(),
                    bare_metal: t.bare_metal().unwrap_or(false),
                    current_generation: t.current_generation().unwrap_or(false),
                    spot: t.supported_usage_classes().iter().any(|u| u.as_str() == "spot"),
                });
            }
        }
        let mut notes = Vec::new();
        for (i, req) in wanted {
            // Slaves launch on spot (on-demand is the fallback).
            let (types, fitting) = resolve(&req, &all, true);
            let name = self.pools.lock()[i].name.clone();
            if types.is_empty() {
                return Err(ProviderError::Config {
                    key: format!("slave_pools[{i}]"),
                    message: format!(
                        "no instance type of region {} fits pool {name:?} ({}; current generation, not bare \
                         metal, on spot): widen its vcpus or memory_gib, or name instance_types",
                        self.region,
                        req.describe()
                    ),
                });
            }
            let line = format!(
                "pool {name}: {} -> {} ({} of {fitting} types that fit, smallest first)",
                req.describe(),
                types.join(", "),
                types.len()
            );
            tracing::info!("{line}");
            notes.push(line);
            self.pools.lock()[i].instance_types = types;
        }
        let mut kept = self.pool_notes.lock();
        for n in notes {
            if !kept.contains(&n) {
                kept.push(n);
            }
        }
        Ok(())
    }

    /// Without `subnet_ids`: one subnet per zone, the default VPC's
    /// default subnets (`default-for-az`), so that every zone's capacity
    /// and prices are candidates (with no subnet EC2 would pick one zone
    /// per call, and a capacity error would say nothing of the others).
    /// No default VPC: EC2 picks, as before.
    async fn find_default_subnets(&self) -> Result<(), ProviderError> {
        let f = Filter::builder().name("default-for-az").values("true").build();
        let out = self.check(
            "DescribeSubnets",
            self.client.describe_subnets().filters(f).send().await,
            "subnet_ids",
            "the default VPC's subnets",
        )?;
        let mut found: Vec<(String, String)> = out
            .subnets()
            .iter()
            .filter_map(|s| Some((s.availability_zone()?.to_string(), s.subnet_id()?.to_string())))
            .collect();
        found.sort();
        found.dedup_by(|a, b| a.0 == b.0);
        if found.is_empty() {
            tracing::info!("no default VPC subnets in {}: EC2 picks each launch's zone", self.region);
            return Ok(());
        }
        let zones: Vec<&str> = found.iter().map(|(z, _)| z.as_str()).collect();
        let line = format!(
            "subnets: the default VPC's, one per zone ({}): every zone's prices and capacity are candidates",
            zones.join(", ")
        );
        tracing::info!("{line}");
        self.pool_notes.lock().push(line);
        *self.subnets.lock() = found.into_iter().map(|(_, s)| Some(s)).collect();
        Ok(())
    }

    /// With `root_volume_gb`, the root device name of each image in use
    /// (the block device mapping must name it).
    async fn find_root_devices(&self, types: &[(String, String, String)]) -> Result<(), ProviderError> {
        if self.root_volume_gb == 0 {
            return Ok(());
        }
        let mut ids: Vec<String> = types.iter().filter_map(|(_, t, _)| self.image_for(t).ok()).collect();
        ids.sort();
        ids.dedup();
        let out = self.check(
            "DescribeImages",
            self.client.describe_images().set_image_ids(Some(ids.clone())).send().await,
            "ami",
            &ids.join(", "),
        )?;
        let mut devices = self.root_devices.lock();
        for img in out.images() {
            if let (Some(id), Some(dev)) = (img.image_id(), img.root_device_name()) {
                devices.insert(id.to_string(), dev.to_string());
            }
        }
        match ids.iter().find(|id| !devices.contains_key(*id)) {
            Some(id) => Err(ProviderError::Config {
                key: "root_volume_gb".into(),
                message: format!("image {id} does not say its root device: cannot size its root volume"),
            }),
            None => Ok(()),
        }
    }

    /// Which (type, subnet) pairs EC2 cannot launch at all, because the
    /// subnet's zone does not offer the type (`Unsupported`): they are
    /// never tried. A type offered in none of the subnets is a
    /// configuration error naming its key.
    async fn check_offerings(
        &self,
        zones: &[(String, String)],
        types: &[(String, String, String)],
    ) -> Result<(), ProviderError> {
        if zones.is_empty() {
            return Ok(()); // EC2 picks a zone that offers the type.
        }
        let mut names: Vec<String> = types.iter().map(|(_, t, _)| t.clone()).collect();
        names.sort();
        names.dedup();
        let mut offered: std::collections::HashSet<(String, String)> = Default::default();
        let mut pages = self
            .client
            .describe_instance_type_offerings()
            .location_type(aws_sdk_ec2::types::LocationType::AvailabilityZone)
            .filters(Filter::builder().name("instance-type").set_values(Some(names)).build())
            .filters(
                Filter::builder()
                    .name("location")
                    .set_values(Some(zones.iter().map(|(_, z)| z.clone()).collect()))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                self.check("DescribeInstanceTypeOfferings", page, "subnet_ids", "instance type offerings")?;
            for o in page.instance_type_offerings() {
                if let (Some(t), Some(z)) = (o.instance_type(), o.location()) {
                    offered.insert((t.as_str().to_string(), z.to_string()));
                }
            }
        }
        let mut skipped = self.unsupported.lock();
        for (_, t, key) in types {
            let missing: Vec<&(String, String)> =
                zones.iter().filter(|(_, z)| !offered.contains(&(t.clone(), z.clone()))).collect();
            if missing.len() == zones.len() {
                return Err(ProviderError::Config {
                    key: key.clone(),
                    message: format!(
                        "{t} is offered in none of the zones of subnet_ids ({}): choose another type, or \
                         subnets in zones that offer it",
                        zones.iter().map(|(s, z)| format!("{s} in {z}")).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            for (subnet, zone) in missing {
                if skipped.insert((t.clone(), subnet.clone())) {
                    tracing::info!("{t} is not offered in {zone}: never launched in {subnet}");
                    self.scratch_notes
                        .lock()
                        .push(format!("{t}: not offered in {zone}, never launched in {subnet}"));
                }
            }
        }
        Ok(())
    }

    /// Runs a preflight call; maps an error to the config key it concerns.
    pub(super) fn check<T, E: ProvideErrorMetadata + std::fmt::Debug>(
        &self,
        action: &'static str,
        r: Result<T, SdkError<E>>,
        key: &str,
        what: &str,
    ) -> Result<T, ProviderError> {
        self.count(action, &r);
        r.map_err(|e| {
            let (code, msg) = describe(&e);
            match classify(&code) {
                Kind::Config("permissions") => ProviderError::Config {
                    key: "permissions".into(),
                    message: format!("{code}: {} ({msg})", super::errors::missing_permission(action, None)),
                },
                Kind::Config("credentials") => ProviderError::Config {
                    key: "credentials".into(),
                    message: format!(
                        "{code}: {msg} (provide AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                         AWS_PROFILE, SSO, or an instance role)"
                    ),
                },
                Kind::Config(_) => {
                    ProviderError::Config { key: key.into(), message: format!("{what}: {code}: {msg}") }
                }
                _ => ProviderError::Other(format!("checking {what} in {}: {code} {msg}", self.region)),
            }
        })
    }
}
