//! Official Ubuntu images by name: `ami = "ubuntu:24.04"` instead of an id.
//!
//! Plain data and plain functions only (the EC2 calls are in `ec2.rs`): the
//! alias grammar, the DescribeImages filters an alias stands for, and which
//! of the images found is the one to use.
//!
//! An alias resolves per region and per architecture (`x86_64` or `arm64`,
//! from the instance type) to the newest *available*, EBS-backed image
//! published by Canonical's own account ([`CANONICAL_OWNER`]) whose name is
//! that of Canonical's server images:
//! `ubuntu/images/<storage>/ubuntu-<codename>-<release>-<amd64|arm64>-server-<date>`.
//! Look-alikes published by anybody else, Canonical's `images-testing`,
//! `ubuntu-minimal` and `ubuntu-pro-server` lines are never chosen.

pub use crate::config::image::{Alias, ImageSpec, RELEASES, parse};
use serde::{Deserialize, Serialize};

/// Canonical's AWS account: the owner of the official Ubuntu Cloud images.
pub const CANONICAL_OWNER: &str = "099720109477";

/// Canonical's name for an architecture (`amd64`, `arm64`).
pub fn ubuntu_arch(ec2_arch: &str) -> &str {
    match ec2_arch {
        "x86_64" => "amd64",
        other => other,
    }
}

/// The architecture an instance type runs, from its supported
/// architectures (`x86_64` wins over `i386`; `arm64` for Graviton).
pub fn type_arch(supported: &[String]) -> Option<String> {
    for want in ["x86_64", "arm64"] {
        if supported.iter().any(|a| a == want) {
            return Some(want.to_string());
        }
    }
    None
}

/// The DescribeImages filters for an alias on one architecture:
/// (filter name, value). Owner goes in `Owners`.
pub fn filters(alias: &Alias, ec2_arch: &str) -> Vec<(&'static str, String)> {
    vec![
        ("name", name_pattern(alias, ec2_arch)),
        ("architecture", ec2_arch.to_string()),
        ("state", "available".into()),
    ]
}

/// The EC2 name filter (with `*` wildcards) of an alias's server images.
pub fn name_pattern(alias: &Alias, ec2_arch: &str) -> String {
    format!("ubuntu/images/*/ubuntu-{}-{}-{}-server-*", alias.codename, alias.release, ubuntu_arch(ec2_arch))
}

/// One image as DescribeImages reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub architecture: String,
    /// ISO 8601, as EC2 gives it (sorts as text).
    pub created: String,
    pub ebs: bool,
}

/// Does this image belong to the alias on this architecture? Checked again
/// here because an endpoint's filters may be looser than EC2's.
pub fn matches(alias: &Alias, ec2_arch: &str, img: &ImageInfo) -> bool {
    let Some(rest) = img.name.strip_prefix("ubuntu/images/") else { return false };
    let Some((storage, leaf)) = rest.split_once('/') else { return false };
    let prefix = format!("ubuntu-{}-{}-{}-server-", alias.codename, alias.release, ubuntu_arch(ec2_arch));
    img.owner == CANONICAL_OWNER
        && img.architecture == ec2_arch
        && img.ebs
        && !storage.is_empty()
        && !storage.contains("instance")
        && leaf.strip_prefix(&prefix).is_some_and(|date| !date.is_empty())
}

/// The newest image of the alias among `found` (by creation date, then by
/// name, whose suffix is the build date).
pub fn newest(alias: &Alias, ec2_arch: &str, found: &[ImageInfo]) -> Option<ImageInfo> {
    found
        .iter()
        .filter(|i| matches(alias, ec2_arch, i))
        .max_by(|a, b| (a.created.as_str(), a.name.as_str()).cmp(&(b.created.as_str(), b.name.as_str())))
        .cloned()
}

/// An alias resolved for one architecture of one region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub region: String,
    pub alias: String,
    pub architecture: String,
    pub image: ImageInfo,
}

impl Resolved {
    /// One line for status.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) = {} {} (created {})",
            self.alias,
            ubuntu_arch(&self.architecture),
            self.image.id,
            self.image.name,
            self.image.created
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, name: &str, owner: &str, arch: &str, created: &str) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            name: name.into(),
            owner: owner.into(),
            architecture: arch.into(),
            created: created.into(),
            ebs: true,
        }
    }

    #[test]
    fn parse_accepts_ids_and_lts_aliases() {
        assert_eq!(parse("ami-0abc12").unwrap(), ImageSpec::Id("ami-0abc12".into()));
        let ImageSpec::Alias(a) = parse("ubuntu:24.04").unwrap() else { panic!() };
        assert_eq!((a.release, a.codename), ("24.04", "noble"));
        assert_eq!(parse("ubuntu:jammy").unwrap(), parse("ubuntu:22.04").unwrap());
        let e = parse("ubuntu:18.04").unwrap_err();
        assert!(e.contains("not a supported LTS") && e.contains("ubuntu:24.04"), "{e}");
        assert!(parse("debian:12").unwrap_err().contains("neither an image id"));
        assert!(parse("ami-").is_err());
        assert!(parse("ami-xyz!").is_err());
    }

    #[test]
    fn newest_official_server_image_wins() {
        let ImageSpec::Alias(a) = parse("ubuntu:24.04").unwrap() else { panic!() };
        let c = CANONICAL_OWNER;
        let found = vec![
            img(
                "ami-1",
                "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20260101",
                c,
                "x86_64",
                "2026-01-01T00:00:00.000Z",
            ),
            img(
                "ami-2",
                "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261101",
                c,
                "x86_64",
                "2026-11-01T00:00:00.000Z",
            ),
            img(
                "ami-3",
                "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20260601",
                c,
                "x86_64",
                "2026-06-01T00:00:00.000Z",
            ),
            // Newer, but not what the alias means:
            img(
                "ami-4",
                "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261120",
                "123456789012",
                "x86_64",
                "2026-11-20T00:00:00.000Z",
            ),
            img(
                "ami-5",
                "ubuntu/images-testing/hvm-ssd-gp3/ubuntu-noble-daily-amd64-server-20261121",
                c,
                "x86_64",
                "2026-11-21T00:00:00.000Z",
            ),
            img(
                "ami-6",
                "ubuntu-minimal/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-minimal-20261122",
                c,
                "x86_64",
                "2026-11-22T00:00:00.000Z",
            ),
            img(
                "ami-7",
                "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20261123",
                c,
                "arm64",
                "2026-11-23T00:00:00.000Z",
            ),
            img(
                "ami-8",
                "ubuntu/images/hvm-instance/ubuntu-noble-24.04-amd64-server-20261124",
                c,
                "x86_64",
                "2026-11-24T00:00:00.000Z",
            ),
            img(
                "ami-9",
                "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20261125",
                c,
                "x86_64",
                "2026-11-25T00:00:00.000Z",
            ),
        ];
        assert_eq!(newest(&a, "x86_64", &found).unwrap().id, "ami-2");
        assert_eq!(newest(&a, "arm64", &found).unwrap().id, "ami-7");
        let mut ebs_less = found.clone();
        ebs_less[1].ebs = false;
        assert_eq!(newest(&a, "x86_64", &ebs_less).unwrap().id, "ami-3");
        assert!(newest(&a, "x86_64", &[]).is_none());
    }

    #[test]
    fn filters_name_the_server_images_of_the_arch() {
        let ImageSpec::Alias(a) = parse("ubuntu:22.04").unwrap() else { panic!() };
        assert_eq!(name_pattern(&a, "arm64"), "ubuntu/images/*/ubuntu-jammy-22.04-arm64-server-*");
        assert_eq!(name_pattern(&a, "x86_64"), "ubuntu/images/*/ubuntu-jammy-22.04-amd64-server-*");
        assert!(filters(&a, "x86_64").contains(&("architecture", "x86_64".into())));
        assert_eq!(type_arch(&["i386".into(), "x86_64".into()]).as_deref(), Some("x86_64"));
        assert_eq!(type_arch(&["arm64".into()]).as_deref(), Some("arm64"));
        assert_eq!(type_arch(&[]), None);
    }
}
