//! Images baked by `ddisco-controller bake` (see `crate::bake`): made from
//! a sealed node with CreateImage, waited for until available, and
//! launched from in place of `ami` for their architecture.

use super::*;

/// Tag on a baked image: the instance it was made from.
pub const SOURCE_TAG: &str = "ddisco:source-instance";

impl Ec2Provider {
    /// CreateImage of a sealed node, without reboot (the agent writes
    /// nothing after the seal), tagged `tag_key = image`, with the cluster
    /// id and the source instance.
    pub(super) async fn create_image_of(
        &self,
        instance_id: &str,
        name: &str,
    ) -> Result<String, ProviderError> {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Image)
            .tags(Tag::builder().key(&self.tag_key).value("image").build())
            .tags(Tag::builder().key(CLUSTER_TAG).value(&self.cluster_id).build())
            .tags(Tag::builder().key(SOURCE_TAG).value(instance_id).build())
            .build();
        let r = self
            .client
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .description(format!(
                "ddisco {}: nodes' packages and engine, baked from {instance_id}",
                self.tag_key
            ))
            .no_reboot(true)
            .tag_specifications(tags)
            .send()
            .await;
        let out = self.check("CreateImage", r, "bake", &format!("image {name} of {instance_id}"))?;
        out.image_id()
            .map(String::from)
            .ok_or_else(|| ProviderError::Other("CreateImage returned no image id".into()))
    }

    /// `Ok(true)` once the image is available; `Ok(false)` while pending
    /// (or not yet listed: EC2 is eventually consistent); `Err` when it
    /// failed.
    pub(super) async fn image_state(&self, image_id: &str) -> Result<bool, ProviderError> {
        let r = self.client.describe_images().image_ids(image_id).send().await;
        self.count("DescribeImages", &r);
        let out = match r {
            Ok(o) => o,
            Err(e) => {
                let (code, msg) = describe(&e);
                if code == "InvalidAMIID.NotFound" {
                    return Ok(false);
                }
                return Err(ProviderError::Other(format!("DescribeImages {image_id}: {code} {msg}")));
            }
        };
        let Some(img) = out.images().first() else { return Ok(false) };
        match img.state().map(|s| s.as_str()).unwrap_or("pending") {
            "available" => Ok(true),
            "pending" => Ok(false),
            other => Err(ProviderError::Other(format!(
                "image {image_id} is {other}{}",
                img.state_reason().and_then(|r| r.message()).map(|m| format!(": {m}")).unwrap_or_default()
            ))),
        }
    }

    /// The baked images given (`Provider::use_images`) that exist here,
    /// are available and run their architecture: kept; the others are
    /// dropped with a warning (nodes then boot from `ami` and run every
    /// step).
    pub(super) async fn check_baked(&self) {
        let wanted: Vec<(String, String)> =
            self.baked.lock().iter().map(|(a, i)| (a.clone(), i.clone())).collect();
        for (arch, id) in wanted {
            let r = self.client.describe_images().image_ids(&id).send().await;
            self.count("DescribeImages", &r);
            let why = match &r {
                Ok(o) => match o.images().first() {
                    Some(img) if img.state().is_some_and(|s| s.as_str() == "available") => {
                        match img.architecture().map(|a| a.as_str().to_string()) {
                            Some(a) if a != arch => Some(format!("it is an {a} image, recorded for {arch}")),
                            _ => None,
                        }
                    }
                    Some(img) => {
                        Some(format!("it is {}", img.state().map(|s| s.as_str()).unwrap_or("in no state")))
                    }
                    None => Some("it does not exist".into()),
                },
                Err(e) => Some(describe(e).0),
            };
            match why {
                None => tracing::info!(%arch, image = %id, "launching {arch} nodes from the baked image"),
                Some(why) => {
                    tracing::warn!(
                        "baked image {id} ({arch}) is not usable in {}: {why}; {arch} nodes boot from `ami` and \
                         run every step (run `ddisco-controller bake` again)",
                        self.region
                    );
                    self.baked.lock().remove(&arch);
                }
            }
        }
    }
}
