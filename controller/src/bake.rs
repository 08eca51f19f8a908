//! `bake`: an EC2 image that already holds what every node installs, so a
//! node launched from it only starts its agent and its engine.
//!
//! # How
//! `ddisco-controller bake` runs a control plane of its own (state in
//! `<state_dir>/bake`, its own cluster id, so the cluster's controller
//! never touches it and it never touches the cluster's nodes) whose only
//! node is a *bake node*: launched like a slave (the slaves' first instance
//! type: their architecture), it runs the image steps of both roles' plans
//! (`plan::bake_plan`: packages, the Python environment, the engine's
//! install; never keys, scratch, POST_INIT or anything secret), then the
//! seal (the agent records the steps' digests in `baked.json` and removes
//! its identity, bootstrap and the machine's host keys). Then [`drive`]
//! calls CreateImage (no reboot), waits until the image is available,
//! records it in `<state_dir>/baked.json` ([`BakedImage`]) and destroys the
//! bake node. Whatever happens (a failed step, an image that fails,
//! Ctrl-C), the bake node is destroyed before `bake` returns, and its dead
//! man's switch ends it if the controller dies.
//!
//! `serve` launches every node of a recorded architecture from the baked
//! image (`Provider::use_images`); each node's agent skips, and reports
//! SKIPPED, the steps whose digests the image holds. A step changed since
//! (another package, another Dask) has another digest and runs as usual.

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError, ProviderKind};
use crate::model::{NodeState, Role};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// In the state directory: the images `serve` launches from.
pub const RECORD: &str = "baked.json";
/// The bake control plane's state directory, inside the cluster's.
pub const BAKE_DIR: &str = "bake";
/// In the bake state directory: how the last bake ended (for the command).
pub const RESULT: &str = "result.json";
/// The longest a bake node lives (its `max_runtime`): set-up and imaging.
pub const BAKE_WITHIN: Duration = Duration::from_secs(90 * 60);
/// The longest an image may stay pending after CreateImage.
pub const IMAGE_WITHIN: Duration = Duration::from_secs(60 * 60);

/// A baked image, as `<state_dir>/baked.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BakedImage {
    pub region: String,
    /// EC2's name: `x86_64`, `arm64`.
    pub arch: String,
    pub image_id: String,
    pub name: String,
    pub created_unix_ms: u64,
    pub source_instance: String,
    /// The image steps it holds, by name.
    pub steps: Vec<String>,
}

/// How a bake ended (`<state_dir>/bake/result.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BakeResult {
    pub image: Option<BakedImage>,
    /// The image it replaced in the record (still registered).
    pub replaced: Option<BakedImage>,
    pub error: Option<String>,
}

/// The recorded images (none if there is no record).
pub fn read(state_dir: &Path) -> anyhow::Result<Vec<BakedImage>> {
    let path = state_dir.join(RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!("{} is damaged; move it away (nodes then boot from `ami`)", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `images` with `new` in place of the image of its region and
/// architecture; returns the list and the image replaced.
pub fn with_image(mut images: Vec<BakedImage>, new: BakedImage) -> (Vec<BakedImage>, Option<BakedImage>) {
    let old =
        images.iter().position(|i| i.region == new.region && i.arch == new.arch).map(|p| images.remove(p));
    images.push(new);
    images.sort_by(|a, b| (&a.region, &a.arch).cmp(&(&b.region, &b.arch)));
    (images, old)
}

/// Architecture -> image id, for the images of `region`.
pub fn in_force(images: &[BakedImage], region: &str) -> HashMap<String, String> {
    images.iter().filter(|i| i.region == region).map(|i| (i.arch.clone(), i.image_id.clone())).collect()
}

/// EC2's name for an architecture an agent reports (`aarch64` -> `arm64`).
pub fn ec2_arch(agent_arch: &str) -> String {
    match agent_arch {
        "aarch64" => "arm64".into(),
        "" => "x86_64".into(),
        other => other.into(),
    }
}

/// The image's name: `ddisco-<tag_key>-<UTC date and time>` (EC2 wants
/// names unique in the account and region; 3-128 characters).
pub fn image_name(tag_key: &str, unix_secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_secs);
    let tag: String = tag_key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "()[]./-'@_".contains(c) { c } else { '-' })
        .take(80)
        .collect();
    format!("ddisco-{tag}-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// UTC calendar date and time of a unix time (Howard Hinnant's algorithm).
fn civil(unix_secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// The bake control plane's configuration: the cluster's, with its own
/// state directory, no slaves, a master of the slaves' first instance type
/// (the bake node), no autostop, and at most [`BAKE_WITHIN`] of life.
pub fn config(cfg: &Config, config_path: &Path, name: &str) -> Result<Config, ConfigError> {
    if cfg.provider != ProviderKind::Ec2 {
        return Err(ConfigError {
            path: config_path.to_path_buf(),
            key: Some("provider".into()),
            message: format!(
                "`bake` makes EC2 images; this cluster's provider is {} (its nodes install from the \
                 controller's cache already)",
                cfg.provider
            ),
        });
    }
    let mut b = cfg.clone();
    b.state_dir = cfg.state_dir.join(BAKE_DIR);
    b.num_slaves = 0;
    for p in &mut b.slave_pools {
        p.count = 0;
    }
    let first = cfg.pools().into_iter().flat_map(|p| p.instance_types).next();
    b.master_instance_type = first.unwrap_or_else(|| cfg.slave_instance_type().to_string());
    b.autostop_idle = Duration::ZERO;
    b.max_runtime = if cfg.max_runtime.is_zero() { BAKE_WITHIN } else { cfg.max_runtime.min(BAKE_WITHIN) };
    b.bake = Some(name.to_string());
    Ok(b)
}

/// The bake control plane's own task: waits for the bake node to finish
/// its plan (the seal is its last step), images it, records the image and
/// destroys the bake node; then stops the controller. Ends the same way on
/// a failure (written to [`RESULT`]) or on `shutdown`.
pub async fn drive(sh: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let name = sh.cfg.bake.clone().expect("bake mode");
    let parent = sh.cfg.state_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let outcome = tokio::select! {
        r = make_image(&sh, &name, &parent) => r,
        _ = shutdown.wait_for(|s| *s) => Err(anyhow::anyhow!("the bake was stopped before its image was made")),
    };
    let result = match outcome {
        Ok((image, replaced)) => BakeResult { image: Some(image), replaced, error: None },
        Err(e) => {
            tracing::error!("bake: {e:#}");
            BakeResult { image: None, replaced: None, error: Some(format!("{e:#}")) }
        }
    };
    let path = sh.cfg.state_dir.join(RESULT);
    if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&result).expect("serializes")) {
        tracing::error!("cannot write {}: {e}", path.display());
    }
    // The bake node goes whatever happened.
    let mut wait = Duration::from_secs(5);
    loop {
        match crate::cluster::ops::destroy(&sh).await {
            Ok(d) => {
                tracing::info!(nodes = d.terminated.len(), "bake: the bake node is terminated");
                break;
            }
            Err(e) => {
                tracing::error!(
                    "bake: destroying the bake node failed ({e:#}); trying again in {}s",
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
    sh.stop();
    Ok(())
}

/// Waits for the sealed bake node, images it, waits for the image,
/// records it; returns it and the image it replaced.
async fn make_image(
    sh: &Arc<Cluster>,
    name: &str,
    parent: &Path,
) -> anyhow::Result<(BakedImage, Option<BakedImage>)> {
    let Sealed { node, instance, arch, steps } = loop {
        if let Some(found) = sealed_node(sh)? {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let arch = ec2_arch(&arch);
    tracing::info!(%node, %instance, "bake: the bake node is sealed; creating image {name}");
    sh.registry.lock().event(format!("bake: {node} ({instance}) sealed; creating image {name}"));
    let image_id = sh.provider.create_image(&instance, name).await.context("CreateImage")?;
    tracing::info!(image = %image_id, "bake: waiting for the image to be available");
    let end = Instant::now() + IMAGE_WITHIN;
    let mut every = Duration::from_millis(500);
    loop {
        if sh.provider.image_ready(&image_id).await.with_context(|| format!("image {image_id}"))? {
            break;
        }
        anyhow::ensure!(
            Instant::now() < end,
            "image {image_id} is still pending after {} min: deregister it (`aws ec2 deregister-image`) and \
             bake again",
            IMAGE_WITHIN.as_secs() / 60
        );
        tokio::time::sleep(every).await;
        every = (every * 2).min(Duration::from_secs(15));
    }
    let image = BakedImage {
        region: sh.provider.region().unwrap_or_default(),
        arch,
        image_id,
        name: name.to_string(),
        created_unix_ms: crate::model::unix_ms(),
        source_instance: instance,
        steps,
    };
    let (images, replaced) = with_image(read(parent)?, image.clone());
    let path = parent.join(RECORD);
    std::fs::write(&path, serde_json::to_string_pretty(&images).expect("serializes"))
        .with_context(|| format!("cannot record the image in {}", path.display()))?;
    tracing::info!(image = %image.image_id, "bake: recorded in {}", path.display());
    Ok((image, replaced))
}

/// The bake node once its plan is done.
struct Sealed {
    node: String,
    instance: String,
    /// As its agent says it (`aarch64`).
    arch: String,
    /// The image steps it did, by name.
    steps: Vec<String>,
}

/// The bake node once its plan is done; an error if it failed.
fn sealed_node(sh: &Cluster) -> anyhow::Result<Option<Sealed>> {
    let reg = sh.registry.lock();
    if let Some(f) = reg.failed_nodes().next() {
        anyhow::bail!("the bake node {} failed: {}", f.id, f.detail);
    }
    for e in reg.entries().filter(|e| e.rec.role == Role::Master) {
        match e.rec.state() {
            NodeState::Failed(_) => anyhow::bail!("the bake node {} failed: {}", e.rec.id, e.rec.detail),
            NodeState::Ready => {
                let Some(instance) = e.rec.instance_id.clone() else { continue };
                let arch = e.rec.facts.as_ref().map(|f| f.arch.clone()).unwrap_or_default();
                let steps: Vec<String> =
                    e.rec.step_names.iter().filter(|n| n.as_str() != "seal").cloned().collect();
                return Ok(Some(Sealed { node: e.rec.id.clone(), instance, arch, steps }));
            }
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(region: &str, arch: &str, id: &str) -> BakedImage {
        BakedImage {
            region: region.into(),
            arch: arch.into(),
            image_id: id.into(),
            name: format!("n-{id}"),
            created_unix_ms: 1,
            source_instance: "i-1".into(),
            steps: vec!["system_packages".into()],
        }
    }

    #[test]
    fn a_new_image_replaces_the_one_of_its_region_and_architecture_only() {
        let (v, old) = with_image(
            vec![img("us-east-1", "x86_64", "ami-1"), img("us-east-1", "arm64", "ami-2")],
            img("us-east-1", "x86_64", "ami-3"),
        );
        assert_eq!(old.unwrap().image_id, "ami-1");
        assert_eq!(v.len(), 2);
        let (v, old) = with_image(v, img("eu-west-1", "x86_64", "ami-4"));
        assert!(old.is_none());
        let here = in_force(&v, "us-east-1");
        assert_eq!(here.len(), 2);
        assert_eq!(here["x86_64"], "ami-3");
        assert_eq!(in_force(&v, "eu-west-1")["x86_64"], "ami-4");
        assert!(in_force(&v, "ap-south-1").is_empty());
    }

    #[test]
    fn image_names_are_dated_and_keep_to_ec2s_characters() {
        assert_eq!(image_name("my cluster!", 1_764_927_296), "ddisco-my-cluster--20251205-093456");
        assert_eq!(image_name("ddisco", 0), "ddisco-ddisco-19700101-000000");
        assert_eq!(ec2_arch("aarch64"), "arm64");
        assert_eq!(ec2_arch("x86_64"), "x86_64");
    }

    #[test]
    fn the_bake_config_has_one_node_of_the_slaves_type_and_its_own_state() {
        let cfg = Config {
            provider: ProviderKind::Ec2,
            num_slaves: 20,
            master_instance_type: "m5.large".into(),
            slave_instance_type: "c6g.large".into(),
            state_dir: "/tmp/st".into(),
            ..Config::default()
        };
        let b = config(&cfg, Path::new("ddisco.toml"), "ddisco-x").unwrap();
        assert_eq!(b.state_dir, PathBuf::from("/tmp/st/bake"));
        assert_eq!((b.num_slaves, b.master_instance_type.as_str()), (0, "c6g.large"));
        assert!(b.pools().iter().all(|p| p.count == 0));
        assert_eq!(b.bake.as_deref(), Some("ddisco-x"));
        assert_eq!(b.max_runtime, BAKE_WITHIN);
        let local = Config::default();
        let e = config(&local, Path::new("ddisco.toml"), "x").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("provider"));
        assert!(e.message.contains("EC2"), "{e}");
    }
}
