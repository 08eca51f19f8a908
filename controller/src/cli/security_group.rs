//! `security-group`: create (or complete) the cluster's EC2 security group.

use super::{ConfigArgs, UsageError};
use crate::provider::security_group::ssh_source;
use clap::Args;
use std::process::ExitCode;

/// Create the cluster's security group on EC2, or add the rules it lacks.
///
/// Rules: all TCP and all UDP between members of the group, and SSH (TCP
/// 22) from your address. With --controller-group, the controller's own
/// group (when the controller runs on EC2 outside the cluster's group) gets
/// its agent and download ports opened to the cluster's group. Running it
/// again adds only what is missing and says what exists already. Uses the
/// config's region, endpoint and the usual AWS credentials.
#[derive(Debug, Args)]
pub struct SecurityGroupArgs {
    /// Group name. Default: `<tag_key>-nodes`.
    #[arg(long)]
    pub name: Option<String>,
    /// Where SSH may come from (CIDR, e.g. 203.0.113.7/32). Default: the
    /// address you are logged in from over SSH (SSH_CLIENT); refused if
    /// that is unknown.
    #[arg(long, conflicts_with = "no_ssh")]
    pub ssh_from: Option<String>,
    /// No SSH rule.
    #[arg(long)]
    pub no_ssh: bool,
    /// The controller's security group (sg-...), when the controller runs
    /// on EC2 in a group of its own.
    #[arg(long)]
    pub controller_group: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: SecurityGroupArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    let name = args.name.clone().unwrap_or_else(|| format!("{}-nodes", cfg.tag_key));
    if name.is_empty() || name.len() > 255 || name.starts_with("sg-") {
        return Err(
            UsageError(format!("--name {name:?}: use up to 255 characters, not starting with sg-")).into()
        );
    }
    let ssh_client = std::env::var("SSH_CLIENT").ok();
    let ssh = ssh_source(args.ssh_from.as_deref(), args.no_ssh, ssh_client.as_deref()).map_err(UsageError)?;
    let ports = [cfg.listen.port(), cfg.download_listen.port()];
    let controller = match &args.controller_group {
        Some(g) if !g.starts_with("sg-") => {
            return Err(UsageError(format!("--controller-group {g:?}: give the group id (sg-...)")).into());
        }
        Some(_) if ports.contains(&0) => {
            return Err(UsageError(
                "--controller-group: `listen` and `download_listen` must have fixed ports (not 0) for a rule \
                 to open them"
                    .into(),
            )
            .into());
        }
        Some(g) => Some((g.as_str(), &ports[..])),
        None => None,
    };
    // It launches nothing: the cluster id (if any yet) is only carried along.
    let id = crate::state::cluster_id(&cfg.state_dir).ok().flatten().unwrap_or_default();
    let provider = crate::provider::ec2::Ec2Provider::new(&cfg.ec2, &cfg.node_shape(), &cfg.state_dir, &id)
        .await
        .map_err(crate::serve::preflight_error)?;
    let r = provider
        .ensure_security_group(&name, ssh.as_deref(), controller)
        .await
        .map_err(crate::serve::preflight_error)?;
    let what = if r.created { "created" } else { "exists already" };
    println!("security group {name} ({}) in {}: {what}", r.group_id, r.vpc_id);
    for rule in &r.added {
        println!("  added:          {rule}");
    }
    for rule in &r.present {
        println!("  exists already: {rule}");
    }
    if let Some(cg) = &args.controller_group {
        println!("controller group {cg}:");
        for rule in &r.controller_added {
            println!("  added:          {rule}");
        }
        for rule in &r.controller_present {
            println!("  exists already: {rule}");
        }
    } else {
        println!(
            "the controller must accept TCP {} and {} from the nodes (pass --controller-group if it runs on EC2)",
            ports[0], ports[1]
        );
    }
    if cfg.ec2.security_groups.iter().any(|g| g == &r.group_id || g == &name) {
        println!("the config uses it already");
    } else {
        println!("use it: security_groups = [\"{}\"]", r.group_id);
    }
    Ok(ExitCode::SUCCESS)
}
