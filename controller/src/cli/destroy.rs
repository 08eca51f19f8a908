//! `destroy`: terminate every node of this cluster, and nothing else.

use super::ConfigArgs;
use super::client::AdminClient;
use clap::Args;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

/// Terminate every node of this cluster (and nothing else), then stop the
/// controller. Works without a running controller too: the provider's own
/// records (tags, pid files) find the nodes.
#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Do not ask for confirmation (required when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// The cluster to terminate when its state directory is gone (the id
    /// `status` shows, c-...): only instances tagged with it are touched.
    #[arg(long)]
    pub cluster_id: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub async fn exec(args: DestroyArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.config.load()?;
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            eprintln!("destroy terminates every node of cluster {:?}: pass --yes to confirm", cfg.tag_key);
            return Ok(ExitCode::from(2));
        }
        eprint!("Terminate every node of cluster {:?}? [y/N] ", cfg.tag_key);
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing done");
            return Ok(ExitCode::from(1));
        }
    }
    let mut spent = None;
    let terminated = match AdminClient::connect(&cfg.admin_socket()).await {
        Ok(mut client) => {
            let r = client.destroy().await?;
            spent = Some(r.spent_usd);
            r.terminated
        }
        Err(_) => {
            eprintln!("no controller running; terminating through the {} provider directly", cfg.provider);
            offline(&cfg, args.cluster_id.as_deref()).await?
        }
    };
    if terminated.is_empty() {
        println!("nothing to terminate: cluster {:?} has no nodes", cfg.tag_key);
    } else {
        for id in &terminated {
            println!("terminated {id}");
        }
        println!("cluster {:?} destroyed: {} nodes terminated", cfg.tag_key, terminated.len());
    }
    if let Some(usd) = spent.filter(|s| *s > 0.0) {
        println!("cluster cost: ${} since it was created", crate::cli::status::usd(usd));
    }
    Ok(ExitCode::SUCCESS)
}

/// Destroy without a controller: ask the provider for everything of this
/// cluster, terminate it, and clear the saved node list.
async fn offline(cfg: &crate::config::Config, given: Option<&str>) -> anyhow::Result<Vec<String>> {
    if let Some(id) = given
        && !crate::state::is_cluster_id(id)
    {
        return Err(super::UsageError(format!(
            "--cluster-id {id:?}: a cluster id is c- and 12 hex digits (see status)"
        ))
        .into());
    }
    let kept = crate::state::cluster_id(&cfg.state_dir)?;
    let id = match (given, kept) {
        (Some(g), Some(k)) if g != k => {
            return Err(super::UsageError(format!(
                "--cluster-id {g} is not the cluster of state_dir {} ({k})",
                cfg.state_dir.display()
            ))
            .into());
        }
        (Some(g), _) => g.to_string(),
        (None, Some(k)) => k,
        (None, None) => {
            if cfg.provider == crate::config::ProviderKind::Ec2 {
                eprintln!(
                    "no cluster id in {} (state directory gone?): pass --cluster-id (shown by status) to find \
                     this cluster's instances; instances of other clusters are never touched",
                    cfg.state_dir.display()
                );
            }
            if !cfg.state_dir.exists() {
                return Ok(vec![]);
            }
            String::new()
        }
    };
    let provider = crate::serve::make_provider(cfg, &id).await?;
    let observed = provider.list().await?;
    // Only this cluster's instances: others with the same tag_key are not ours.
    let targets: Vec<crate::provider::Target> = observed
        .iter()
        .filter(|o| o.alive && !o.foreign)
        .map(|o| crate::provider::Target {
            node_id: o.node_id.clone(),
            instance_id: Some(o.instance_id.clone()),
        })
        .collect();
    let mut ids: Vec<String> =
        targets.iter().map(|t| t.node_id.clone().or(t.instance_id.clone()).unwrap_or_default()).collect();
    ids.sort();
    // Terminated, open spot requests cancelled, and listed again until
    // none of this cluster's instances runs (or the error names them).
    let cancelled = crate::cluster::ops::terminate_verified(
        provider.as_ref(),
        targets,
        crate::cluster::ops::DESTROY_WITHIN,
    )
    .await?;
    for r in cancelled {
        eprintln!("cancelled spot request {r}");
    }
    let file = cfg.state_dir.join("cluster.json");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let mut reg = crate::registry::Registry::from_json(&text, 1)?;
        reg.forget_all();
        crate::pki::write_private(&file, &reg.to_json())?;
    }
    crate::cluster::ops::retire_pki(&cfg.state_dir);
    Ok(ids)
}
