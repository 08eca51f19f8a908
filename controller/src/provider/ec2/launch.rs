//! Launching: one `RunInstances` per batch, candidate by candidate (type,
//! subnet), spot or on-demand, with cool-downs and the on-demand fallback.

use super::errors::{Kind, classify_error, describe};
use super::*;
use base64::Engine as _;

impl Ec2Provider {
    /// `Provider::launch`: spot, or on-demand when the pool's market says
    /// so or spot failures just crossed the fallback threshold.
    pub(super) async fn launch_batch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
        self.can_launch(batch.role, &batch.pool)?;
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

    pub(super) async fn run(
        &self,
        batch: &LaunchBatch,
        itype: &str,
        subnet: Option<&str>,
        token: String,
        spot: bool,
        (count, all_or_nothing): (usize, bool),
    ) -> Result<aws_sdk_ec2::operation::run_instances::RunInstancesOutput, (String, String)> {
        let n = count as i32;
        let tags = [
            Tag::builder().key(&self.tag_key).value(batch.role.to_string()).build(),
            Tag::builder().key(POOL_TAG).value(&batch.pool).build(),
            Tag::builder().key(BATCH_TAG).value(&batch.batch_id).build(),
            Tag::builder().key(CLUSTER_TAG).value(&self.cluster_id).build(),
            Tag::builder().key("Name").value(format!("{}-{}", self.tag_key, batch.role)).build(),
        ];
        let spec = |rt: ResourceType| {
            TagSpecification::builder().resource_type(rt).set_tags(Some(tags.to_vec())).build()
        };
        let market = InstanceMarketOptionsRequest::builder()
            .market_type(MarketType::Spot)
            .spot_options(
                SpotMarketOptions::builder()
                    // No MaxPrice unless max_bid is set: capped at on-demand.
                    .set_max_price((!self.max_bid.is_empty()).then(|| self.max_bid.clone()))
                    .spot_instance_type(SpotInstanceType::OneTime)
                    .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                    .build(),
            )
            .build();
        let image = self.image_for(itype).map_err(|m| ("ddisco.ImageNotResolved".to_string(), m))?;
        let root_volume = self.root_devices.lock().get(&image).map(|dev| {
            use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, VolumeType};
            let ebs = EbsBlockDevice::builder()
                .volume_size(self.root_volume_gb as i32)
                .volume_type(VolumeType::Gp3)
                .delete_on_termination(true)
                .build();
            BlockDeviceMapping::builder().device_name(dev).ebs(ebs).build()
        });
        let mut req = self
            .client
            .run_instances()
            .image_id(image)
            .set_block_device_mappings(root_volume.map(|m| vec![m]))
            .instance_type(InstanceType::from(itype))
            // EC2 launches as many as it can, up to n (capacity, quotas):
            // the rest are launched elsewhere or at the next tick. Asked
            // again of a candidate that gave fewer: all or nothing.
            .min_count(if all_or_nothing { n } else { 1 })
            .max_count(n)
            .client_token(token)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&batch.userdata))
            .set_instance_market_options(spot.then_some(market))
            // Instances, their volumes and (spot) their requests carry the
            // cluster's tags: destroy finds and cancels everything.
            .set_tag_specifications(Some(
                [ResourceType::Instance, ResourceType::Volume]
                    .into_iter()
                    .chain(spot.then_some(ResourceType::SpotInstancesRequest))
                    .map(spec)
                    .collect(),
            ))
            .metadata_options(metadata_options())
            // The agent's dead man's switch powers a node off when its
            // controller is gone: EC2 then terminates it, and billing stops.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .set_subnet_id(subnet.map(String::from));
        if !self.key_name.is_empty() {
            req = req.key_name(&self.key_name);
        }
        if let Some(p) = &self.iam_profile {
            let spec = aws_sdk_ec2::types::IamInstanceProfileSpecification::builder();
            req = req
                .iam_instance_profile(if p.starts_with("arn:") { spec.arn(p) } else { spec.name(p) }.build());
        }
        let (ids, names) = (self.group_ids.lock().clone(), self.group_names.lock().clone());
        if !ids.is_empty() {
            req = req.set_security_group_ids(Some(ids));
        }
        if !names.is_empty() {
            req = req.set_security_groups(Some(names));
        }
        // EC2 answers capacity errors with HTTP 500, which the SDK would
        // retry ec2_max_attempts times against the same (type, zone): the
        // candidate loop and the back-off decide instead.
        let once = aws_sdk_ec2::config::Builder::default()
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled());
        let r = req.customize().config_override(once).send().await;
        self.count("RunInstances", &r);
        r.map_err(|e| describe(&e))
    }

    /// Launches the batch with the best-ranked candidate (type, subnet)
    /// that has capacity (`ranked`), on spot or on-demand; takes what EC2
    /// gives (at least one). A candidate that reports no capacity cools
    /// down (per market); a spot launch that found none anywhere counts
    /// towards fallback. One that gives fewer than asked is
    /// asked all or nothing next time (`State::short`), and cools down if
    /// that finds no capacity. An account quota shrinks the request, then holds the
    /// market back (`quota_reached`) without cooling any candidate.
    pub(super) async fn try_candidates(
        &self,
        batch: &LaunchBatch,
        spot: bool,
        why: Option<String>,
    ) -> Result<Vec<Launched>, ProviderError> {
        let mut last = None;
        // An error of no known class from the last candidate tried.
        let mut unknown: Option<String> = None;
        let mut capacity_seen = false;
        let market_name = if spot { "spot" } else { "on-demand" };
        let want = batch.nodes.len();
        let ranked = self.ranked(batch.role, &batch.pool, spot).await;
        let cooling = |c: &super::allocate::Candidate| {
            let key = (c.itype.clone(), c.subnet.clone(), spot);
            self.state
                .lock()
                .cooling
                .get(&key)
                .filter(|(until, _)| *until > Instant::now())
                .map(|(_, w)| w.clone())
        };
        // With spread: the zones open now, and the role's nodes in each.
        let spread = self.spread == crate::config::Spread::Zones && batch.role == Role::Slave;
        let (in_zone, open_zones) = {
            let mut open: Vec<&str> = ranked
                .iter()
                .filter(|r| cooling(&r.candidate).is_none())
                .filter_map(|r| r.candidate.zone.as_deref())
                .collect();
            open.sort();
            open.dedup();
            (self.role_zones(batch.role), open.len())
        };
        let total: usize = in_zone.values().sum();
        // Better-ranked candidates passed over, and why (for status).
        let mut passed: Vec<String> = Vec::new();
        for (attempt, r) in ranked.iter().enumerate() {
            let (itype, subnet) = (r.candidate.itype.clone(), r.candidate.subnet.clone());
            let place =
                r.candidate.zone.clone().or_else(|| subnet.clone()).unwrap_or_else(|| self.region.clone());
            let key = (itype.clone(), subnet.clone(), spot);
            if let Some(why) = cooling(&r.candidate) {
                passed.push(format!("{why} (cooling down)"));
                continue;
            }
            let attempt = if spot { attempt } else { 1000 + attempt };
            let mut count = match (&r.candidate.zone, spread) {
                (Some(z), true) => {
                    super::allocate::spread_cap(want, in_zone.get(z).copied().unwrap_or(0), total, open_zones)
                }
                _ => want,
            };
            let mut shrunk = 0;
            let all_or_nothing = self.state.lock().short.remove(&key);
            let mut image_renewed = false;
            loop {
                // One token per request: a retried call never launches twice.
                let token = format!("{}-{attempt}-{shrunk}", batch.batch_id);
                let res =
                    self.run(batch, &itype, subnet.as_deref(), token, spot, (count, all_or_nothing)).await;
                let (code, msg) = match res {
                    Ok(out) => {
                        self.ok_call();
                        let mut placed = format!("{itype} {market_name} in {place}: {}", r.why);
                        if !passed.is_empty() {
                            let n = passed.len();
                            let shown: Vec<&str> = passed.iter().take(3).map(String::as_str).collect();
                            let more = if n > 3 { format!(" and {} more", n - 3) } else { String::new() };
                            placed.push_str(&format!("; passed over first: {}{more}", shown.join("; ")));
                        }
                        if count < want {
                            placed.push_str(&format!("; {count} of the batch's {want} here (spread)"));
                        }
                        let launched = self.launched(batch, &out, (&itype, &placed), spot, why.clone());
                        if launched.len() < count {
                            let short = format!(
                                "{itype} {market_name} in {place}: {} of {count} launched (capacity)",
                                launched.len()
                            );
                            tracing::warn!(
                                "pool {}: {short}; the rest are asked again, all or nothing, then elsewhere",
                                batch.pool
                            );
                            // EC2 gave less than asked: the pool may be
                            // short, or the endpoint launches MinCount.
                            self.state.lock().short.insert(key);
                        }
                        return Ok(launched);
                    }
                    Err(e) => e,
                };
                match classify_error(&code, &msg) {
                    Kind::Quota => {
                        let q = super::errors::quota_error(&code, &msg);
                        match q.shrink(count) {
                            Some(n) => {
                                tracing::warn!(
                                    "pool {}: {code} for {count} x {itype}; asking for {n}",
                                    batch.pool
                                );
                                count = n;
                                shrunk += 1;
                                continue;
                            }
                            None => return Err(self.quota_reached(spot, &q, &msg)),
                        }
                    }
                    Kind::Capacity => {
                        capacity_seen = true;
                        let why = format!("{itype} {market_name} in {place}: {code}");
                        tracing::warn!("{why}: {msg}; trying the next candidate");
                        passed.push(format!("no capacity now: {why}"));
                        self.state
                            .lock()
                            .cooling
                            .insert(key, (Instant::now() + self.cooldown, format!("no capacity: {why}")));
                        last = Some(why);
                    }
                    Kind::Throttled => return Err(self.throttled(&format!("{code}: {msg}"))),
                    Kind::Config("instance_type")
                        if self.pools.lock().len() > 1 || batch.role == Role::Master =>
                    {
                        let key =
                            if batch.role == Role::Master { "master_instance_type" } else { "slave_pools" };
                        return Err(self.block(key, format!("{itype}: {code}: {msg}")));
                    }
                    // The image went (Canonical deregisters old builds, a
                    // baked image was deleted): resolve again, once, and
                    // retry, instead of blocking launches until a restart.
                    Kind::Config("ami") if !image_renewed && self.renew_image(&itype).await => {
                        image_renewed = true;
                        shrunk += 1;
                        continue;
                    }
                    Kind::Config("permissions") => {
                        let why =
                            super::errors::missing_permission("RunInstances", self.iam_profile.as_deref());
                        return Err(self.block("permissions", format!("{code}: {why} ({msg})")));
                    }
                    Kind::Config("iam_instance_profile") if self.profile_may_propagate() => {
                        return Err(self.profile_not_yet(&format!("{code}: {msg}")));
                    }
                    Kind::Config(key) => return Err(self.block(key, format!("{code}: {msg}"))),
                    Kind::Other => {
                        // Maybe this type's alone (an option it does not
                        // take): skip it, cooled down, and say so; the
                        // next candidate may launch.
                        let why = format!("{itype} {market_name} in {place}: {code}: {msg}");
                        tracing::warn!("pool {}: skipping {why}", batch.pool);
                        let note = format!("an error of its own: {why}");
                        // Not capacity: the type (its options) in every
                        // zone, not one zone's pool.
                        let until = Instant::now() + self.cooldown;
                        let mut st = self.state.lock();
                        for c in ranked.iter().filter(|c| c.candidate.itype == itype) {
                            st.cooling.insert(
                                (itype.clone(), c.candidate.subnet.clone(), spot),
                                (until, note.clone()),
                            );
                        }
                        drop(st);
                        passed.push(format!("{why} now"));
                        unknown = Some(format!("RunInstances: {why}"));
                        last = Some(why);
                    }
                }
                break;
            }
        }
        // A spot launch that found capacity in no candidate counts once
        // towards on-demand fallback (however many zones it tried).
        if spot
            && capacity_seen
            && let Some(why) = &last
        {
            self.state.lock().book.spot_failed(&batch.pool, Instant::now(), why.clone());
        }
        // No candidate launched, none for capacity, and some said what is
        // not capacity: launches back off (every candidate may say the same).
        if let Some(why) = unknown.filter(|_| !capacity_seen) {
            return Err(self.unclassified(&why));
        }
        Err(ProviderError::Capacity(match last {
            Some(why) => format!("every {market_name} candidate of pool {} failed, last: {why}", batch.pool),
            None => format!(
                "every {market_name} candidate of pool {} is cooling down after capacity errors",
                batch.pool
            ),
        }))
    }

    /// The nodes a RunInstances answer started: instance `i` of the call
    /// (its launch index) is node `i` of the batch.
    fn launched(
        &self,
        batch: &LaunchBatch,
        out: &aws_sdk_ec2::operation::run_instances::RunInstancesOutput,
        (itype, placed): (&str, &str),
        spot: bool,
        why: Option<String>,
    ) -> Vec<Launched> {
        let mut launched = Vec::new();
        for inst in out.instances() {
            let idx = inst.ami_launch_index().unwrap_or(0) as usize;
            if let (Some(id), Some(z)) =
                (inst.instance_id(), inst.placement().and_then(|p| p.availability_zone()))
            {
                let p = super::Placed {
                    itype: itype.to_string(),
                    zone: z.into(),
                    role: Some(batch.role),
                    launched: Some(Instant::now()),
                };
                self.placement.lock().insert(id.into(), p);
            }
            if let (false, Some(id)) = (spot, inst.instance_id()) {
                self.on_demand_ids.lock().insert(id.to_string());
            }
            if let (Some(node), Some(id)) = (batch.nodes.get(idx), inst.instance_id()) {
                launched.push(Launched {
                    node_id: node.clone(),
                    instance_id: id.to_string(),
                    instance_type: itype.to_string(),
                    market: if spot { crate::model::Market::Spot } else { crate::model::Market::OnDemand },
                    on_demand_why: why.clone(),
                    placement: placed.to_string(),
                });
            }
        }
        launched
    }
}

/// Instance metadata as nodes get it: IMDSv2 only (a session token from a
/// PUT, which a server-side request forgery cannot make) and a hop limit of
/// 1, so a container on a node cannot reach the userdata (its bootstrap
/// tokens) or the instance role's credentials.
pub(super) fn metadata_options() -> aws_sdk_ec2::types::InstanceMetadataOptionsRequest {
    use aws_sdk_ec2::types::{
        HttpTokensState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    };
    InstanceMetadataOptionsRequest::builder()
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .http_tokens(HttpTokensState::Required)
        .http_put_response_hop_limit(1)
        .build()
}
