//! Images baked by `ddisco-controller bake`: what an image holds, and the
//! seal that prepares a node to become one.
//!
//! A bake node runs every step that leaves only machine state (packages,
//! the Python environment, the engine's install: the steps with an image
//! digest), then its last step, `seal`: it records those digests in
//! `baked.json` and removes what no image may carry, this agent's identity
//! (key, certificate, node id), its bootstrap, progress and step logs, and,
//! with `generalize`, the machine's SSH host keys, cloud-init's per-instance
//! state and logs (the bake node's userdata among them) and machine-id, which
//! every instance booted from the image makes anew. From then on the agent
//! writes nothing to disk; the controller images the machine and terminates
//! it. A node booted from the image skips (reports SKIPPED) each step whose
//! digest `baked.json` lists.

use crate::command::{Outcome, fail};
use crate::model::Plan;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// In the agent's folder: the steps the image this node booted from holds.
pub const BAKED: &str = "baked.json";

/// Bounds what is read back (a record of a few dozen steps is ~5 KiB).
const MAX_BAKED_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Baked {
    /// The image's name (`ddisco-<tag_key>-<arch>-<time>`).
    pub image: String,
    pub sealed_unix_ms: u64,
    pub steps: Vec<BakedStep>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BakedStep {
    pub name: String,
    pub digest: String,
}

impl Baked {
    /// What the image of this node holds, if it was booted from a baked
    /// image: `baked.json` read without following a symlink; anything
    /// unreadable counts as no image (every step then runs).
    pub fn load(dir: &Path) -> Option<Baked> {
        let path = dir.join(BAKED);
        match crate::files::read_safely(&path) {
            Ok(Some(text)) if text.len() <= MAX_BAKED_BYTES => match serde_json::from_str(&text) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("{} is not a bake record ({e}): every step runs", path.display());
                    None
                }
            },
            Ok(Some(_)) => {
                tracing::warn!("{} is larger than {MAX_BAKED_BYTES} bytes: every step runs", path.display());
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("cannot read {}: {e}: every step runs", path.display());
                None
            }
        }
    }

    /// Does the image hold a step with this digest?
    pub fn holds(&self, digest: &str) -> bool {
        self.steps.iter().any(|s| s.digest == digest)
    }
}

/// The machine's root for `generalize`: `/`, or `DDISCO_IMAGE_ROOT` (the
/// test hypervisor's stand-in for an instance's disk).
pub fn image_root() -> PathBuf {
    std::env::var_os("DDISCO_IMAGE_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// The `seal` step (step `index` of `plan`): every earlier step is done.
/// `generalize`: the machine's root whose instance-specific state goes too
/// ([`image_root`]).
pub fn seal(dir: &Path, plan: &Plan, index: usize, image: &str, generalize: Option<&Path>) -> Outcome {
    let steps: Vec<BakedStep> = plan.steps[..index.min(plan.steps.len())]
        .iter()
        .filter_map(|s| {
            s.image_digest.as_ref().map(|d| BakedStep { name: s.name.clone(), digest: d.clone() })
        })
        .collect();
    let record = Baked { image: image.to_string(), sealed_unix_ms: crate::facts::unix_ms(), steps };
    let text = serde_json::to_string_pretty(&record).expect("serializes");
    if let Err(e) = crate::files::write_private(&dir.join(BAKED), &text) {
        return fail(format!("cannot write {}: {e}", dir.join(BAKED).display()));
    }
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for name in ["identity", "bootstrap.json", "ca.pem", "progress.json", "progress.tmp", "steps", "services"]
    {
        remove(&dir.join(name), &mut removed, &mut errors);
    }
    if let Some(root) = generalize {
        match std::fs::read_dir(root.join("etc/ssh")) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                        remove(&e.path(), &mut removed, &mut errors);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", root.join("etc/ssh").display())),
        }
        for rel in [
            "var/lib/cloud/instance",
            "var/lib/cloud/instances",
            "var/lib/cloud/data",
            "var/log/cloud-init.log",
            "var/log/cloud-init-output.log",
        ] {
            remove(&root.join(rel), &mut removed, &mut errors);
        }
        // Empty, not gone: systemd makes a new id at the next boot.
        let machine_id = root.join("etc/machine-id");
        if let Ok(m) = std::fs::symlink_metadata(&machine_id)
            && m.is_file()
        {
            match std::fs::OpenOptions::new().write(true).truncate(true).open(&machine_id) {
                Ok(_) => removed.push(format!("{} (emptied)", machine_id.display())),
                Err(e) => errors.push(format!("{}: {e}", machine_id.display())),
            }
        }
    }
    if !errors.is_empty() {
        return fail(format!("cannot seal the image: {}", errors.join("; ")));
    }
    Outcome {
        code: 0,
        tail: format!(
            "sealed for image {image}: {} steps recorded in {BAKED}; removed {}",
            record.steps.len(),
            if removed.is_empty() { "nothing".to_string() } else { removed.join(", ") }
        ),
    }
}

/// Removes a file, a symlink (never what it points to) or a folder tree
/// (`remove_dir_all` does not follow symlinks inside it).
fn remove(path: &Path, removed: &mut Vec<String>, errors: &mut Vec<String>) {
    let res = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    match res {
        Ok(()) => removed.push(path.display().to_string()),
        Err(e) => errors.push(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Step, StepKind};

    fn step(name: &str, digest: Option<&str>) -> Step {
        Step {
            name: name.into(),
            kind: StepKind::Shell { script: "true".into(), env: Default::default() },
            image_digest: digest.map(String::from),
        }
    }

    #[test]
    fn seal_records_machine_steps_and_leaves_no_identity() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir_all(dir.join("identity")).unwrap();
        std::fs::write(dir.join("identity/key.pem"), "secret key").unwrap();
        std::fs::write(dir.join("bootstrap.json"), "{\"slots\":[]}").unwrap();
        std::fs::write(dir.join("progress.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("steps")).unwrap();
        std::fs::write(dir.join("steps/a.log"), "output").unwrap();
        // A symlink in the agent's folder is removed, not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("services")).unwrap();
        let plan = Plan {
            id: "p".into(),
            steps: vec![
                step("packages", Some("d1")),
                step("keys", None),
                step("engine", Some("d2")),
                step("seal", None),
            ],
        };
        // The machine's own state, under a stand-in root.
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(r.join("var/lib/cloud/instances/i-1")).unwrap();
        std::fs::write(r.join("var/lib/cloud/instances/i-1/user-data.txt"), "token").unwrap();
        std::os::unix::fs::symlink(r.join("var/lib/cloud/instances/i-1"), r.join("var/lib/cloud/instance"))
            .unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key"), "host key").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config"), "Port 22").unwrap();
        std::fs::write(r.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
        let out = seal(dir, &plan, 3, "ddisco-x", Some(r));
        assert_eq!(out.code, 0, "{}", out.tail);
        for gone in ["identity", "bootstrap.json", "progress.json", "steps", "services"] {
            assert!(std::fs::symlink_metadata(dir.join(gone)).is_err(), "{gone} left: {}", out.tail);
        }
        assert!(outside.path().join("keep").exists());
        assert!(!r.join("etc/ssh/ssh_host_ed25519_key").exists());
        assert!(r.join("etc/ssh/sshd_config").exists());
        assert!(std::fs::symlink_metadata(r.join("var/lib/cloud/instance")).is_err());
        assert!(!r.join("var/lib/cloud/instances").exists());
        assert_eq!(std::fs::read_to_string(r.join("etc/machine-id")).unwrap(), "");
        let b = Baked::load(dir).unwrap();
        assert_eq!(b.image, "ddisco-x");
        let names: Vec<_> = b.steps.iter().map(|s| (s.name.as_str(), s.digest.as_str())).collect();
        assert_eq!(names, [("packages", "d1"), ("engine", "d2")]);
        assert!(b.holds("d2") && !b.holds("d3"));
    }

    #[test]
    fn a_bake_record_that_is_a_symlink_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let other = d.path().join("other.json");
        std::fs::write(&other, serde_json::to_string(&Baked::default()).unwrap()).unwrap();
        std::os::unix::fs::symlink(&other, d.path().join(BAKED)).unwrap();
        assert_eq!(Baked::load(d.path()), None);
        std::fs::remove_file(d.path().join(BAKED)).unwrap();
        std::fs::write(d.path().join(BAKED), "not json").unwrap();
        assert_eq!(Baked::load(d.path()), None);
    }
}
