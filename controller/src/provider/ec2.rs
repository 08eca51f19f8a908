//! The EC2 spot provider: the only module that knows the AWS SDK.
//!
//! # Expected flow
//! - `preflight` checks credentials, region, AMI, key pair, security groups,
//!   subnets and instance types once, so a bad value is one clear error that
//!   names its config key instead of a storm of failed launches.
//! - `launch` starts a whole batch (one pool, up to 100 nodes) with one
//!   `RunInstances` call: spot market, one-time, max price = `max_bid`,
//!   `MinCount = MaxCount = N` (all or nothing), tagged at launch, with a
//!   `ClientToken` so a retried call never launches twice. On a capacity or
//!   price error it tries the pool's next instance type / subnet, then the
//!   other pools' types; a failing candidate cools down (shown in status).
//! - `list` is one paginated `DescribeInstances` with a tag filter per tick;
//!   `terminate` batches `TerminateInstances` (1000 ids per call).
//!
//! # Guarantees
//! - Throttling backs off exponentially (with jitter) and launches wait;
//!   configuration errors block launches until the config is fixed. Neither
//!   retries in a hot loop.
//! - Every instance carries the tag `<tag_key> = master|slave` (as the
//!   original did), `ddisco:pool` and `ddisco:batch`.

use super::fallback::{self, Market};
use super::images::{self, ImageInfo, ImageSpec, Resolved};
use super::security_group::{self, Rule};
use super::{LaunchBatch, Launched, Observed, Provider, ProviderError, Target};
use crate::config::{Config, Pool};
use crate::model::Role;
use crate::plan::NodeLayout;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use base64::Engine;
use std::collections::HashMap;
use std::sync::Mutex;

use std::time::{Duration, Instant};

/// Tag holding the launch batch id.
pub const BATCH_TAG: &str = "ddisco:batch";
/// Tag holding the slave pool.
pub const POOL_TAG: &str = "ddisco:pool";

pub struct Ec2Provider {
    client: Client,
    region: String,
    tag_key: String,
    /// The `ami` setting: an id, or an alias resolved at preflight.
    ami: ImageSpec,
    /// The setting as written (for messages).
    ami_text: String,
    key_name: String,
    group_ids: Vec<String>,
    group_names: Vec<String>,
    subnets: Vec<Option<String>>,
    max_bid: String,
    master_type: String,
    master_on_demand: bool,
    pools: Vec<Pool>,
    ssh_user: String,
    iam_profile: Option<String>,
    scratch_path: String,
    cooldown: Duration,
    fallback: fallback::Policy,
    /// Std mutex: a few field updates, never held across `.await`.
    state: Mutex<State>,
    /// API calls and errors per action (for /metrics).
    calls: Mutex<std::collections::BTreeMap<&'static str, (u64, u64)>>,
    /// instance id -> (type, zone), from the last listing (for prices).
    placement: Mutex<HashMap<String, (String, String)>>,
    /// Instance type -> architecture (`x86_64`, `arm64`), from preflight.
    type_arch: Mutex<HashMap<String, String>>,
    /// Architecture -> image id in force, from preflight.
    image_by_arch: Mutex<HashMap<String, String>>,
    /// What scratch each instance type gets (for status), from preflight.
    scratch_notes: Mutex<Vec<String>>,
    /// Aliases resolved (for status), and the cache file holding them.
    resolved: Mutex<Vec<Resolved>>,
    image_cache: std::path::PathBuf,
}

/// Resolved aliases are reused from the cache file for this long, so a
/// restarted controller keeps launching the image its running nodes have.
const IMAGE_CACHE_SECS: u64 = 24 * 3600;

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedImage {
    resolved: Resolved,
    /// Unix seconds.
    at: u64,
}

#[derive(Default)]
struct State {
    /// (instance type, subnet) -> (until, why).
    /// (instance type, subnet, spot?) -> (until, why).
    cooling: HashMap<(String, Option<String>, bool), (Instant, String)>,
    /// Spot failures and interruptions per pool (on-demand fallback).
    book: fallback::Book,
    backoff_until: Option<Instant>,
    backoff_attempt: u32,
    blocked: Option<(String, String)>,
}

/// How an EC2 error is handled.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Capacity,
    Throttled,
    /// A config key is wrong.
    Config(&'static str),
    Other,
}

/// Sorts an EC2 error into the handling it needs, using the message where
/// the code alone does not say which setting is wrong.
fn classify_error(code: &str, msg: &str) -> Kind {
    if code == "NoSuchEntity" || (code == "InvalidParameterValue" && msg.contains("iamInstanceProfile")) {
        return Kind::Config("iam_instance_profile");
    }
    classify(code)
}

/// Sorts EC2 error codes into the handling they need.
fn classify(code: &str) -> Kind {
    match code {
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "SpotMaxPriceTooLow"
        | "MaxSpotInstanceCountExceeded"
        | "Unsupported"
        | "InsufficientFreeAddressesInSubnet"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded" => Kind::Capacity,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => Kind::Throttled,
        c if c.starts_with("InvalidAMIID") => Kind::Config("ami"),
        c if c.starts_with("InvalidKeyPair") => Kind::Config("key_name"),
        c if c.starts_with("InvalidGroup") => Kind::Config("security_groups"),
        c if c.starts_with("InvalidSubnet") => Kind::Config("subnet_ids"),
        c if c.starts_with("InvalidInstanceType") => Kind::Config("instance_type"),
        "AuthFailure" | "UnauthorizedOperation" | "OptInRequired" | "Blocked" => Kind::Config("credentials"),
        _ => Kind::Other,
    }
}

fn describe<E: ProvideErrorMetadata + std::fmt::Debug>(e: &SdkError<E>) -> (String, String) {
    let code = e.code().unwrap_or("").to_string();
    let msg = match e.message() {
        Some(m) => m.to_string(),
        None => match e {
            SdkError::DispatchFailure(d) => format!("cannot reach the EC2 endpoint: {d:?}"),
            SdkError::TimeoutError(_) => "EC2 call timed out".into(),
            other => format!("{other:?}"),
        },
    };
    (code, msg)
}

impl Ec2Provider {
    /// Builds the client from the config and the standard AWS chain.
    pub async fn new(cfg: &Config) -> Result<Ec2Provider, ProviderError> {
        use aws_config::{BehaviorVersion, Region, retry::RetryConfig};
        // Deadlines on every call: a hung connection must not stall the
        // reconcile loop (it waits for each listing).
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(20))
            .operation_timeout(Duration::from_secs(60))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(cfg.ec2_max_attempts))
            .timeout_config(timeouts);
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some((access, secret)) = &cfg.aws_keys {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                access,
                &secret.0,
                None,
                None,
                "ddisco-config-file",
            ));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(|r| r.to_string()).ok_or_else(|| ProviderError::Config {
            key: "region".into(),
            message: "no AWS region: set `region` in the config, or AWS_REGION, or a profile's region".into(),
        })?;
        let no_creds = |why: String| ProviderError::Config {
            key: "credentials".into(),
            message: format!(
                "no AWS credentials ({why}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE \
                 (aws configure / aws sso login), or run the controller with an instance role"
            ),
        };
        {
            use aws_sdk_ec2::config::ProvideCredentials;
            let provider = sdk.credentials_provider().ok_or_else(|| no_creds("no provider".into()))?;
            provider.provide_credentials().await.map_err(|e| no_creds(e.to_string()))?;
        }
        let (group_ids, group_names) =
            cfg.security_groups.iter().cloned().partition(|g: &String| g.starts_with("sg-"));
        let subnets = if cfg.subnet_ids.is_empty() {
            vec![None]
        } else {
            cfg.subnet_ids.iter().cloned().map(Some).collect()
        };
        Ok(Ec2Provider {
            client: Client::new(&sdk),
            region,
            tag_key: cfg.tag_key.clone(),
            ami: images::parse(&cfg.ami)
                .map_err(|message| ProviderError::Config { key: "ami".into(), message })?,
            ami_text: cfg.ami.trim().to_string(),
            key_name: cfg.key_name.clone(),
            group_ids,
            group_names,
            subnets,
            max_bid: cfg.max_bid.trim().to_string(),
            master_type: cfg.master_instance_type().to_string(),
            master_on_demand: cfg.master_on_demand,
            pools: cfg.pools(),
            ssh_user: cfg.ssh_user.clone(),
            iam_profile: cfg.iam_instance_profile.clone(),
            scratch_path: cfg.scratch_path.clone(),
            cooldown: cfg.capacity_cooldown,
            fallback: fallback::Policy {
                roles: cfg.on_demand_fallback,
                failures: cfg.fallback_failures,
                interruptions: cfg.fallback_interruptions,
                window: cfg.fallback_window,
            },
            state: Mutex::new(State::default()),
            calls: Mutex::default(),
            placement: Mutex::default(),
            type_arch: Mutex::default(),
            scratch_notes: Mutex::default(),
            image_by_arch: Mutex::default(),
            resolved: Mutex::default(),
            image_cache: cfg.state_dir.join("images.json"),
        })
    }

    /// (type, subnet) pairs to try for a pool, in order: the pool's own
    /// types, then the other pools' (overflow), each in every subnet.
    fn candidates(&self, role: Role, pool: &str) -> Vec<(String, Option<String>)> {
        let mut types: Vec<String> = Vec::new();
        if role == Role::Master {
            types.push(self.master_type.clone());
        } else {
            let own = self.pools.iter().filter(|p| p.name == pool);
            let others = self.pools.iter().filter(|p| p.name != pool);
            for p in own.chain(others) {
                for t in &p.instance_types {
                    if !types.contains(t) {
                        types.push(t.clone());
                    }
                }
            }
        }
        types.into_iter().flat_map(|t| self.subnets.iter().map(move |s| (t.clone(), s.clone()))).collect()
    }

    /// Does this role launch on-demand (not spot)?
    fn on_demand(&self, role: Role) -> bool {
        role == Role::Master && self.master_on_demand
    }

    /// Counts one API call and whether it failed.
    fn count<T, E>(&self, action: &'static str, r: &Result<T, E>) {
        let mut calls = self.calls.lock().expect("lock");
        let e = calls.entry(action).or_default();
        e.0 += 1;
        if r.is_err() {
            e.1 += 1;
        }
    }

    fn throttled(&self, msg: &str) -> ProviderError {
        let mut st = self.state.lock().expect("lock");
        st.backoff_attempt = (st.backoff_attempt + 1).min(6);
        let ceiling = Duration::from_secs(1u64 << st.backoff_attempt); // 2 s .. 64 s
        let wait =
            ceiling / 2 + Duration::from_millis(rand::random_range(0..=ceiling.as_millis() as u64 / 2));
        st.backoff_until = Some(Instant::now() + wait);
        ProviderError::Throttled(format!("{msg}; backing off {:.1}s", wait.as_secs_f64()))
    }

    fn block(&self, key: &str, msg: String) -> ProviderError {
        self.state.lock().expect("lock").blocked = Some((key.to_string(), msg.clone()));
        ProviderError::Config { key: key.to_string(), message: msg }
    }

    fn ok_call(&self) {
        let mut st = self.state.lock().expect("lock");
        st.backoff_attempt = 0;
        st.backoff_until = None;
    }

    async fn run(
        &self,
        batch: &LaunchBatch,
        itype: &str,
        subnet: Option<&str>,
        attempt: usize,
        spot: bool,
    ) -> Result<aws_sdk_ec2::operation::run_instances::RunInstancesOutput, (String, String)> {
        let n = batch.nodes.len() as i32;
        let tags = [
            Tag::builder().key(&self.tag_key).value(batch.role.to_string()).build(),
            Tag::builder().key(POOL_TAG).value(&batch.pool).build(),
            Tag::builder().key(BATCH_TAG).value(&batch.batch_id).build(),
            Tag::builder().key("Name").value(format!("{}-{}", self.tag_key, batch.role)).build(),
        ];
        let spec = |rt: ResourceType| {
            TagSpecification::builder().resource_type(rt).set_tags(Some(tags.to_vec())).build()
        };
        let market = InstanceMarketOptionsRequest::builder()
            .market_type(MarketType::Spot)
            .spot_options(
                SpotMarketOptions::builder()
                    .max_price(&self.max_bid)
                    .spot_instance_type(SpotInstanceType::OneTime)
                    .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                    .build(),
            )
            .build();
        let mut req = self
            .client
            .run_instances()
            .image_id(self.image_for(itype).map_err(|m| ("ddisco.ImageNotResolved".to_string(), m))?)
            .instance_type(InstanceType::from(itype))
            .min_count(n)
            .max_count(n)
            .client_token(format!("{}-{attempt}", batch.batch_id))
            .user_data(base64::engine::general_purpose::STANDARD.encode(&batch.userdata))
            .set_instance_market_options(spot.then_some(market))
            .tag_specifications(spec(ResourceType::Instance))
            .set_subnet_id(subnet.map(String::from));
        if !self.key_name.is_empty() {
            req = req.key_name(&self.key_name);
        }
        if let Some(p) = &self.iam_profile {
            let spec = aws_sdk_ec2::types::IamInstanceProfileSpecification::builder();
            req = req
                .iam_instance_profile(if p.starts_with("arn:") { spec.arn(p) } else { spec.name(p) }.build());
        }
        if !self.group_ids.is_empty() {
            req = req.set_security_group_ids(Some(self.group_ids.clone()));
        }
        if !self.group_names.is_empty() {
            req = req.set_security_groups(Some(self.group_names.clone()));
        }
        let r = req.send().await;
        self.count("RunInstances", &r);
        r.map_err(|e| describe(&e))
    }

    /// The image to launch an instance type with (after preflight).
    fn image_for(&self, itype: &str) -> Result<String, String> {
        if let ImageSpec::Id(id) = &self.ami {
            return Ok(id.clone());
        }
        let arch =
            self.type_arch.lock().expect("lock").get(itype).cloned().unwrap_or_else(|| "x86_64".into());
        self.image_by_arch
            .lock()
            .expect("lock")
            .get(&arch)
            .cloned()
            .ok_or_else(|| format!("{} is not resolved for {arch} ({itype})", self.ami_text))
    }

    /// Checks the `ami` setting against every architecture the configured
    /// instance types need: an id must exist and match them; an alias is
    /// resolved once per architecture (or taken from the day's cache).
    async fn resolve_images(&self, needed: &[(String, String, String)]) -> Result<(), ProviderError> {
        let c = &self.client;
        match &self.ami {
            ImageSpec::Id(id) => {
                let imgs =
                    self.check("DescribeImages", c.describe_images().image_ids(id).send().await, "ami", id)?;
                let Some(img) = imgs.images().first() else {
                    return Err(ProviderError::Config {
                        key: "ami".into(),
                        message: format!("{id} does not exist in {}", self.region),
                    });
                };
                let img_arch = img.architecture().map(|a| a.as_str().to_string());
                for (arch, itype, key) in needed {
                    if let Some(ia) = img_arch.as_deref().filter(|ia| ia != arch) {
                        return Err(ProviderError::Config {
                            key: key.clone(),
                            message: format!(
                                "{itype} runs {arch} but ami {id} is an {ia} image: use instance types of one \
                                 architecture, or an alias such as `ami = \"ubuntu:24.04\"`, which resolves \
                                 per architecture"
                            ),
                        });
                    }
                }
            }
            ImageSpec::Alias(alias) => {
                let mut archs: Vec<&str> = needed.iter().map(|(a, _, _)| a.as_str()).collect();
                archs.sort();
                archs.dedup();
                let mut cache = self.read_image_cache();
                let mut resolved = Vec::new();
                for arch in archs {
                    let cached = cache
                        .iter()
                        .find(|e| {
                            e.resolved.region == self.region
                                && e.resolved.alias == alias.to_string()
                                && e.resolved.architecture == arch
                        })
                        .map(|e| e.resolved.clone());
                    let r = match cached {
                        Some(r) if self.still_available(&r.image.id).await => r,
                        _ => {
                            let r = self.resolve_alias(alias, arch).await?;
                            cache.retain(|e| {
                                !(e.resolved.region == r.region
                                    && e.resolved.alias == r.alias
                                    && e.resolved.architecture == r.architecture)
                            });
                            cache.push(CachedImage { resolved: r.clone(), at: unix_now() });
                            r
                        }
                    };
                    tracing::info!("image: {}", r.describe());
                    self.image_by_arch.lock().expect("lock").insert(arch.to_string(), r.image.id.clone());
                    resolved.push(r);
                }
                self.write_image_cache(&cache);
                *self.resolved.lock().expect("lock") = resolved;
            }
        }
        Ok(())
    }

    /// The newest official image of `alias` for `arch` in this region.
    async fn resolve_alias(&self, alias: &images::Alias, arch: &str) -> Result<Resolved, ProviderError> {
        let mut req = self.client.describe_images().owners(images::CANONICAL_OWNER);
        for (name, value) in images::filters(alias, arch) {
            req = req.filters(Filter::builder().name(name).values(value).build());
        }
        let what = format!("{alias} ({arch})");
        let out = self.check("DescribeImages", req.send().await, "ami", &what)?;
        let found: Vec<ImageInfo> = out
            .images()
            .iter()
            .filter_map(|i| {
                Some(ImageInfo {
                    id: i.image_id()?.to_string(),
                    name: i.name()?.to_string(),
                    owner: i.owner_id()?.to_string(),
                    architecture: i.architecture()?.as_str().to_string(),
                    created: i.creation_date().unwrap_or("").to_string(),
                    ebs: i.root_device_type().is_some_and(|d| d.as_str() == "ebs"),
                })
            })
            .collect();
        let image = images::newest(alias, arch, &found).ok_or_else(|| ProviderError::Config {
            key: "ami".into(),
            message: format!(
                "`{alias}` resolves to no official Ubuntu image for {arch} in region {}: nothing owned by \
                 Canonical ({}) is named {} there ({} candidates looked at); use another release, region or \
                 instance type, or give an image id",
                self.region,
                images::CANONICAL_OWNER,
                images::name_pattern(alias, arch),
                found.len()
            ),
        })?;
        Ok(Resolved {
            region: self.region.clone(),
            alias: alias.to_string(),
            architecture: arch.into(),
            image,
        })
    }

    /// Is a cached image still there? Any doubt (an error too): no, and the
    /// alias is resolved again.
    async fn still_available(&self, id: &str) -> bool {
        let r = self.client.describe_images().image_ids(id).send().await;
        self.count("DescribeImages", &r);
        r.ok().is_some_and(|o| {
            o.images().first().is_some_and(|i| i.state().is_some_and(|s| s.as_str() == "available"))
        })
    }

    fn read_image_cache(&self) -> Vec<CachedImage> {
        let now = unix_now();
        std::fs::read_to_string(&self.image_cache)
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<CachedImage>>(&t).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| now.saturating_sub(e.at) < IMAGE_CACHE_SECS)
            .collect()
    }

    fn write_image_cache(&self, cache: &[CachedImage]) {
        let text = serde_json::to_string_pretty(cache).expect("serialize");
        if let Err(e) = std::fs::write(&self.image_cache, text) {
            tracing::warn!(
                "cannot write {}: {e} (images are resolved again next start)",
                self.image_cache.display()
            );
        }
    }

    /// Where a pool launches now: configured on-demand, fallen back to
    /// on-demand, or spot.
    fn market(&self, role: Role, pool: &str) -> Market {
        if self.on_demand(role) {
            return Market::OnDemand { why: "master_on_demand = true".into() };
        }
        self.state.lock().expect("lock").book.market(&self.fallback, role, pool, Instant::now())
    }

    /// Launches the batch with the first candidate (type, subnet) that has
    /// capacity, on spot or on-demand. A candidate that reports no capacity
    /// cools down (per market); a spot one also counts towards fallback.
    async fn try_candidates(
        &self,
        batch: &LaunchBatch,
        spot: bool,
        why: Option<String>,
    ) -> Result<Vec<Launched>, ProviderError> {
        let mut last = None;
        let market_name = if spot { "spot" } else { "on-demand" };
        for (attempt, (itype, subnet)) in self.candidates(batch.role, &batch.pool).into_iter().enumerate() {
            let key = (itype.clone(), subnet.clone(), spot);
            if self
                .state
                .lock()
                .expect("lock")
                .cooling
                .get(&key)
                .is_some_and(|(until, _)| *until > Instant::now())
            {
                continue;
            }
            let attempt = if spot { attempt } else { 1000 + attempt };
            match self.run(batch, &itype, subnet.as_deref(), attempt, spot).await {
                Ok(out) => {
                    self.ok_call();
                    let mut launched = Vec::new();
                    for inst in out.instances() {
                        let idx = inst.ami_launch_index().unwrap_or(0) as usize;
                        if let (Some(id), Some(z)) =
                            (inst.instance_id(), inst.placement().and_then(|p| p.availability_zone()))
                        {
                            self.placement.lock().expect("lock").insert(id.into(), (itype.clone(), z.into()));
                        }
                        if let (Some(node), Some(id)) = (batch.nodes.get(idx), inst.instance_id()) {
                            launched.push(Launched {
                                node_id: node.clone(),
                                instance_id: id.to_string(),
                                instance_type: itype.clone(),
                                market: if spot {
                                    crate::model::Market::Spot
                                } else {
                                    crate::model::Market::OnDemand
                                },
                                on_demand_why: why.clone(),
                            });
                        }
                    }
                    return Ok(launched);
                }
                Err((code, msg)) => match classify_error(&code, &msg) {
                    Kind::Capacity => {
                        let why = format!(
                            "{itype} {market_name} in {}: {code}",
                            subnet.as_deref().unwrap_or(&self.region)
                        );
                        tracing::warn!("{why}: {msg}; trying the next candidate");
                        let mut st = self.state.lock().expect("lock");
                        st.cooling.insert(key, (Instant::now() + self.cooldown, why.clone()));
                        if spot {
                            st.book.spot_failed(&batch.pool, Instant::now(), why.clone());
                        }
                        last = Some(why);
                    }
                    Kind::Throttled => return Err(self.throttled(&format!("{code}: {msg}"))),
                    Kind::Config("instance_type") if self.pools.len() > 1 || batch.role == Role::Master => {
                        let key =
                            if batch.role == Role::Master { "master_instance_type" } else { "slave_pools" };
                        return Err(self.block(key, format!("{itype}: {code}: {msg}")));
                    }
                    Kind::Config(key) => return Err(self.block(key, format!("{code}: {msg}"))),
                    Kind::Other => return Err(ProviderError::Other(format!("RunInstances: {code}: {msg}"))),
                },
            }
        }
        Err(ProviderError::Capacity(match last {
            Some(why) => format!("every {market_name} candidate of pool {} failed, last: {why}", batch.pool),
            None => format!(
                "every {market_name} candidate of pool {} is cooling down after capacity errors",
                batch.pool
            ),
        }))
    }

    /// Creates the cluster's security group `name` if it does not exist, and
    /// adds whichever of its rules are missing (see `security_group`); with
    /// `controller`, also lets the group reach the controller's ports in the
    /// controller's own group. Safe to run again: it only adds what is
    /// missing and says what exists already.
    pub async fn ensure_security_group(
        &self,
        name: &str,
        ssh_from: Option<&str>,
        controller: Option<(&str, &[u16])>,
    ) -> Result<SgReport, ProviderError> {
        use aws_sdk_ec2::types::Tag;
        let c = &self.client;
        let vpc_id = match self.subnets.iter().flatten().next() {
            Some(subnet) => {
                let out = self.check(
                    "DescribeSubnets",
                    c.describe_subnets().subnet_ids(subnet).send().await,
                    "subnet_ids",
                    subnet,
                )?;
                out.subnets().first().and_then(|s| s.vpc_id()).map(String::from)
            }
            None => {
                let f = Filter::builder().name("isDefault").values("true").build();
                let out =
                    self.check("DescribeVpcs", c.describe_vpcs().filters(f).send().await, "region", "VPCs")?;
                out.vpcs().first().and_then(|v| v.vpc_id()).map(String::from)
            }
        }
        .ok_or_else(|| ProviderError::Config {
            key: "subnet_ids".into(),
            message: format!(
                "no default VPC in {}: set subnet_ids to subnets of the VPC the cluster should use",
                self.region
            ),
        })?;
        let by_name = [
            Filter::builder().name("group-name").values(name).build(),
            Filter::builder().name("vpc-id").values(&vpc_id).build(),
        ];
        let out = self.check(
            "DescribeSecurityGroups",
            c.describe_security_groups().set_filters(Some(by_name.to_vec())).send().await,
            "security_groups",
            name,
        )?;
        let (group_id, created, existing) = match out.security_groups().first() {
            Some(g) => (g.group_id().unwrap_or_default().to_string(), false, rules_of(g.ip_permissions())),
            None => {
                let tags = TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(Tag::builder().key(&self.tag_key).value("security-group").build())
                    .tags(Tag::builder().key("Name").value(name).build())
                    .build();
                let r = c
                    .create_security_group()
                    .group_name(name)
                    .description(format!(
                        "ddisco cluster {}: nodes talk to each other, SSH from the operator",
                        self.tag_key
                    ))
                    .vpc_id(&vpc_id)
                    .tag_specifications(tags)
                    .send()
                    .await;
                let out = self.check("CreateSecurityGroup", r, "security_groups", name)?;
                (out.group_id().unwrap_or_default().to_string(), true, vec![])
            }
        };
        let mut report = SgReport { group_id: group_id.clone(), vpc_id, created, ..Default::default() };
        let wanted = security_group::node_rules(&group_id, ssh_from);
        self.authorize(&group_id, &wanted, &existing, &mut report.added, &mut report.present).await?;
        if let Some((cg, ports)) = controller {
            let out = self.check(
                "DescribeSecurityGroups",
                c.describe_security_groups().group_ids(cg).send().await,
                "security_groups",
                cg,
            )?;
            let existing =
                out.security_groups().first().map(|g| rules_of(g.ip_permissions())).unwrap_or_default();
            let wanted = security_group::controller_rules(&group_id, ports);
            self.authorize(
                cg,
                &wanted,
                &existing,
                &mut report.controller_added,
                &mut report.controller_present,
            )
            .await?;
        }
        Ok(report)
    }

    /// Adds the `wanted` rules that `existing` lacks to `group_id`.
    async fn authorize(
        &self,
        group_id: &str,
        wanted: &[Rule],
        existing: &[Rule],
        added: &mut Vec<String>,
        present: &mut Vec<String>,
    ) -> Result<(), ProviderError> {
        use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, UserIdGroupPair};
        let missing = security_group::missing(wanted, existing);
        present.extend(wanted.iter().filter(|w| !missing.contains(w)).map(|r| r.to_string()));
        if missing.is_empty() {
            return Ok(());
        }
        let perms: Vec<IpPermission> = missing
            .iter()
            .map(|r| {
                let p = IpPermission::builder()
                    .ip_protocol(r.proto.as_ec2())
                    .from_port(i32::from(r.from_port))
                    .to_port(i32::from(r.to_port));
                match &r.source {
                    security_group::Source::Group(g) => p.user_id_group_pairs(
                        UserIdGroupPair::builder().group_id(g).description("ddisco cluster members").build(),
                    ),
                    security_group::Source::Cidr(c) if c.contains(':') => p.ipv6_ranges(
                        Ipv6Range::builder().cidr_ipv6(c).description("ddisco operator").build(),
                    ),
                    security_group::Source::Cidr(c) => {
                        p.ip_ranges(IpRange::builder().cidr_ip(c).description("ddisco operator").build())
                    }
                }
                .build()
            })
            .collect();
        let r = self
            .client
            .authorize_security_group_ingress()
            .group_id(group_id)
            .set_ip_permissions(Some(perms))
            .send()
            .await;
        self.check("AuthorizeSecurityGroupIngress", r, "security_groups", group_id)?;
        added.extend(missing.iter().map(|r| r.to_string()));
        Ok(())
    }

    /// Runs a preflight call; maps an error to the config key it concerns.
    fn check<T, E: ProvideErrorMetadata + std::fmt::Debug>(
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

/// What `ensure_security_group` found and did.
#[derive(Debug, Default)]
pub struct SgReport {
    pub group_id: String,
    pub vpc_id: String,
    pub created: bool,
    pub added: Vec<String>,
    pub present: Vec<String>,
    pub controller_added: Vec<String>,
    pub controller_present: Vec<String>,
}

/// A group's ingress permissions as rules.
fn rules_of(perms: &[aws_sdk_ec2::types::IpPermission]) -> Vec<Rule> {
    let mut out = Vec::new();
    for p in perms {
        let Some(proto) = p.ip_protocol().and_then(security_group::Proto::from_ec2) else { continue };
        let port = |v: Option<i32>, d: u16| v.and_then(|v| u16::try_from(v).ok()).unwrap_or(d);
        let (from_port, to_port) = (port(p.from_port(), 0), port(p.to_port(), 65535));
        let sources = p
            .user_id_group_pairs()
            .iter()
            .filter_map(|g| g.group_id())
            .map(|g| security_group::Source::Group(g.into()))
            .chain(
                p.ip_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ip())
                    .map(|c| security_group::Source::Cidr(c.into())),
            )
            .chain(
                p.ipv6_ranges()
                    .iter()
                    .filter_map(|r| r.cidr_ipv6())
                    .map(|c| security_group::Source::Cidr(c.into())),
            );
        for source in sources {
            out.push(Rule { proto, from_port, to_port, source });
        }
    }
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[async_trait::async_trait]
impl Provider for Ec2Provider {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn layout(&self, _node_id: &str) -> NodeLayout {
        NodeLayout {
            root: "/".into(),
            system: true,
            home: format!("/home/{}", self.ssh_user).into(),
            owner: Some(self.ssh_user.clone()),
            venv: "/opt/ddisco/venv".into(),
            install_packages: true,
            scratch: Some(self.scratch_path.clone().into()),
        }
    }

    fn address_for(&self, _seq: u64) -> String {
        String::new()
    }

    fn max_batch(&self) -> usize {
        // One userdata (16 KiB at most) carries every slot of the batch.
        100
    }

    fn attests_instance_id(&self) -> bool {
        true
    }

    fn imds_url(&self) -> Option<&'static str> {
        Some("http://169.254.169.254")
    }

    async fn preflight(&self) -> Result<(), ProviderError> {
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

    fn can_launch(&self) -> Result<(), ProviderError> {
        let st = self.state.lock().expect("lock");
        if let Some((key, msg)) = &st.blocked {
            return Err(ProviderError::Config { key: key.clone(), message: msg.clone() });
        }
        if let Some(until) = st.backoff_until
            && until > Instant::now()
        {
            return Err(ProviderError::Throttled(format!(
                "backing off for {:.1}s more",
                (until - Instant::now()).as_secs_f64()
            )));
        }
        Ok(())
    }

    async fn launch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
        self.can_launch()?;
        let market = self.market(batch.role, &batch.pool);
        let spot = market == Market::Spot;
        match self.try_candidates(&batch, spot, None).await {
            Err(ProviderError::Capacity(m)) if spot => match self.market(batch.role, &batch.pool) {
                // The failures just seen crossed the threshold: on-demand now.
                Market::OnDemand { why } => {
                    tracing::warn!(
                        "pool {}: spot keeps failing ({m}); launching on-demand: {why}",
                        batch.pool
                    );
                    self.try_candidates(&batch, false, Some(why)).await
                }
                Market::Spot => Err(ProviderError::Capacity(m)),
            },
            other => other,
        }
        .map(|mut launched| {
            if let Market::OnDemand { why } = market {
                for l in &mut launched {
                    l.on_demand_why.get_or_insert(why.clone());
                }
            }
            launched
        })
    }

    async fn list(&self) -> Result<Vec<Observed>, ProviderError> {
        let filter =
            Filter::builder().name(format!("tag:{}", self.tag_key)).values("master").values("slave").build();
        let mut pages =
            self.client.describe_instances().filters(filter).max_results(1000).into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            self.count("DescribeInstances", &page);
            let page = page.map_err(|e| {
                let (code, msg) = describe(&e);
                match classify(&code) {
                    Kind::Throttled => self.throttled(&format!("DescribeInstances: {code}: {msg}")),
                    _ => ProviderError::Other(format!("DescribeInstances: {code}: {msg}")),
                }
            })?;
            for inst in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = inst.instance_id() else { continue };
                if let (Some(t), Some(z)) =
                    (inst.instance_type(), inst.placement().and_then(|p| p.availability_zone()))
                {
                    self.placement
                        .lock()
                        .expect("lock")
                        .insert(id.to_string(), (t.as_str().into(), z.into()));
                }
                let tag = |k: &str| inst.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value());
                let state = inst.state().and_then(|s| s.name());
                out.push(Observed {
                    instance_id: id.to_string(),
                    node_id: None,
                    batch: tag(BATCH_TAG)
                        .map(|b| (b.to_string(), inst.ami_launch_index().unwrap_or(0) as u32)),
                    alive: matches!(state, Some(InstanceStateName::Pending | InstanceStateName::Running)),
                });
            }
        }
        Ok(out)
    }

    async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError> {
        let ids: Vec<String> = targets.iter().filter_map(|t| t.instance_id.clone()).collect();
        for chunk in ids.chunks(1000) {
            let r = self.client.terminate_instances().set_instance_ids(Some(chunk.to_vec())).send().await;
            self.count("TerminateInstances", &r);
            if let Err(e) = r {
                let (code, msg) = describe(&e);
                if code == "InvalidInstanceID.NotFound" {
                    continue; // already gone
                }
                return Err(match classify(&code) {
                    Kind::Throttled => self.throttled(&format!("TerminateInstances: {code}: {msg}")),
                    _ => ProviderError::Other(format!("TerminateInstances: {code}: {msg}")),
                });
            }
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<Vec<String>, ProviderError> {
        let filter =
            Filter::builder().name(format!("tag:{}", self.tag_key)).values("master").values("slave").build();
        let open = Filter::builder().name("state").values("open").build();
        let reqs =
            match self.client.describe_spot_instance_requests().filters(filter).filters(open).send().await {
                Ok(r) => r,
                Err(e) => {
                    let (code, msg) = describe(&e);
                    tracing::warn!(
                        "cannot list open spot requests ({code}: {msg}); check them in the console"
                    );
                    return Ok(vec![]);
                }
            };
        let ids: Vec<String> = reqs
            .spot_instance_requests()
            .iter()
            .filter_map(|r| r.spot_instance_request_id())
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            self.client
                .cancel_spot_instance_requests()
                .set_spot_instance_request_ids(Some(ids.clone()))
                .send()
                .await
                .map_err(|e| {
                    ProviderError::Other(format!("CancelSpotInstanceRequests: {:?}", describe(&e)))
                })?;
        }
        Ok(ids)
    }

    async fn prices(&self, instance_ids: &[String]) -> Result<HashMap<String, f64>, ProviderError> {
        let wanted: Vec<(String, (String, String))> = {
            let p = self.placement.lock().expect("lock");
            instance_ids.iter().filter_map(|i| Some((i.clone(), p.get(i)?.clone()))).collect()
        };
        let mut types: Vec<String> = wanted.iter().map(|(_, (t, _))| t.clone()).collect();
        types.sort();
        types.dedup();
        if types.is_empty() {
            return Ok(HashMap::new());
        }
        let r = self
            .client
            .describe_spot_price_history()
            .set_instance_types(Some(types.iter().map(|t| InstanceType::from(t.as_str())).collect()))
            .product_descriptions("Linux/UNIX")
            .start_time(aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()))
            .send()
            .await;
        self.count("DescribeSpotPriceHistory", &r);
        let out = r.map_err(|e| {
            let (code, msg) = describe(&e);
            ProviderError::Other(format!("DescribeSpotPriceHistory: {code}: {msg}"))
        })?;
        // Newest price per (type, zone).
        let mut latest: HashMap<(String, String), (i64, f64)> = HashMap::new();
        for p in out.spot_price_history() {
            let (Some(t), Some(z), Some(price)) = (p.instance_type(), p.availability_zone(), p.spot_price())
            else {
                continue;
            };
            let Ok(price) = price.parse::<f64>() else { continue };
            let at = p.timestamp().map(|d| d.secs()).unwrap_or(0);
            let e = latest.entry((t.as_str().to_string(), z.to_string())).or_insert((at, price));
            if at >= e.0 {
                *e = (at, price);
            }
        }
        Ok(wanted
            .into_iter()
            .filter_map(|(id, (t, z))| {
                let exact = latest.get(&(t.clone(), z)).map(|(_, p)| *p);
                // Zone unknown to the history: the type's cheapest zone.
                let any =
                    || latest.iter().filter(|((lt, _), _)| *lt == t).map(|(_, (_, p))| *p).reduce(f64::min);
                Some((id, exact.or_else(any)?))
            })
            .collect())
    }

    fn api_calls(&self) -> Vec<(String, u64, u64)> {
        self.calls.lock().expect("lock").iter().map(|(a, (n, e))| (a.to_string(), *n, *e)).collect()
    }

    fn facts(&self) -> Vec<String> {
        let mut out: Vec<String> = match &self.ami {
            ImageSpec::Id(id) => vec![format!("image: {id}")],
            ImageSpec::Alias(_) => self
                .resolved
                .lock()
                .expect("lock")
                .iter()
                .map(|r| format!("image: {}", r.describe()))
                .collect(),
        };
        out.extend(self.scratch_notes.lock().expect("lock").iter().cloned());
        out
    }

    fn interrupted(&self, role: Role, pool: &str, node_id: &str) {
        if !self.on_demand(role) {
            self.state.lock().expect("lock").book.interrupted(pool, Instant::now(), node_id);
        }
    }

    fn spot_again(&self, role: Role, pool: &str) -> bool {
        self.market(role, pool) == Market::Spot
    }

    fn notes(&self) -> Vec<String> {
        let mut st = self.state.lock().expect("lock");
        let now = Instant::now();
        let mut out = Vec::new();
        for (pool, since, why) in st.book.on_demand_pools(&self.fallback, now) {
            out.push(format!(
                "pool {pool} launches on-demand (for {:.0}s): {why}; spot again after {:.0}s without spot trouble",
                since.as_secs_f64(),
                self.fallback.window.as_secs_f64()
            ));
        }
        if let Some((key, msg)) = &st.blocked {
            out.push(format!("launches blocked: config key `{key}`: {msg}; fix it and restart serve"));
        }
        if let Some(until) = st.backoff_until.filter(|u| *u > now) {
            out.push(format!("throttled by EC2: launches wait {:.0}s more", (until - now).as_secs_f64()));
        }
        let mut cooling: Vec<String> = st
            .cooling
            .values()
            .filter(|(until, _)| *until > now)
            .map(|(until, why)| {
                format!("no capacity: {why} (skipped for {:.0}s more)", (*until - now).as_secs_f64())
            })
            .collect();
        cooling.sort();
        out.extend(cooling);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_handling() {
        assert_eq!(classify("InsufficientInstanceCapacity"), Kind::Capacity);
        assert_eq!(classify("SpotMaxPriceTooLow"), Kind::Capacity);
        assert_eq!(classify("RequestLimitExceeded"), Kind::Throttled);
        assert_eq!(classify("InvalidAMIID.NotFound"), Kind::Config("ami"));
        assert_eq!(classify("InvalidAMIID.Malformed"), Kind::Config("ami"));
        assert_eq!(classify("InvalidKeyPair.NotFound"), Kind::Config("key_name"));
        assert_eq!(classify("InvalidGroup.NotFound"), Kind::Config("security_groups"));
        assert_eq!(classify("InvalidInstanceType"), Kind::Config("instance_type"));
        assert_eq!(classify("AuthFailure"), Kind::Config("credentials"));
        assert_eq!(classify("InternalError"), Kind::Other);
        let bad_profile =
            "Value (x) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name";
        assert_eq!(
            classify_error("InvalidParameterValue", bad_profile),
            Kind::Config("iam_instance_profile")
        );
        assert_eq!(classify_error("InvalidParameterValue", "other"), Kind::Other);
    }
}
