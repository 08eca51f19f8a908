//! How EC2 behaves where moto does not ([`Model`]), and what the fault
//! proxy makes of a RunInstances under it.

use super::proxy::{ProxyState, Refusal};
use super::*;

/// How the EC2 behind the proxy behaves where moto does not behave like EC2
/// (set per test with [`FaultProxy::set_model`]). **Test double:** these are
/// EC2's documented behaviours, which no emulator here has.
#[derive(Debug, Clone)]
pub struct Model {
    /// Capacity left, per pool: a key is an instance type (any zone, any
    /// market), `type@zone`, `type/spot` or `type/on-demand` (any zone),
    /// `type@zone/spot` (EC2's spot pools are per type and zone), or
    /// `*@zone` (every type there: a zone out of capacity). Every
    /// key a launch falls under limits it and is drawn down by it. A
    /// RunInstances asking more than is left launches what is left (EC2
    /// launches the largest number from MinCount to MaxCount it can), or
    /// fails with `InsufficientInstanceCapacity` (HTTP 500, as EC2 answers
    /// it) if even MinCount does not fit. Pools not listed: unlimited.
    pub capacity: HashMap<String, u32>,
    /// The spot price table, USD per hour per (type, zone), answered for
    /// `DescribeSpotPriceHistory` (moto answers one tiny price for every
    /// pool). Empty: moto answers. A test changes it mid-run: prices move.
    pub spot_usd: HashMap<(String, String), f64>,
    /// The account's vCPU quota for running instances (counted over the
    /// instances launched through this proxy): like capacity, what fits is
    /// launched; if not even MinCount fits, `VcpuLimitExceeded` with EC2's
    /// message, which names the limit.
    pub vcpu_quota: Option<u32>,
    /// (moto launches MinCount instances where EC2 launches the most it
    /// can up to MaxCount: the proxy always asks moto for that number.)
    ///
    /// `Unsupported` for a type in a subnet whose zone does not offer it
    /// (moto's own offerings data, e.g. c5.large is not in us-east-1e):
    /// moto launches anything anywhere, EC2 refuses. On by default.
    pub unsupported: bool,
    /// Instances stay out of DescribeInstances answers for this long after
    /// their launch (EC2's eventual consistency).
    pub listing_lag: Duration,
    /// RunInstances answers after this long (a launch that walks slow
    /// candidates).
    pub run_latency: Duration,
    /// TerminateInstances answers (and takes effect) after this long (30 s
    /// is seen at a thousand instances).
    pub terminate_latency: Duration,
    /// Instances say `pending` in DescribeInstances answers for this long
    /// after their launch (EC2 takes a while to start one; moto's run at
    /// once). A hypervisor that should not boot them meanwhile holds them
    /// (`Inst::age`).
    pub pending_for: Duration,
    /// DescribeInstances answers after this long (8 s is seen at a
    /// thousand instances); what it lists is what moto holds when it
    /// answers.
    pub describe_latency: Duration,
    /// RunInstances naming an instance profile fails with "Invalid IAM
    /// Instance Profile" until this moment (a profile created moments ago:
    /// IAM is eventually consistent).
    pub profile_valid_at: Option<Instant>,
    /// The AWS Price List API (`GetProducts`, which moto lacks): Linux
    /// on-demand USD per hour per instance type, answered in AWS's format.
    pub on_demand_usd: HashMap<String, f64>,
    /// Images made with CreateImage say `pending` in DescribeImages for
    /// this long (EC2 takes minutes to snapshot an instance; moto's are
    /// available at once).
    pub image_pending_for: Duration,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            capacity: HashMap::new(),
            spot_usd: HashMap::new(),
            vcpu_quota: None,
            unsupported: true,
            listing_lag: Duration::ZERO,
            run_latency: Duration::ZERO,
            terminate_latency: Duration::ZERO,
            describe_latency: Duration::ZERO,
            pending_for: Duration::ZERO,
            profile_valid_at: None,
            image_pending_for: Duration::ZERO,
            // us-east-1's list prices.
            on_demand_usd: [
                ("c5.large", 0.085),
                ("m5.large", 0.096),
                ("c5d.large", 0.096),
                ("m6g.large", 0.077),
            ]
            .into_iter()
            .map(|(t, p)| (t.to_string(), p))
            .collect(),
        }
    }
}

/// The capacity keys (see [`Model::capacity`]) a launch of `itype` in
/// `zone` on the market falls under.
pub(super) fn capacity_keys(itype: &str, zone: &str, spot: bool) -> [String; 5] {
    let market = if spot { "spot" } else { "on-demand" };
    [
        itype.to_string(),
        format!("{itype}@{zone}"),
        format!("{itype}/{market}"),
        format!("{itype}@{zone}/{market}"),
        format!("*@{zone}"),
    ]
}

/// What a RunInstances becomes under the model: the parameters moto is
/// sent (`None`: as asked) and the capacity keys the launch draws down.
pub(super) type Admitted = (Option<Vec<(String, String)>>, Vec<String>);

/// Long by design: EC2's rules for one RunInstances (capacity per pool,
/// the vCPU quota, zone offerings, latency), applied in EC2's order.
/// What EC2 would do with a RunInstances that moto would simply carry out:
/// refuse it (`Err`), launch fewer (`Ok(Some(params))` with MinCount and
/// MaxCount lowered), or launch it as asked.
pub(super) async fn run_instances_model(
    upstream: &str,
    state: &Mutex<ProxyState>,
    model: &Model,
    params: &[(String, String)],
) -> Result<Admitted, Refusal> {
    let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
    let itype = get("InstanceType").unwrap_or_default();
    let min: u32 = get("MinCount").and_then(|v| v.parse().ok()).unwrap_or(1);
    let max: u32 = get("MaxCount").and_then(|v| v.parse().ok()).unwrap_or(min);
    let refuse = |code: &str, status: u16, message: String| Refusal { code: code.into(), status, message };
    if let Some(at) = model.profile_valid_at
        && Instant::now() < at
        && let Some((_, name)) = params.iter().find(|(k, _)| k.starts_with("IamInstanceProfile."))
    {
        return Err(refuse(
            "InvalidParameterValue",
            400,
            format!(
                "Value ({name}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
            ),
        ));
    }
    let c = client(upstream).await;
    let mut zone = String::from("us-east-1");
    if let Some(subnet) = get("SubnetId") {
        let known = state.lock().unwrap().subnet_zones.get(&subnet).cloned();
        let found = match known {
            Some(z) => Some(z),
            None => {
                let d = c.describe_subnets().subnet_ids(&subnet).send().await;
                d.ok().and_then(|d| d.subnets().first().and_then(|s| s.availability_zone()).map(String::from))
            }
        };
        if let Some(z) = found {
            state.lock().unwrap().subnet_zones.insert(subnet.clone(), z.clone());
            zone = z;
        }
        if model.unsupported {
            let known = state.lock().unwrap().offered.get(&itype).cloned();
            let offered = match known {
                Some(o) => o,
                None => {
                    let o = c
                        .describe_instance_type_offerings()
                        .location_type(aws_sdk_ec2::types::LocationType::AvailabilityZone)
                        .filters(Filter::builder().name("instance-type").values(&itype).build())
                        .send()
                        .await
                        .map(|o| {
                            o.instance_type_offerings()
                                .iter()
                                .filter_map(|o| o.location())
                                .map(String::from)
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    state.lock().unwrap().offered.insert(itype.clone(), o.clone());
                    o
                }
            };
            if !offered.is_empty() && !offered.contains(&zone) {
                return Err(refuse(
                    "Unsupported",
                    400,
                    format!(
                        "Your requested instance type ({itype}) is not supported in your requested Availability \
                         Zone ({zone}). Please retry your request by not specifying an Availability Zone or \
                         choosing {}.",
                        offered.join(", ")
                    ),
                ));
            }
        }
    }
    let mut fit = max;
    let spot = get("InstanceMarketOptions.MarketType").as_deref() == Some("spot");
    let keys: Vec<String> =
        capacity_keys(&itype, &zone, spot).into_iter().filter(|k| model.capacity.contains_key(k)).collect();
    if let Some(left) = keys.iter().map(|k| model.capacity[k]).min() {
        if left < min {
            return Err(refuse(
                "InsufficientInstanceCapacity",
                500,
                format!(
                    "We currently do not have sufficient {itype} capacity in the Availability Zone you requested \
                     ({zone}). Our system will be working on provisioning additional capacity."
                ),
            ));
        }
        fit = fit.min(left);
    }
    if let Some(quota) = model.vcpu_quota {
        let vcpus_of = |t: String| {
            let c = c.clone();
            async move {
                let d =
                    c.describe_instance_types().instance_types(InstanceType::from(t.as_str())).send().await;
                d.ok()
                    .and_then(|d| {
                        d.instance_types()
                            .first()
                            .and_then(|i| i.v_cpu_info())
                            .and_then(|v| v.default_v_cpus())
                    })
                    .unwrap_or(2) as u32
            }
        };
        let launched: Vec<(String, String)> =
            state.lock().unwrap().launched.iter().map(|(id, (_, t))| (id.clone(), t.clone())).collect();
        let mut used = 0;
        if !launched.is_empty() {
            let f = Filter::builder()
                .name("instance-id")
                .set_values(Some(launched.iter().map(|(id, _)| id.clone()).collect()))
                .build();
            let d = c.describe_instances().filters(f).send().await.expect("describe for the quota");
            for i in d.reservations().iter().flat_map(|r| r.instances()) {
                let live = matches!(
                    i.state().and_then(|s| s.name()),
                    Some(
                        aws_sdk_ec2::types::InstanceStateName::Pending
                            | aws_sdk_ec2::types::InstanceStateName::Running
                    )
                );
                if live {
                    used +=
                        vcpus_of(i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default()).await;
                }
            }
        }
        let each = vcpus_of(itype.clone()).await.max(1);
        let room = quota.saturating_sub(used) / each;
        if room < min {
            return Err(refuse(
                "VcpuLimitExceeded",
                400,
                format!(
                    "You have requested more vCPU capacity than your current vCPU limit of {quota} allows for the \
                     instance bucket that the specified instance type belongs to. Please visit \
                     http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."
                ),
            ));
        }
        fit = fit.min(room);
    }
    if min == max && fit >= max {
        return Ok((None, keys));
    }
    // moto launches MinCount instances; EC2 the most it can up to MaxCount.
    let changed = params
        .iter()
        .map(|(k, v)| match k.as_str() {
            "MaxCount" | "MinCount" => (k.clone(), fit.to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    Ok((Some(changed), keys))
}
