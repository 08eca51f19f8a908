//! Sizing a pool by requirements instead of instance types (`vcpus =
//! "4..8"`, `memory_gib = "16.."`, `arch`, `exclude`): parsed here, resolved
//! by the EC2 provider at preflight against the region's types
//! (`DescribeInstanceTypes`) with [`resolve`], a plain function.

/// What a pool asks of its instance types.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirements {
    /// vCPUs, inclusive bounds.
    pub vcpus: (Option<u32>, Option<u32>),
    /// Memory in GiB, inclusive bounds.
    pub memory_gib: (Option<f64>, Option<f64>),
    /// `x86_64` or `arm64`.
    pub arch: String,
    /// Type names left out: exact, or `*` as a wildcard (`t*`, `*.metal`).
    pub exclude: Vec<String>,
    /// At most this many types (the smallest, then by name).
    pub max_types: usize,
}

/// Types a pool resolves to at most, unless it says (`max_types`).
pub const DEFAULT_MAX_TYPES: usize = 10;

/// What the resolution needs to know of one instance type.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TypeInfo {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `x86_64`, `arm64`, `i386`...
    pub archs: Vec<String>,
    pub bare_metal: bool,
    pub current_generation: bool,
    /// Offered on spot (its supported usage classes).
    pub spot: bool,
}

/// A range `"A..B"`, `"A.."`, `"..B"` or a single value `"A"`.
fn range<T: std::str::FromStr + PartialOrd + Copy>(text: &str) -> Result<(Option<T>, Option<T>), String> {
    let t = text.trim();
    let num = |s: &str| -> Result<Option<T>, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<T>().map(Some).map_err(|_| format!("{s:?} is not a number"))
    };
    let (lo, hi) = match t.split_once("..") {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let v = num(t)?;
            (v, v)
        }
    };
    if lo.is_none() && hi.is_none() {
        return Err(format!("{text:?}: give a range such as \"4..8\", \"4..\" or \"..8\", or a number"));
    }
    if let (Some(a), Some(b)) = (lo, hi)
        && a > b
    {
        return Err(format!("{text:?}: the lower bound is above the upper one"));
    }
    Ok((lo, hi))
}

/// Parses a pool's requirement keys; `None` when it gives none of them.
/// Errors name the key (relative to the pool: `vcpus`, `memory_gib`...).
pub fn parse(
    vcpus: &str,
    memory_gib: &str,
    arch: &str,
    exclude: &[String],
    max_types: Option<usize>,
) -> Result<Option<Requirements>, (&'static str, String)> {
    if vcpus.trim().is_empty() && memory_gib.trim().is_empty() {
        if !arch.trim().is_empty() || !exclude.is_empty() || max_types.is_some() {
            return Err(("vcpus", "arch, exclude and max_types refine vcpus or memory_gib: give one".into()));
        }
        return Ok(None);
    }
    let vcpus =
        if vcpus.trim().is_empty() { (None, None) } else { range::<u32>(vcpus).map_err(|e| ("vcpus", e))? };
    let memory_gib = if memory_gib.trim().is_empty() {
        (None, None)
    } else {
        range::<f64>(memory_gib).map_err(|e| ("memory_gib", e))?
    };
    let arch = match arch.trim() {
        "" | "x86_64" | "amd64" => "x86_64",
        "arm64" | "aarch64" => "arm64",
        other => return Err(("arch", format!("{other:?}: x86_64 or arm64"))),
    };
    if let Some(bad) = exclude.iter().find(|p| p.trim().is_empty() || p.matches('*').count() > 2) {
        return Err(("exclude", format!("{bad:?}: a type name, or a pattern with `*` (t*, *.metal)")));
    }
    let max_types = match max_types {
        None => DEFAULT_MAX_TYPES,
        Some(n @ 1..=50) => n,
        Some(n) => return Err(("max_types", format!("{n}: from 1 to 50"))),
    };
    Ok(Some(Requirements { vcpus, memory_gib, arch: arch.into(), exclude: exclude.to_vec(), max_types }))
}

/// Does `name` match `pattern` (`*` any run of characters)?
fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl Requirements {
    /// Whether `t` fits: its vCPUs and memory in range, its architecture,
    /// current generation, not bare metal, on spot when `spot`, not excluded.
    pub fn fits(&self, t: &TypeInfo, spot: bool) -> bool {
        let gib = t.memory_mib as f64 / 1024.0;
        self.vcpus.0.is_none_or(|lo| t.vcpus >= lo)
            && self.vcpus.1.is_none_or(|hi| t.vcpus <= hi)
            && self.memory_gib.0.is_none_or(|lo| gib >= lo)
            && self.memory_gib.1.is_none_or(|hi| gib <= hi)
            && t.archs.contains(&self.arch)
            && t.current_generation
            && !t.bare_metal
            && (t.spot || !spot)
            && !self.exclude.iter().any(|p| glob(p.trim(), &t.name))
    }

    /// In words, for status: `vcpus 4..8, memory 16.. GiB, x86_64`.
    pub fn describe(&self) -> String {
        fn bounds<T: std::fmt::Display>((lo, hi): &(Option<T>, Option<T>)) -> String {
            let s = |v: &Option<T>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
            format!("{}..{}", s(lo), s(hi))
        }
        let mut parts = Vec::new();
        if self.vcpus != (None, None) {
            parts.push(format!("vcpus {}", bounds(&self.vcpus)));
        }
        if self.memory_gib != (None, None) {
            parts.push(format!("memory {} GiB", bounds(&self.memory_gib)));
        }
        parts.push(self.arch.clone());
        if !self.exclude.is_empty() {
            parts.push(format!("not {}", self.exclude.join(", ")));
        }
        parts.join(", ")
    }
}

/// The types of `all` that fit `req` (for spot when `spot`), smallest first
/// (vCPUs, then memory, then name), at most `req.max_types`; and how many
/// fitted in all.
pub fn resolve(req: &Requirements, all: &[TypeInfo], spot: bool) -> (Vec<String>, usize) {
    let mut fit: Vec<&TypeInfo> = all.iter().filter(|t| req.fits(t, spot)).collect();
    fit.sort_by(|a, b| (a.vcpus, a.memory_mib, &a.name).cmp(&(b.vcpus, b.memory_mib, &b.name)));
    let n = fit.len();
    (fit.into_iter().take(req.max_types).map(|t| t.name.clone()).collect(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, vcpus: u32, gib: u64, arch: &str) -> TypeInfo {
        TypeInfo {
            name: name.into(),
            vcpus,
            memory_mib: gib * 1024,
            archs: vec![arch.into()],
            bare_metal: name.ends_with(".metal"),
            current_generation: !name.starts_with("m1."),
            spot: true,
        }
    }

    #[test]
    fn ranges_and_keys_are_parsed_and_errors_name_the_key() {
        let r = parse("4..8", "16..", "", &[], None).unwrap().unwrap();
        assert_eq!((r.vcpus, r.memory_gib), ((Some(4), Some(8)), (Some(16.0), None)));
        assert_eq!((r.arch.as_str(), r.max_types), ("x86_64", DEFAULT_MAX_TYPES));
        assert_eq!(parse("2", "", "aarch64", &[], Some(3)).unwrap().unwrap().vcpus, (Some(2), Some(2)));
        assert_eq!(parse("", "", "", &[], None).unwrap(), None);
        for (args, key) in [
            (("8..4", "", "", None), "vcpus"),
            (("x..", "", "", None), "vcpus"),
            (("..", "", "", None), "vcpus"),
            (("", "lots", "", None), "memory_gib"),
            (("2", "", "sparc", None), "arch"),
            (("2", "", "", Some(0)), "max_types"),
            (("", "", "arm64", None), "vcpus"),
        ] {
            let e = parse(args.0, args.1, args.2, &[], args.3).unwrap_err();
            assert_eq!(e.0, key, "{args:?}: {e:?}");
        }
        assert_eq!(parse("2", "", "", &["".into()], None).unwrap_err().0, "exclude");
    }

    #[test]
    fn types_that_fit_are_resolved_smallest_first_and_bounded() {
        let all = [
            t("m5.xlarge", 4, 16, "x86_64"),
            t("c5.xlarge", 4, 8, "x86_64"),
            t("c5.2xlarge", 8, 16, "x86_64"),
            t("m6g.xlarge", 4, 16, "arm64"),
            t("t3.xlarge", 4, 16, "x86_64"),
            t("m5.metal", 96, 384, "x86_64"),
            t("m1.xlarge", 4, 15, "x86_64"),
            t("c5.large", 2, 4, "x86_64"),
        ];
        let r = parse("4..8", "8..", "", &["t*".into()], None).unwrap().unwrap();
        assert_eq!(
            resolve(&r, &all, true),
            (vec!["c5.xlarge".into(), "m5.xlarge".into(), "c5.2xlarge".into()], 3)
        );
        let r = parse("4", "16", "arm64", &[], None).unwrap().unwrap();
        assert_eq!(resolve(&r, &all, true).0, ["m6g.xlarge"]);
        // Bounded: the smallest first.
        let r = parse("2..", "", "", &["*.metal".into()], Some(2)).unwrap().unwrap();
        assert_eq!(resolve(&r, &all, true), (vec!["c5.large".into(), "c5.xlarge".into()], 5));
        // Spot pools take only types offered on spot.
        let mut od_only = t("x5.xlarge", 4, 16, "x86_64");
        od_only.spot = false;
        let r = parse("4", "16", "", &[], None).unwrap().unwrap();
        assert!(!resolve(&r, std::slice::from_ref(&od_only), true).0.contains(&"x5.xlarge".to_string()));
        assert_eq!(resolve(&r, std::slice::from_ref(&od_only), false).0, ["x5.xlarge"]);
        assert_eq!(r.describe(), "vcpus 4..4, memory 16..16 GiB, x86_64");
    }

    #[test]
    fn exclusion_patterns() {
        for (p, n, m) in [
            ("t*", "t3.large", true),
            ("t*", "c5.large", false),
            ("*.metal", "m5.metal", true),
            ("*.metal", "m5.large", false),
            ("c5*.large", "c5a.large", true),
            ("c5*.large", "c5.xlarge", false),
            ("c5.large", "c5.large", true),
            ("c5.large", "c5.large2", false),
            ("*a*", "c5.large", true),
        ] {
            assert_eq!(glob(p, n), m, "{p} {n}");
        }
    }
}
