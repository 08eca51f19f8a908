//! The `security-group` command's EC2 calls: create the cluster's group and
//! add the rules `provider::security_group` says are missing.

use super::*;
use crate::provider::security_group::{self, Rule};

impl Ec2Provider {
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
        let first_subnet = self.subnets.lock().iter().flatten().next().cloned();
        let vpc_id = match first_subnet.as_ref() {
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
    pub(super) async fn authorize(
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
