//! Resolving the `ami` setting against EC2 (DescribeImages) at preflight,
//! with the day's cache in `images.json`; the choice itself is
//! `provider::images` (plain functions).

use super::*;

/// Resolved aliases are reused from the cache file for this long, so a
/// restarted controller keeps launching the image its running nodes have.
const IMAGE_CACHE_SECS: u64 = 24 * 3600;

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedImage {
    resolved: Resolved,
    /// Unix seconds.
    at: u64,
}

impl Ec2Provider {
    /// The image to launch an instance type with (after preflight).
    pub(super) fn image_for(&self, itype: &str) -> Result<String, String> {
        let arch = self.type_arch.lock().get(itype).cloned().unwrap_or_else(|| "x86_64".into());
        if let Some(baked) = self.baked.lock().get(&arch) {
            return Ok(baked.clone());
        }
        if let ImageSpec::Id(id) = &self.ami {
            return Ok(id.clone());
        }
        self.image_by_arch
            .lock()
            .get(&arch)
            .cloned()
            .ok_or_else(|| format!("{} is not resolved for {arch} ({itype})", self.ami_text))
    }

    /// Checks the `ami` setting against every architecture the configured
    /// instance types need: an id must exist and match them; an alias is
    /// resolved once per architecture (or taken from the day's cache).
    pub(super) async fn resolve_images(
        &self,
        needed: &[(String, String, String)],
    ) -> Result<(), ProviderError> {
        let c = &self.client;
        match &self.ami {
            ImageSpec::Id(id) => {
                let imgs =
                    self.check("DescribeImages", c.describe_images().image_ids(id).send().await, "ami", id)?;
                let Some(img) = imgs.images().first() else {
                    return Err(ProviderError::Config {
                        key: "ami".into(),
                        message: format!("{id} does not exist in {}", self.region),
                    });
                };
                let img_arch = img.architecture().map(|a| a.as_str().to_string());
                for (arch, itype, key) in needed {
                    if let Some(ia) = img_arch.as_deref().filter(|ia| ia != arch) {
                        return Err(ProviderError::Config {
                            key: key.clone(),
                            message: format!(
                                "{itype} runs {arch} but ami {id} is an {ia} image: use instance types of one \
                                 architecture, or an alias such as `ami = \"ubuntu:24.04\"`, which resolves \
                                 per architecture"
                            ),
                        });
                    }
                }
            }
            ImageSpec::Alias(alias) => {
                let mut archs: Vec<&str> = needed.iter().map(|(a, _, _)| a.as_str()).collect();
                archs.sort();
                archs.dedup();
                let mut cache = self.read_image_cache();
                let mut resolved = Vec::new();
                for arch in archs {
                    let cached = cache
                        .iter()
                        .find(|e| {
                            e.resolved.region == self.region
                                && e.resolved.alias == alias.to_string()
                                && e.resolved.architecture == arch
                        })
                        .map(|e| e.resolved.clone());
                    let r = match cached {
                        Some(r) if self.still_available(&r.image.id).await => r,
                        _ => {
                            let r = self.resolve_alias(alias, arch).await?;
                            cache.retain(|e| {
                                !(e.resolved.region == r.region
                                    && e.resolved.alias == r.alias
                                    && e.resolved.architecture == r.architecture)
                            });
                            cache.push(CachedImage { resolved: r.clone(), at: unix_now() });
                            r
                        }
                    };
                    tracing::info!("image: {}", r.describe());
                    self.image_by_arch.lock().insert(arch.to_string(), r.image.id.clone());
                    resolved.push(r);
                }
                self.write_image_cache(&cache);
                *self.resolved.lock() = resolved;
            }
        }
        Ok(())
    }

    /// After EC2 said the image `itype` launches from is gone: a baked
    /// image is dropped (nodes boot from `ami`), an alias is resolved again.
    /// True when there is another image to try.
    pub(super) async fn renew_image(&self, itype: &str) -> bool {
        let arch = self.type_arch.lock().get(itype).cloned().unwrap_or_else(|| "x86_64".into());
        if let Some(gone) = self.baked.lock().remove(&arch) {
            tracing::warn!("baked image {gone} ({arch}) is gone: nodes boot from {} again", self.ami_text);
            return true;
        }
        let ImageSpec::Alias(alias) = &self.ami else { return false };
        let old = self.image_by_arch.lock().get(&arch).cloned();
        match self.resolve_alias(alias, &arch).await {
            Ok(r) if Some(&r.image.id) != old.as_ref() => {
                tracing::warn!(
                    "image {} ({arch}) is gone: {alias} resolved again: {}",
                    old.as_deref().unwrap_or("-"),
                    r.describe()
                );
                self.image_by_arch.lock().insert(arch.clone(), r.image.id.clone());
                let mut resolved = self.resolved.lock();
                resolved.retain(|x| x.architecture != arch);
                resolved.push(r);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!("image of {alias} ({arch}) is gone and cannot be resolved again: {e}");
                false
            }
        }
    }

    /// The newest official image of `alias` for `arch` in this region.
    async fn resolve_alias(&self, alias: &images::Alias, arch: &str) -> Result<Resolved, ProviderError> {
        let mut req = self.client.describe_images().owners(images::CANONICAL_OWNER);
        for (name, value) in images::filters(alias, arch) {
            req = req.filters(Filter::builder().name(name).values(value).build());
        }
        let what = format!("{alias} ({arch})");
        let out = self.check("DescribeImages", req.send().await, "ami", &what)?;
        let found: Vec<ImageInfo> = out
            .images()
            .iter()
            .filter_map(|i| {
                Some(ImageInfo {
                    id: i.image_id()?.to_string(),
                    name: i.name()?.to_string(),
                    owner: i.owner_id()?.to_string(),
                    architecture: i.architecture()?.as_str().to_string(),
                    created: i.creation_date().unwrap_or("").to_string(),
                    ebs: i.root_device_type().is_some_and(|d| d.as_str() == "ebs"),
                })
            })
            .collect();
        let image = images::newest(alias, arch, &found).ok_or_else(|| ProviderError::Config {
            key: "ami".into(),
            message: format!(
                "`{alias}` resolves to no official Ubuntu image for {arch} in region {}: nothing owned by \
                 Canonical ({}) is named {} there ({} candidates looked at); use another release, region or \
                 instance type, or give an image id",
                self.region,
                images::CANONICAL_OWNER,
                images::name_pattern(alias, arch),
                found.len()
            ),
        })?;
        Ok(Resolved {
            region: self.region.clone(),
            alias: alias.to_string(),
            architecture: arch.into(),
            image,
        })
    }

    /// Is a cached image still there? Any doubt (an error too): no, and the
    /// alias is resolved again.
    async fn still_available(&self, id: &str) -> bool {
        let r = self.client.describe_images().image_ids(id).send().await;
        self.count("DescribeImages", &r);
        r.ok().is_some_and(|o| {
            o.images().first().is_some_and(|i| i.state().is_some_and(|s| s.as_str() == "available"))
        })
    }

    fn read_image_cache(&self) -> Vec<CachedImage> {
        let now = unix_now();
        std::fs::read_to_string(&self.image_cache)
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<CachedImage>>(&t).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| now.saturating_sub(e.at) < IMAGE_CACHE_SECS)
            .collect()
    }

    fn write_image_cache(&self, cache: &[CachedImage]) {
        let text = serde_json::to_string_pretty(cache).expect("serialize");
        if let Err(e) = std::fs::write(&self.image_cache, text) {
            tracing::warn!(
                "cannot write {}: {e} (images are resolved again next start)",
                self.image_cache.display()
            );
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
