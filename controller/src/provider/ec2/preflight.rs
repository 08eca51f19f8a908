//! Preflight: every setting checked against EC2 once at start, so a bad
//! value is one error naming its key instead of a storm of failed launches.

use super::errors::{Kind, classify, describe};
use super::*;

impl Ec2Provider {
    /// `Provider::preflight`: AMI, key pair, groups, subnets, instance types
    /// (and their architectures and instance store), then images.
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
        if !self.group_ids.is_empty() {
            let what = self.group_ids.join(", ");
            self.check(
                "DescribeSecurityGroups",
                c.describe_security_groups().set_group_ids(Some(self.group_ids.clone())).send().await,
                "security_groups",
                &what,
            )?;
        }
        if !self.group_names.is_empty() {
            let what = self.group_names.join(", ");
            self.check(
                "DescribeSecurityGroups",
                c.describe_security_groups().set_group_names(Some(self.group_names.clone())).send().await,
                "security_groups",
                &what,
            )?;
        }
        let subnets: Vec<String> = self.subnets.iter().flatten().cloned().collect();
        if !subnets.is_empty() {
            let what = subnets.join(", ");
            self.check(
                "DescribeSubnets",
                c.describe_subnets().set_subnet_ids(Some(subnets)).send().await,
                "subnet_ids",
                &what,
            )?;
        }
        // Instance types, and the architecture each one runs.
        let mut types: Vec<(String, String)> =
            vec![(self.master_type.clone(), "master_instance_type".into())];
        for (i, p) in self.pools.iter().enumerate() {
            for t in &p.instance_types {
                types.push((t.clone(), format!("slave_pools[{i}].instance_types")));
            }
        }
        let mut arch_keys: Vec<(String, String, String)> = Vec::new(); // (arch, type, key)
        for (t, key) in types {
            let key = if self.pools.len() == 1 && self.pools[0].name == crate::config::DEFAULT_POOL {
                "instance_type".to_string()
            } else {
                key
            };
            if let Some(known) = self.type_arch.lock().expect("lock").get(&t).cloned() {
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
            let store = out.instance_types().first().and_then(|i| i.instance_storage_info()).map(|s| {
                let disks: Vec<String> = s
                    .disks()
                    .iter()
                    .map(|d| format!("{} x {} GB", d.count().unwrap_or(1), d.size_in_gb().unwrap_or(0)))
                    .collect();
                disks.join(" + ")
            });
            self.scratch_notes.lock().expect("lock").push(match store {
                Some(disks) if !disks.is_empty() => {
                    format!("scratch on {t}: {disks} instance store, mounted at {}", self.scratch_path)
                }
                _ => {
                    format!("scratch on {t}: no instance store, {} is on the root volume", self.scratch_path)
                }
            });
            self.type_arch.lock().expect("lock").insert(t.clone(), arch.clone());
            arch_keys.push((arch, t, key));
        }
        self.resolve_images(&arch_keys).await
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
