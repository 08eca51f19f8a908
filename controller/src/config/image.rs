//! The `ami` setting's grammar: an image id, or an official Ubuntu alias
//! (`ubuntu:24.04`) that the EC2 provider resolves (`provider::images`).

/// LTS releases an alias may name: (release, codename).
pub const RELEASES: &[(&str, &str)] =
    &[("20.04", "focal"), ("22.04", "jammy"), ("24.04", "noble"), ("26.04", "resolute")];

/// `ubuntu:<release>`, with the release looked up in [`RELEASES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub release: &'static str,
    pub codename: &'static str,
}

impl std::fmt::Display for Alias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ubuntu:{}", self.release)
    }
}

/// What the `ami` setting says: an image id, or an alias to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    Id(String),
    Alias(Alias),
}

/// Parses the `ami` setting. `Err` says what is accepted.
pub fn parse(value: &str) -> Result<ImageSpec, String> {
    let v = value.trim();
    if let Some(rest) = v.strip_prefix("ami-") {
        if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(ImageSpec::Id(v.to_string()));
        }
        return Err(format!("{v:?} is not an image id (ami- followed by hex digits)"));
    }
    let supported = || RELEASES.iter().map(|(r, _)| format!("ubuntu:{r}")).collect::<Vec<_>>().join(", ");
    let Some(rel) = v.strip_prefix("ubuntu:") else {
        return Err(format!(
            "{v:?} is neither an image id (ami-...) nor an official Ubuntu image alias ({})",
            supported()
        ));
    };
    RELEASES
        .iter()
        .find(|(r, c)| *r == rel || *c == rel)
        .map(|(release, codename)| ImageSpec::Alias(Alias { release, codename }))
        .ok_or_else(|| {
            format!("{v:?}: Ubuntu {rel} is not a supported LTS release; use one of {}", supported())
        })
}
