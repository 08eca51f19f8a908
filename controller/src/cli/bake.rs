//! `bake`: make an EC2 image holding what every node installs.

use super::ConfigArgs;
use crate::bake::{self, BakeResult};
use clap::Args;
use std::process::ExitCode;

/// Make an EC2 image that holds what every node installs (packages, the
/// Python environment, the engine): one node is provisioned, sealed,
/// imaged (CreateImage) and terminated; `serve` then launches nodes from
/// the image, and they skip the steps it holds. Run it while `serve` is
/// not running (it uses the same ports); nodes already running are not
/// touched. The image stays in the account until you deregister it.
#[derive(Debug, Args)]
pub struct BakeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

pub async fn exec(args: BakeArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(&args.log_format);
    let cfg = args.config.load()?;
    let path = args.config.config.clone().unwrap_or_else(|| "ddisco.toml".into());
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = bake::image_name(&cfg.tag_key, now);
    let bcfg = bake::config(&cfg, &path, &name)?;
    // Both would use the same ports, and EC2 nodes dial those.
    if tokio::net::UnixStream::connect(cfg.admin_socket()).await.is_ok() {
        return Err(super::UsageError(format!(
            "a controller is running for {}: stop it first (its nodes keep running, and it adopts them again \
             when it starts), then bake, then start serve again",
            cfg.state_dir.display()
        ))
        .into());
    }
    crate::serve::prepare_state_dir(&cfg)?;
    crate::serve::prepare_state_dir(&bcfg)?;
    let result_path = bcfg.state_dir.join(bake::RESULT);
    let _ = std::fs::remove_file(&result_path);
    crate::serve::serve(bcfg).await?;
    let result: Option<BakeResult> =
        std::fs::read_to_string(&result_path).ok().and_then(|t| serde_json::from_str(&t).ok());
    match result {
        Some(BakeResult { image: Some(img), replaced, .. }) => {
            println!(
                "baked {} ({}) for {} nodes in {}: {} steps ({}); `serve` launches nodes from it",
                img.image_id,
                img.name,
                img.arch,
                img.region,
                img.steps.len(),
                img.steps.join(", ")
            );
            if let Some(old) = replaced {
                println!(
                    "it replaces {} ({}), which is still registered: deregister it and delete its snapshot \
                     once no node runs from it (aws ec2 deregister-image --image-id {}, then aws ec2 delete-snapshot for its snapshots)",
                    old.image_id, old.name, old.image_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(BakeResult { error: Some(e), .. }) => {
            eprintln!("ddisco-controller: bake failed: {e}");
            Ok(ExitCode::from(1))
        }
        _ => {
            eprintln!(
                "ddisco-controller: bake stopped before its image was made ({} has no result)",
                result_path.display()
            );
            Ok(ExitCode::from(1))
        }
    }
}
