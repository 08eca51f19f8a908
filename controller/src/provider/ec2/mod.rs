//! The EC2 spot provider: the only module that knows the AWS SDK.
//!
//! # Expected flow
//! - `preflight` checks credentials, region, AMI, key pair, security groups,
//!   subnets and instance types once, so a bad value is one clear error that
//!   names its config key instead of a storm of failed launches.
//! - `launch` starts a batch (one pool, up to 100 nodes) with one
//!   `RunInstances` call: spot market, one-time, max price = `max_bid` if
//!   set, `MinCount = 1, MaxCount = N` (EC2 starts what it can; the rest
//!   are launched at a later tick), tagged at launch, with a `ClientToken`
//!   so a retried call never launches twice. On a capacity or price error
//!   it tries the pool's next instance type / subnet, then the other pools'
//!   types; a failing or short candidate cools down (shown in status). An
//!   account quota shrinks the request, then holds that market back.
//! - `list` is one paginated `DescribeInstances` with a tag filter per tick;
//!   `terminate` batches `TerminateInstances` (1000 ids per call).
//!
//! # Guarantees
//! - Throttling backs off exponentially (with jitter) and launches wait;
//!   configuration errors block launches until the config is fixed. Neither
//!   retries in a hot loop.
//! - Every instance carries the tag `<tag_key> = master|slave` (as the
//!   original did), `ddisco:pool`, `ddisco:batch` and `ddisco:cluster`.

mod allocate;
mod bake;
mod errors;
mod image_lookup;
mod launch;
mod preflight;
mod prices;
mod security_group;

pub use security_group::SgReport;

use super::fallback::{self, Market};
use super::images::{self, ImageInfo, ImageSpec, Resolved};
use super::{LaunchBatch, Launched, Observed, Provider, ProviderError, Target};
use crate::attest::Attestor;
use crate::config::{Ec2Config, NodeShape, Pool};
use crate::model::Role;
use crate::plan::NodeLayout;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use errors::{Kind, classify, describe};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;

use std::time::{Duration, Instant};

/// Tag holding the launch batch id.
pub const BATCH_TAG: &str = "ddisco:batch";
/// EC2's two kinds of host names for a node: of its private address
/// (`ip-10-0-0-7`) and of its instance (`i-0abc...`); none when its record
/// does not hold both (a controller that crashed before saving what the
/// enrollment proved cannot tell, and must not refuse the node's real name).
pub fn ec2_host_names(address: &str, instance_id: Option<&str>) -> Vec<String> {
    match (address.parse::<std::net::Ipv4Addr>(), instance_id.filter(|i| !i.is_empty())) {
        (Ok(_), Some(id)) => vec![format!("ip-{}", address.replace('.', "-")), id.to_string()],
        _ => vec![],
    }
}

/// The cluster id (`state::cluster_id`) on everything launched.
pub const CLUSTER_TAG: &str = "ddisco:cluster";
/// Tag holding the slave pool.
pub const POOL_TAG: &str = "ddisco:pool";

pub struct Ec2Provider {
    client: Client,
    region: String,
    /// Checks the identity documents agents enroll with.
    attestor: Attestor,
    /// Tagged on everything launched; only instances carrying it are ours.
    cluster_id: String,
    tag_key: String,
    /// The `ami` setting: an id, or an alias resolved at preflight.
    ami: ImageSpec,
    /// The setting as written (for messages).
    ami_text: String,
    key_name: String,
    /// Security groups by id, and by name (names become ids at preflight
    /// when nodes launch into subnets: EC2 takes no names with a subnet).
    group_ids: Mutex<Vec<String>>,
    group_names: Mutex<Vec<String>>,
    /// `subnet_ids`, or one default subnet per zone of the default VPC
    /// (found at preflight); `[None]`: EC2 picks (no default VPC).
    subnets: Mutex<Vec<Option<String>>>,
    /// Where launches place nodes across zones.
    spread: crate::config::Spread,
    /// The newest spot prices seen (they rank launch candidates).
    spot_book: Mutex<prices::SpotBook>,
    max_bid: String,
    master_type: String,
    master_on_demand: bool,
    /// The slave pools; a pool sized by requirements gets its types at
    /// preflight (`resolve_requirements`).
    pools: Mutex<Vec<Pool>>,
    /// What each pool sized by requirements resolved to (status facts).
    pool_notes: Mutex<Vec<String>>,
    ssh_user: String,
    /// Architectures the controller serves an agent for.
    agent_archs: Vec<String>,
    iam_profile: Option<String>,
    iam_propagation: Duration,
    scratch_path: String,
    /// Root volume size (GiB, gp3); 0: the image's.
    root_volume_gb: u32,
    /// Image id -> its root device name (for the root volume's mapping).
    root_devices: Mutex<HashMap<String, String>>,
    cooldown: Duration,
    fallback: fallback::Policy,
    /// Std mutex: a few field updates, never held across `.await`.
    state: Mutex<State>,
    /// API calls and errors per action (for /metrics).
    calls: Mutex<std::collections::BTreeMap<&'static str, (u64, u64)>>,
    /// Where each live instance runs, from launches and the last listing
    /// (prices, notices, spread).
    placement: Mutex<HashMap<String, Placed>>,
    /// Instances that run on-demand (costed at the on-demand price).
    on_demand_ids: Mutex<std::collections::HashSet<String>>,
    /// The AWS Price List API (on-demand prices).
    pricing: aws_sdk_pricing::Client,
    on_demand_cache: Mutex<prices::OnDemandCache>,
    on_demand_cache_file: std::path::PathBuf,
    /// Instance type -> architecture (`x86_64`, `arm64`), from preflight.
    type_arch: Mutex<HashMap<String, String>>,
    /// Architecture -> image id in force, from preflight.
    image_by_arch: Mutex<HashMap<String, String>>,
    /// Instance type -> vCPUs, from preflight.
    type_vcpus: Mutex<HashMap<String, u32>>,
    /// Architecture -> baked image (`bake`), which wins over `ami`.
    baked: Mutex<HashMap<String, String>>,
    /// What scratch each instance type gets (for status), from preflight.
    scratch_notes: Mutex<Vec<String>>,
    /// (instance type, subnet) pairs whose zone does not offer the type,
    /// from preflight: never tried.
    unsupported: Mutex<std::collections::HashSet<(String, String)>>,
    /// subnet id -> availability zone, from preflight.
    subnet_zones: Mutex<Vec<(String, String)>>,
    /// Aliases resolved (for status), and the cache file holding them.
    resolved: Mutex<Vec<Resolved>>,
    image_cache: std::path::PathBuf,
}

/// Where an instance runs.
#[derive(Debug, Clone)]
struct Placed {
    itype: String,
    zone: String,
    /// From its role tag (`None`: not tagged as ours).
    role: Option<Role>,
    /// When this controller launched it (kept while listings may not show
    /// it yet: spread counts it from its launch).
    launched: Option<Instant>,
}

/// How long an instance this controller launched counts as placed before
/// any listing shows it (EC2's listings lag; the registry's grace for a
/// node never listed is as long).
const PLACED_UNLISTED: Duration = Duration::from_secs(120);

#[derive(Default)]
struct State {
    /// (instance type, subnet, spot?) -> (until, why).
    cooling: HashMap<(String, Option<String>, bool), (Instant, String)>,
    /// Candidates that launched fewer than asked (with `MinCount = 1`):
    /// the next request to one asks all or nothing (`MinCount =
    /// MaxCount`). Real EC2 then says whether the pool is short (a capacity
    /// error: it cools down); an emulator that launches `MinCount`
    /// instances (moto, LocalStack) launches them all.
    short: std::collections::HashSet<(String, Option<String>, bool)>,
    /// Spot failures and interruptions per pool (on-demand fallback).
    book: fallback::Book,
    /// Launches wait until then, and why.
    backoff_until: Option<(Instant, String)>,
    backoff_attempt: u32,
    blocked: Option<(String, String)>,
    /// Account quota used up, per market (spot?): (until, what it says).
    quota: HashMap<bool, (Instant, String)>,
    /// When EC2 first refused the instance profile (it may be too new).
    profile_refused_at: Option<Instant>,
    /// (type, subnet) pools that sent a spot notice: tried last until then.
    avoid: HashMap<(String, Option<String>), (Instant, String)>,
}

/// This machine's private IPv4 address when it is an EC2 instance (its
/// instance metadata answers within a second); `None` elsewhere. The
/// standard AWS settings apply (`AWS_EC2_METADATA_SERVICE_ENDPOINT`).
pub async fn instance_private_ip() -> Option<std::net::IpAddr> {
    let client = aws_config::imds::Client::builder()
        .max_attempts(1)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(3))
        .build();
    let ip = client.get("/latest/meta-data/local-ipv4").await.ok()?;
    ip.as_ref().trim().parse().ok()
}

/// The identity-document checker for `region`: the certificate at `path`,
/// else AWS's built-in one (refused for the regions AWS signs with another).
fn attestor_for(path: Option<&Path>, region: &str) -> Result<Attestor, ProviderError> {
    let err = |message: String| ProviderError::Config { key: "identity_certificate".into(), message };
    let pem = match path {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?
        }
        None if crate::attest::REGIONS_WITH_OWN_CERTIFICATE.contains(&region)
            || region.starts_with("cn-")
            || region.starts_with("us-gov-") =>
        {
            return Err(err(format!(
                "AWS signs the instance identity documents of {region} with a certificate of its own: save it \
                 from the EC2 user guide (\"Verify the instance identity document\") and give its path here"
            )));
        }
        None => crate::attest::AWS_IDENTITY_CERTIFICATE.to_string(),
    };
    let what = path.map(|p| p.display().to_string()).unwrap_or_else(|| "the built-in AWS certificate".into());
    Attestor::from_pem(&pem, region).map_err(|e| err(format!("{what}: {e}")))
}

impl Ec2Provider {
    /// Builds the client from the EC2 section and the standard AWS chain;
    /// `nodes` says what it launches, `state_dir` holds the image cache.
    /// Long by design: the SDK's settings (timeouts, retries, endpoint,
    /// credentials) in one place, each with why.
    pub async fn new(
        cfg: &Ec2Config,
        nodes: &NodeShape,
        state_dir: &Path,
        cluster_id: &str,
    ) -> Result<Ec2Provider, ProviderError> {
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
        let attestor = attestor_for(cfg.identity_certificate.as_deref(), &region)?;
        let (group_ids, group_names) =
            cfg.security_groups.iter().cloned().partition(|g: &String| g.starts_with("sg-"));
        let subnets = if cfg.subnet_ids.is_empty() {
            vec![None]
        } else {
            cfg.subnet_ids.iter().cloned().map(Some).collect()
        };
        Ok(Ec2Provider {
            client: Client::new(&sdk),
            cluster_id: cluster_id.to_string(),
            attestor,
            region,
            tag_key: nodes.tag_key.clone(),
            ami: images::parse(&cfg.ami)
                .map_err(|message| ProviderError::Config { key: "ami".into(), message })?,
            ami_text: cfg.ami.trim().to_string(),
            key_name: cfg.key_name.clone(),
            group_ids: Mutex::new(group_ids),
            group_names: Mutex::new(group_names),
            subnets: Mutex::new(subnets),
            spread: cfg.spread,
            spot_book: Mutex::default(),
            max_bid: cfg.max_bid.trim().to_string(),
            master_type: nodes.master_instance_type.clone(),
            master_on_demand: cfg.master_on_demand,
            pools: Mutex::new(nodes.pools.clone()),
            pool_notes: Mutex::default(),
            ssh_user: nodes.ssh_user.clone(),
            agent_archs: nodes.agent_archs.clone(),
            iam_profile: cfg.iam_instance_profile.clone(),
            iam_propagation: cfg.iam_propagation,
            scratch_path: nodes.scratch_path.clone(),
            root_volume_gb: cfg.root_volume_gb,
            root_devices: Mutex::default(),
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
            on_demand_ids: Mutex::default(),
            // The Price List API answers in us-east-1 (and two other
            // regions) for every region.
            pricing: aws_sdk_pricing::Client::from_conf(
                aws_sdk_pricing::config::Builder::from(&sdk).region(Region::new("us-east-1")).build(),
            ),
            on_demand_cache: Mutex::new(prices::read_on_demand_cache(
                &state_dir.join("on-demand-prices.json"),
            )),
            on_demand_cache_file: state_dir.join("on-demand-prices.json"),
            type_arch: Mutex::default(),
            scratch_notes: Mutex::default(),
            unsupported: Mutex::default(),
            subnet_zones: Mutex::default(),
            image_by_arch: Mutex::default(),
            baked: Mutex::default(),
            type_vcpus: Mutex::default(),
            resolved: Mutex::default(),
            image_cache: state_dir.join("images.json"),
        })
    }

    /// Every (type, subnet) a pool's batch could launch in, in config
    /// order, with its tier: the pool's own types, then the other pools'
    /// (overflow), each in every subnet. The master's: its type, then the
    /// slaves' types: without a master the cluster runs nothing, so a
    /// master type without spot capacity is no reason to wait. Pairs whose
    /// zone does not offer the type are left out.
    fn candidates(&self, role: Role, pool: &str) -> Vec<allocate::Candidate> {
        let mut types: Vec<(String, u8)> = Vec::new();
        if role == Role::Master {
            types.push((self.master_type.clone(), 0));
        }
        {
            let pools = self.pools.lock();
            let own = pools.iter().filter(|p| p.name == pool);
            let others = pools.iter().filter(|p| p.name != pool);
            let tier = |p: &Pool| u8::from(role == Role::Master || p.name != pool);
            for p in own.chain(others) {
                for t in &p.instance_types {
                    if !types.iter().any(|(k, _)| k == t) {
                        types.push((t.clone(), tier(p)));
                    }
                }
            }
        }
        let unsupported = self.unsupported.lock();
        let subnets = self.subnets.lock().clone();
        let zones = self.subnet_zones.lock();
        let zone_of = |s: &Option<String>| {
            s.as_ref().and_then(|s| zones.iter().find(|(id, _)| id == s).map(|(_, z)| z.clone()))
        };
        types
            .into_iter()
            .flat_map(|(t, tier)| subnets.iter().map(move |s| (t.clone(), s.clone(), tier)))
            .filter(|(t, s, _)| s.as_ref().is_none_or(|s| !unsupported.contains(&(t.clone(), s.clone()))))
            .map(|(itype, subnet, tier)| allocate::Candidate { zone: zone_of(&subnet), itype, subnet, tier })
            .collect()
    }

    /// The candidates in the order a launch tries them (`allocate::rank`:
    /// own pool first, spread, spot price per vCPU; for on-demand launches
    /// config order), then those whose pool just sent a spot notice.
    async fn ranked(&self, role: Role, pool: &str, spot: bool) -> Vec<allocate::Ranked> {
        let cands = self.candidates(role, pool);
        let mut types: Vec<String> = cands.iter().map(|c| c.itype.clone()).collect();
        types.sort();
        types.dedup();
        let prices = if spot { self.spot_quotes(&types).await } else { HashMap::new() };
        let in_zone = self.role_zones(role);
        let vcpus = self.type_vcpus.lock().clone();
        let quoted = cands
            .into_iter()
            .map(|c| {
                let price = c.zone.as_ref().and_then(|z| prices.get(&(c.itype.clone(), z.clone())).copied());
                let q = allocate::Quote { price, vcpus: vcpus.get(&c.itype).copied() };
                (c, q)
            })
            .collect();
        let w = allocate::Weights {
            spread: if role == Role::Slave { self.spread } else { crate::config::Spread::None },
            in_zone: &in_zone,
            max_bid: self.max_bid.parse().ok(),
        };
        let mut out = allocate::rank(quoted, &w);
        // Pools that just sent a spot notice go last (stable).
        let now = Instant::now();
        let st = self.state.lock();
        out.sort_by_key(|r| {
            st.avoid
                .get(&(r.candidate.itype.clone(), r.candidate.subnet.clone()))
                .is_some_and(|(u, _)| *u > now)
        });
        out
    }

    /// This role's live instances per zone (for spread).
    fn role_zones(&self, role: Role) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for p in self.placement.lock().values().filter(|p| p.role == Some(role)) {
            *out.entry(p.zone.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Does this role launch on-demand (not spot)?
    fn on_demand(&self, role: Role) -> bool {
        role == Role::Master && self.master_on_demand
    }

    /// Counts one API call and whether it failed.
    fn count<T, E>(&self, action: &'static str, r: &Result<T, E>) {
        let mut calls = self.calls.lock();
        let e = calls.entry(action).or_default();
        e.0 += 1;
        if r.is_err() {
            e.1 += 1;
        }
    }

    fn throttled(&self, msg: &str) -> ProviderError {
        let wait = self.back_off(&format!("throttled by EC2: {msg}"));
        ProviderError::Throttled(format!("{msg}; backing off {:.1}s", wait.as_secs_f64()))
    }

    /// An error of no known class: launches back off too (exponentially,
    /// like throttling), so that it is not retried at every tick.
    fn unclassified(&self, msg: &str) -> ProviderError {
        let wait = self.back_off(msg);
        ProviderError::Other(format!("{msg}; launches back off {:.1}s", wait.as_secs_f64()))
    }

    /// Holds launches back: 2 s, 4 s, ... 64 s (with jitter) after each
    /// failure in a row; `ok_call` resets it.
    fn back_off(&self, why: &str) -> Duration {
        let mut st = self.state.lock();
        st.backoff_attempt = (st.backoff_attempt + 1).min(6);
        let ceiling = Duration::from_secs(1u64 << st.backoff_attempt); // 2 s .. 64 s
        let wait =
            ceiling / 2 + Duration::from_millis(rand::random_range(0..=ceiling.as_millis() as u64 / 2));
        st.backoff_until = Some((Instant::now() + wait, why.to_string()));
        wait
    }

    /// An account quota is used up for this market: its launches wait
    /// `capacity_cooldown` (quotas free up as instances end, or are raised);
    /// no (type, zone) cools down and spot fallback is not fed (another
    /// type would meet the same quota).
    fn quota_reached(&self, spot: bool, q: &errors::QuotaError, msg: &str) -> ProviderError {
        let what = q.describe(spot);
        tracing::warn!("{what} ({msg})");
        let mut st = self.state.lock();
        st.quota.insert(spot, (Instant::now() + self.cooldown, what.clone()));
        ProviderError::Quota(format!("{what}; launches wait {:.0}s", self.cooldown.as_secs_f64()))
    }

    /// Is an "Invalid IAM Instance Profile" still possibly IAM's delay
    /// (within `iam_propagation` of the first one)?
    fn profile_may_propagate(&self) -> bool {
        let mut st = self.state.lock();
        let first = *st.profile_refused_at.get_or_insert_with(Instant::now);
        first.elapsed() < self.iam_propagation
    }

    /// The instance profile is refused, maybe only not propagated yet:
    /// launches back off and try again.
    fn profile_not_yet(&self, msg: &str) -> ProviderError {
        let profile = self.iam_profile.as_deref().unwrap_or("");
        let why = format!(
            "instance profile {profile} not accepted yet ({msg}); a new profile takes IAM a while to reach \
             EC2: retrying for {:.0}s before it counts as a configuration error (iam_instance_profile)",
            self.iam_propagation.as_secs_f64()
        );
        let wait = self.back_off(&why);
        ProviderError::Other(format!("{why}; next try in {:.1}s", wait.as_secs_f64()))
    }

    fn block(&self, key: &str, msg: String) -> ProviderError {
        self.state.lock().blocked = Some((key.to_string(), msg.clone()));
        ProviderError::Config { key: key.to_string(), message: msg }
    }

    fn ok_call(&self) {
        let mut st = self.state.lock();
        st.backoff_attempt = 0;
        st.backoff_until = None;
        st.profile_refused_at = None;
    }

    /// Where a pool launches now: configured on-demand, fallen back to
    /// on-demand, or spot.
    fn market(&self, role: Role, pool: &str) -> Market {
        if self.on_demand(role) {
            return Market::OnDemand { why: "master_on_demand = true".into() };
        }
        self.state.lock().book.market(&self.fallback, role, pool, Instant::now())
    }
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

    fn attestor(&self) -> Option<&Attestor> {
        Some(&self.attestor)
    }

    fn imds_url(&self) -> Option<&'static str> {
        Some("http://169.254.169.254")
    }

    /// Launched with `InstanceInitiatedShutdownBehavior = terminate`: a
    /// node that powers off is terminated.
    fn orphan_action(&self) -> &'static str {
        "poweroff"
    }

    async fn preflight(&self) -> Result<(), ProviderError> {
        self.preflight_checks().await
    }

    fn region(&self) -> Option<String> {
        Some(self.region.clone())
    }

    fn host_names(&self, _node_id: &str, address: &str, instance_id: Option<&str>) -> Vec<String> {
        ec2_host_names(address, instance_id)
    }

    fn cores_of(&self, instance_type: &str) -> Option<u32> {
        self.type_vcpus.lock().get(instance_type).copied()
    }

    fn use_images(&self, by_arch: HashMap<String, String>) {
        *self.baked.lock() = by_arch;
    }

    async fn create_image(&self, instance_id: &str, name: &str) -> Result<String, ProviderError> {
        self.create_image_of(instance_id, name).await
    }

    async fn image_ready(&self, image_id: &str) -> Result<bool, ProviderError> {
        self.image_state(image_id).await
    }

    fn can_launch(&self, role: Role, pool: &str) -> Result<(), ProviderError> {
        let spot = self.market(role, pool) == Market::Spot;
        let candidates = self.candidates(role, pool);
        let st = self.state.lock();
        let now = Instant::now();
        if let Some((key, msg)) = &st.blocked {
            return Err(ProviderError::Config { key: key.clone(), message: msg.clone() });
        }
        // (No countdowns in these messages: they become events, which
        // are kept once while they repeat; status notes count down.)
        if let Some((_, why)) = st.backoff_until.as_ref().filter(|(u, _)| *u > now) {
            return Err(ProviderError::Other(format!("launches back off after: {why}")));
        }
        if let Some((_, why)) = st.quota.get(&spot).filter(|(u, _)| *u > now) {
            return Err(ProviderError::Quota(format!("{why}; launches wait (capacity_cooldown_secs)")));
        }
        // Every candidate cooling down: nothing to try before the first
        // one is back (no nodes recorded only to be dropped).
        let cooling: Option<Vec<Instant>> = candidates
            .into_iter()
            .map(|c| st.cooling.get(&(c.itype, c.subnet, spot)).map(|(u, _)| *u).filter(|u| *u > now))
            .collect();
        if cooling.is_some() {
            let market = if spot { "spot" } else { "on-demand" };
            return Err(ProviderError::Capacity(format!(
                "every {market} candidate of pool {pool} failed lately (no capacity, or an error of its own; capacity_cooldown_secs)"
            )));
        }
        Ok(())
    }

    async fn launch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
        self.launch_batch(batch).await
    }

    /// This cluster's instances that are not terminated (its cluster id's
    /// tag, not the `tag_key` other clusters may share, nor the hour of
    /// terminated instances EC2 keeps listing), a page of 1,000 at a time.
    /// A node whose instance is absent counts as gone, as a terminated one.
    async fn list(&self) -> Result<Vec<Observed>, ProviderError> {
        let filter =
            Filter::builder().name(format!("tag:{}", self.tag_key)).values("master").values("slave").build();
        let ours = Filter::builder().name(format!("tag:{CLUSTER_TAG}")).values(&self.cluster_id).build();
        let states = ["pending", "running", "shutting-down", "stopping", "stopped"]
            .into_iter()
            .fold(Filter::builder().name("instance-state-name"), |f, s| f.values(s))
            .build();
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter)
            .filters(ours)
            .filters(states)
            .max_results(1000)
            .into_paginator()
            .send();
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
                let tag = |k: &str| inst.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value());
                if let (Some(t), Some(z)) =
                    (inst.instance_type(), inst.placement().and_then(|p| p.availability_zone()))
                {
                    let role = match tag(&self.tag_key) {
                        Some("master") => Some(Role::Master),
                        Some("slave") => Some(Role::Slave),
                        _ => None,
                    };
                    let mut placement = self.placement.lock();
                    let launched = placement.get(id).and_then(|p| p.launched);
                    placement.insert(
                        id.to_string(),
                        Placed { itype: t.as_str().into(), zone: z.into(), role, launched },
                    );
                }
                if inst.instance_lifecycle().is_none() {
                    self.on_demand_ids.lock().insert(id.to_string());
                }
                let state = inst.state().and_then(|s| s.name());
                out.push(Observed {
                    instance_id: id.to_string(),
                    node_id: None,
                    batch: tag(BATCH_TAG)
                        .map(|b| (b.to_string(), inst.ami_launch_index().unwrap_or(0) as u32)),
                    alive: matches!(state, Some(InstanceStateName::Pending | InstanceStateName::Running)),
                    foreign: tag(CLUSTER_TAG) != Some(self.cluster_id.as_str()),
                });
            }
        }
        // What is known per instance lasts as long as the instance is
        // listed: bounded by the cluster, not by every instance it ever had.
        let listed: std::collections::HashSet<&str> = out.iter().map(|o| o.instance_id.as_str()).collect();
        self.placement.lock().retain(|id, p| {
            listed.contains(id.as_str()) || p.launched.is_some_and(|t| t.elapsed() < PLACED_UNLISTED)
        });
        self.on_demand_ids.lock().retain(|id| listed.contains(id.as_str()));
        Ok(out)
    }

    async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError> {
        let ids: Vec<String> = targets.iter().filter_map(|t| t.instance_id.clone()).collect();
        for chunk in ids.chunks(1000) {
            let mut left = chunk.to_vec();
            // EC2 fails the whole call when one id is unknown (gone long
            // ago, or not visible yet): drop the ids it names and send the
            // rest again; the unknown ones are retried by the reconcile
            // loop if they turn out to run.
            while !left.is_empty() {
                let r = self.client.terminate_instances().set_instance_ids(Some(left.clone())).send().await;
                self.count("TerminateInstances", &r);
                let Err(e) = r else { break };
                let (code, msg) = describe(&e);
                if code != "InvalidInstanceID.NotFound" {
                    return Err(match classify(&code) {
                        Kind::Throttled => self.throttled(&format!("TerminateInstances: {code}: {msg}")),
                        _ => ProviderError::Other(format!("TerminateInstances: {code}: {msg}")),
                    });
                }
                let unknown = errors::unknown_instance_ids(&msg, &left);
                if unknown.is_empty() {
                    // Not named: end them one by one.
                    for id in std::mem::take(&mut left) {
                        let r = self.client.terminate_instances().instance_ids(&id).send().await;
                        self.count("TerminateInstances", &r);
                    }
                    break;
                }
                tracing::warn!(
                    ?unknown,
                    "TerminateInstances: unknown to EC2 (gone, or not visible yet); terminating the rest"
                );
                left.retain(|id| !unknown.contains(id));
            }
        }
        Ok(())
    }

    /// This cluster's open spot requests only (its id's tag, not the
    /// `tag_key` another cluster may share).
    async fn cleanup(&self) -> Result<Vec<String>, ProviderError> {
        let filter =
            Filter::builder().name(format!("tag:{}", self.tag_key)).values("master").values("slave").build();
        let ours = Filter::builder().name(format!("tag:{CLUSTER_TAG}")).values(&self.cluster_id).build();
        let open = Filter::builder().name("state").values("open").build();
        let reqs = match self
            .client
            .describe_spot_instance_requests()
            .filters(filter)
            .filters(ours)
            .filters(open)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let (code, msg) = describe(&e);
                tracing::warn!("cannot list open spot requests ({code}: {msg}); check them in the console");
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
        self.prices_of(instance_ids).await
    }

    fn api_calls(&self) -> Vec<(String, u64, u64)> {
        self.calls.lock().iter().map(|(a, (n, e))| (a.to_string(), *n, *e)).collect()
    }

    fn facts(&self) -> Vec<String> {
        let mut out: Vec<String> = match &self.ami {
            ImageSpec::Id(id) => vec![format!("image: {id}")],
            ImageSpec::Alias(_) => {
                self.resolved.lock().iter().map(|r| format!("image: {}", r.describe())).collect()
            }
        };
        let mut baked: Vec<String> = self
            .baked
            .lock()
            .iter()
            .map(|(arch, id)| {
                format!("image for {arch} nodes: {id}, baked (`bake`): they skip the steps it holds")
            })
            .collect();
        baked.sort();
        out.extend(baked);
        out.extend(self.pool_notes.lock().iter().cloned());
        out.extend(self.scratch_notes.lock().iter().cloned());
        out
    }

    fn noticed(
        &self,
        role: Role,
        pool: &str,
        node_id: &str,
        instance_id: Option<&str>,
        kind: crate::model::Notice,
    ) {
        if self.on_demand(role) {
            return;
        }
        let place = instance_id.and_then(|i| self.placement.lock().get(i).cloned());
        let mut st = self.state.lock();
        if kind == crate::model::Notice::SpotInterruption {
            st.book.interrupted(pool, Instant::now(), node_id);
        }
        // That spot pool (type, zone) is being reclaimed: new nodes go to
        // the others first for a while (still there if nothing else is).
        if let Some(Placed { itype, zone, .. }) = place {
            let subnets: Vec<Option<String>> = if *self.subnets.lock() == [None] {
                vec![None]
            } else {
                let zones = self.subnet_zones.lock();
                zones.iter().filter(|(_, z)| *z == zone).map(|(s, _)| Some(s.clone())).collect()
            };
            let why = format!("{itype} spot in {zone}: {} notice on {node_id}", kind.label());
            tracing::info!("{why}: its replacement goes to another type or zone where there is one");
            for s in subnets {
                st.avoid.insert((itype.clone(), s), (Instant::now() + self.cooldown, why.clone()));
            }
        }
    }

    fn spot_again(&self, role: Role, pool: &str) -> bool {
        self.market(role, pool) == Market::Spot
    }

    fn notes(&self) -> Vec<String> {
        let mut st = self.state.lock();
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
        if let Some((until, why)) = st.backoff_until.as_ref().filter(|(u, _)| *u > now) {
            out.push(format!("launches wait {:.0}s more after: {why}", (*until - now).as_secs_f64()));
        }
        let mut quotas: Vec<String> = st
            .quota
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(spot, (until, why))| {
                let market = if *spot { "spot" } else { "on-demand" };
                format!(
                    "account quota ({market}): {why}; launches wait {:.0}s more",
                    (*until - now).as_secs_f64()
                )
            })
            .collect();
        quotas.sort();
        out.extend(quotas);
        let mut cooling: Vec<String> = st
            .cooling
            .values()
            .filter(|(until, _)| *until > now)
            .map(|(until, why)| format!("{why} (skipped for {:.0}s more)", (*until - now).as_secs_f64()))
            .collect();
        cooling.sort();
        out.extend(cooling);
        let mut avoided: Vec<String> = st
            .avoid
            .values()
            .filter(|(until, _)| *until > now)
            .map(|(until, why)| format!("{why}: tried last for {:.0}s more", (*until - now).as_secs_f64()))
            .collect();
        avoided.sort();
        avoided.dedup();
        out.extend(avoided);
        out
    }
}

#[cfg(test)]
mod host_name_tests {
    use super::*;

    #[test]
    fn a_node_s_names_need_both_its_address_and_its_instance() {
        assert_eq!(ec2_host_names("10.0.0.7", Some("i-0abc")), ["ip-10-0-0-7", "i-0abc"]);
        // A record that lost what the enrollment proved (a crash before the
        // snapshot): no names to hold the node to, rather than wrong ones.
        assert!(ec2_host_names("", Some("i-0abc")).is_empty());
        assert!(ec2_host_names("10.0.0.7", None).is_empty());
        assert!(ec2_host_names("not-an-ip", Some("i-0abc")).is_empty());
    }
}
