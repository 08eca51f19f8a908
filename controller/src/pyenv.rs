//! The nodes' Python packages, prepared once by the controller
//! (`pip_source = "controller"`): every requirement a node would pip-install
//! (`pip_requirements` and the engine's, resolved together) is installed
//! here into a folder, packed as a tar.gz of `site-packages/` and `bin/`,
//! cached by content (requirements, the nodes' Python, architecture) and
//! served over the download port with its SHA-256. Nodes unpack it into a
//! venv (the agent's `python_env` step) and contact no package index.
//!
//! Decisions (what to prepare, for which Python, with which command) are
//! plain functions; `prepare` is the I/O at the edge.

use crate::config::{Config, ProviderKind};
use crate::plan::{Step, StepKind};
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bump when the archive's layout or its digest file changes: old cache
/// entries are not reused. 2: the digest file says whether the archive
/// holds bytecode (entries of 1 do not, and nodes compiled them again).
/// 3: entries keep their modification times (the bytecode's check).
const FORMAT: u32 = 3;

/// What to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub requirements: Vec<String>,
    /// The nodes' Python, "3.12".
    pub python: String,
    /// "x86_64" or "aarch64".
    pub arch: String,
}

impl Spec {
    /// The cache key: a digest of everything that makes the archive.
    pub fn key(&self) -> String {
        let text = format!("{FORMAT}\n{}\n{}\n{}", self.python, self.arch, self.requirements.join("\n"));
        hex::encode(&Sha256::digest(text.as_bytes())[..16])
    }
}

/// A prepared environment in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub spec: Spec,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// It carries bytecode for the nodes' Python (made by that Python:
    /// the controller's own); else nodes compile it once when they unpack.
    pub compiled: bool,
}

impl Prepared {
    /// As nodes' plans name it, fetched from `url`.
    pub fn for_nodes(&self, url: String) -> crate::plan::PreparedEnv {
        crate::plan::PreparedEnv {
            arch: self.spec.arch.clone(),
            url,
            sha256: self.sha256.clone(),
            size: self.size,
            python: self.spec.python.clone(),
            compiled: self.compiled,
            // Nodes show them in their reports: no credentials.
            requirements: self.spec.requirements.iter().map(|r| redacted(r)).collect(),
        }
    }
}

/// A requirement as it may be shown (logs, errors, the nodes' step
/// reports): a URL's user and password (`git+https://user:token@host/...`)
/// become `***`.
pub fn redacted(requirement: &str) -> String {
    let Some(scheme_end) = requirement.find("://") else { return requirement.to_string() };
    let rest = &requirement[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***{}", &requirement[..scheme_end], &rest[at..]),
        None => requirement.to_string(),
    }
}

/// `requirements`, shown (`redacted`), space-separated.
pub fn shown(requirements: &[String]) -> String {
    requirements.iter().map(|r| redacted(r)).collect::<Vec<_>>().join(" ")
}

/// Every requirement a node of any role pip-installs: `pip_requirements`,
/// then the engine's, each once, in order.
pub fn requirements(cfg: &Config, engine_steps: &[Vec<Step>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let engine = engine_steps.iter().flatten().filter_map(|s| match &s.kind {
        StepKind::Pip { requirements, .. } => Some(requirements.iter()),
        _ => None,
    });
    for r in cfg.pip_requirements.iter().chain(engine.flatten()) {
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    out
}

/// The nodes' Python: `node_python`, else this host's (local provider),
/// else the Ubuntu image's.
pub fn node_python(
    cfg: &Config,
    host_python: impl FnOnce() -> Result<String, String>,
) -> Result<String, String> {
    if !cfg.node_python.is_empty() {
        return Ok(cfg.node_python.clone());
    }
    match cfg.provider {
        ProviderKind::Local | ProviderKind::Record => host_python(),
        ProviderKind::Ec2 => match cfg.ec2.ami.as_str() {
            "ubuntu:20.04" | "ubuntu:focal" => Ok("3.8".into()),
            "ubuntu:22.04" | "ubuntu:jammy" => Ok("3.10".into()),
            "ubuntu:24.04" | "ubuntu:noble" => Ok("3.12".into()),
            other => Err(format!(
                "ami = {other:?}: the controller cannot tell its Python; set node_python (e.g. \"3.12\") \
                 so that it prepares the nodes' packages for it"
            )),
        },
    }
}

/// The architectures nodes may have: x86_64, and arm64 when its agent is
/// configured.
pub fn archs(cfg: &Config) -> Vec<&'static str> {
    let mut a = vec!["x86_64"];
    if cfg.agent_binary_arm64.is_some() {
        a.push("aarch64");
    }
    a
}

/// The installer: uv when this host has it (`DDISCO_UV`, or `uv` on PATH),
/// else pip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installer {
    Uv(PathBuf),
    Pip,
}

/// The command that installs `spec` into `target` (its scripts land in
/// `target/bin`). For this host's own Python and architecture, a plain
/// install (sdists may build) with bytecode compiled; for another, wheels
/// only, for that platform (its bytecode is compiled on the nodes).
pub fn install_command(spec: &Spec, target: &Path, installer: &Installer, host: (&str, &str)) -> Vec<String> {
    let native = spec.python == host.0 && spec.arch == host.1;
    let t = target.display().to_string();
    let mut argv: Vec<String> = match installer {
        Installer::Uv(uv) => {
            let mut v = vec![uv.display().to_string(), "pip".into(), "install".into(), "--quiet".into()];
            v.extend(["--target".into(), t]);
            if native {
                // Compiled here once, not on every node at first import.
                v.extend(["--python".into(), "python3".into(), "--compile-bytecode".into()]);
            } else {
                v.extend(["--python-version".into(), spec.python.clone()]);
                v.extend(["--python-platform".into(), format!("{}-manylinux_2_28", spec.arch)]);
            }
            v
        }
        Installer::Pip => {
            let mut v: Vec<String> =
                ["python3", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
                    .map(String::from)
                    .to_vec();
            v.extend(["--no-input".into(), "--target".into(), t]);
            // pip compiles on one core; `prepare` compiles on all of them
            // afterwards (for this host's Python; another's compiles on
            // its nodes).
            v.push("--no-compile".into());
            if !native {
                v.extend(["--only-binary=:all:".into(), "--implementation".into(), "cp".into()]);
                v.extend(["--python-version".into(), spec.python.clone()]);
                for tag in ["manylinux2014", "manylinux_2_28", "manylinux_2_34"] {
                    v.extend(["--platform".into(), format!("{tag}_{}", spec.arch)]);
                }
            }
            v
        }
    };
    argv.push("--".into());
    argv.extend(spec.requirements.iter().cloned());
    argv
}

/// `uv` if this host has it.
pub fn find_installer() -> Installer {
    if let Some(p) = std::env::var_os("DDISCO_UV").filter(|p| !p.is_empty()) {
        return Installer::Uv(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("uv"))
        .find(|p| p.is_file())
        .map_or(Installer::Pip, Installer::Uv)
}

/// This host's python3, "3.11".
pub fn host_python() -> Result<String, String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .map_err(|e| {
            format!("cannot run python3 ({e}): the controller needs it to prepare the nodes' packages")
        })?;
    if !out.status.success() {
        return Err(format!("python3 failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where prepared environments are kept across runs: `DDISCO_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/ddisco`, else `~/.cache/ddisco`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DDISCO_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("ddisco");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ddisco")
}

/// The archive for `spec` from the cache, or made now (and cached); true
/// when it came from the cache. Controllers sharing the cache take turns
/// (a lock per key): one makes it, the others find it made.
pub async fn prepare(spec: &Spec, cache: &Path, installer: &Installer) -> anyhow::Result<(Prepared, bool)> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = cache.join("python-env");
    let key = spec.key();
    let archive = dir.join(format!("{key}.tar.gz"));
    let sum = dir.join(format!("{key}.sha256"));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    let lock_file = std::fs::File::create(dir.join(format!("{key}.lock")))
        .with_context(|| format!("cannot create a lock file in {}", dir.display()))?;
    let _lock =
        tokio::task::spawn_blocking(move || Flock::lock(lock_file, FlockArg::LockExclusive)).await?.map_err(
            |(_, e)| anyhow::anyhow!("cannot lock the cache entry {key} in {}: {e}", dir.display()),
        )?;
    // `<sha256>\n<compiled>\n`.
    if let (Ok(meta), Ok(text)) = (std::fs::metadata(&archive), std::fs::read_to_string(&sum)) {
        let mut lines = text.lines();
        let sha = lines.next().unwrap_or("").trim().to_string();
        let compiled = lines.next().is_some_and(|l| l.trim() == "compiled");
        if sha.len() == 64 {
            let p = Prepared { spec: spec.clone(), path: archive, sha256: sha, size: meta.len(), compiled };
            return Ok((p, true));
        }
    }
    let work = tempfile::Builder::new()
        .prefix(&format!("build-{key}-"))
        .tempdir_in(&dir)
        .with_context(|| format!("cannot make a build folder in {}", dir.display()))?;
    let target = work.path().join("site-packages");
    let host = (host_python().unwrap_or_default(), std::env::consts::ARCH.to_string());
    let compiled = spec.python == host.0 && spec.arch == host.1;
    let argv = install_command(spec, &target, installer, (&host.0, &host.1));
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .output()
        .await
        .with_context(|| format!("cannot run {}", argv[0]))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
        anyhow::bail!(
            "cannot prepare the nodes' Python packages ({}) for Python {} on {}: `{}` failed:\n{}\n\
             (check pip_requirements and node_python; or set pip_source = \"index\" to let every node \
             install from the package index itself)",
            shown(&spec.requirements),
            spec.python,
            spec.arch,
            argv.iter().map(|a| redacted(a)).collect::<Vec<_>>().join(" "),
            tail.join("\n")
        );
    }
    if compiled && matches!(installer, Installer::Pip) {
        // Every core at once (pip alone takes one). A file that does not
        // compile (a package's Python 2 test data) is no error.
        let _ = tokio::process::Command::new("python3")
            .args(["-m", "compileall", "-q", "-j0"])
            .arg(&target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .with_context(|| "cannot run python3 -m compileall".to_string())?;
    }
    // Scripts go to the venv's bin/, not into site-packages.
    let bin = work.path().join("bin");
    if target.join("bin").is_dir() {
        std::fs::rename(target.join("bin"), &bin)?;
    } else {
        std::fs::create_dir_all(&bin)?;
    }
    let part = work.path().join("env.tar.gz");
    let (root, part2) = (work.path().to_path_buf(), part.clone());
    let sha256 = tokio::task::spawn_blocking(move || pack(&root, &part2)).await??;
    let size = std::fs::metadata(&part)?.len();
    // The digest goes last: an archive without one is made again.
    let _ = std::fs::remove_file(&sum);
    std::fs::rename(&part, &archive)?;
    std::fs::write(&sum, format!("{sha256}\n{}\n", if compiled { "compiled" } else { "source" }))?;
    Ok((Prepared { spec: spec.clone(), path: archive, sha256, size, compiled }, false))
}

/// tar.gz of `root`'s `site-packages/` and `bin/` (files and folders;
/// links are followed as the installer left them), its SHA-256.
fn pack(root: &Path, to: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::create(to)?;
    let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    // Real modification times: the bytecode records its source's, and the
    // nodes keep them (else every import would compile it again).
    tar.mode(tar::HeaderMode::Complete);
    for top in ["site-packages", "bin"] {
        tar.append_dir_all(top, root.join(top))?;
    }
    tar.into_inner()?.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(to)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pip(name: &str, reqs: &[&str]) -> Step {
        Step {
            name: name.into(),
            kind: StepKind::Pip {
                requirements: reqs.iter().map(|s| s.to_string()).collect(),
                venv: "/v".into(),
            },
        }
    }

    #[test]
    fn requirements_are_the_configs_then_the_engines_once() {
        let mut cfg = Config { pip_requirements: vec!["iso8601".into(), "x==1".into()], ..Config::default() };
        let master = vec![pip("dask_install", &["dask[distributed]==1"])];
        let slave = vec![pip("dask_install", &["dask[distributed]==1"]), pip("more", &["x==1", "y"])];
        assert_eq!(requirements(&cfg, &[master, slave]), ["iso8601", "x==1", "dask[distributed]==1", "y"]);
        cfg.pip_requirements.clear();
        assert!(requirements(&cfg, &[vec![]]).is_empty());
    }

    #[test]
    fn credentials_in_requirement_urls_are_never_shown() {
        assert_eq!(
            redacted("pkg @ git+https://user:s3cret@git.example.com/org/pkg.git@v1"),
            "pkg @ git+https://***@git.example.com/org/pkg.git@v1"
        );
        assert_eq!(redacted("https://tok@h/x.whl"), "https://***@h/x.whl");
        assert_eq!(redacted("dask[distributed]==1"), "dask[distributed]==1");
        assert_eq!(redacted("git+https://github.com/o/p.git@v1"), "git+https://github.com/o/p.git@v1");
        let env = Prepared {
            spec: Spec {
                requirements: vec!["x @ https://u:p@h/x.whl".into()],
                python: "3.12".into(),
                arch: "x86_64".into(),
            },
            path: "/c/e.tar.gz".into(),
            sha256: "ab".into(),
            size: 1,
            compiled: true,
        };
        assert!(!format!("{:?}", env.for_nodes("https://c/e".into())).contains("u:p"));
    }

    #[test]
    fn node_python_is_configured_or_found_out() {
        let mut cfg = Config { provider: ProviderKind::Local, ..Config::default() };
        assert_eq!(node_python(&cfg, || Ok("3.11".into())).unwrap(), "3.11");
        cfg.provider = ProviderKind::Ec2;
        cfg.ec2.ami = "ubuntu:22.04".into();
        assert_eq!(node_python(&cfg, || unreachable!()).unwrap(), "3.10");
        cfg.ec2.ami = "ami-0abc".into();
        let e = node_python(&cfg, || unreachable!()).unwrap_err();
        assert!(e.contains("ami-0abc") && e.contains("node_python"), "{e}");
        cfg.node_python = "3.9".into();
        assert_eq!(node_python(&cfg, || unreachable!()).unwrap(), "3.9");
    }

    #[test]
    fn the_key_changes_with_what_makes_the_archive() {
        let s = Spec { requirements: vec!["a".into()], python: "3.12".into(), arch: "x86_64".into() };
        let k = s.key();
        assert_eq!(k, s.clone().key());
        for other in [
            Spec { requirements: vec!["b".into()], ..s.clone() },
            Spec { python: "3.11".into(), ..s.clone() },
            Spec { arch: "aarch64".into(), ..s.clone() },
        ] {
            assert_ne!(other.key(), k);
        }
    }

    #[test]
    fn commands_install_for_the_nodes_platform() {
        let s = Spec { requirements: vec!["dask==1".into()], python: "3.12".into(), arch: "aarch64".into() };
        let t = Path::new("/c/t");
        let native = install_command(&s, t, &Installer::Pip, ("3.12", "aarch64"));
        assert!(!native.iter().any(|a| a.contains("platform")), "{native:?}");
        // Compiled after the install, on every core.
        assert!(native.iter().any(|a| a == "--no-compile"), "{native:?}");
        assert_eq!(native[native.len() - 2..], ["--".to_string(), "dask==1".into()]);
        let cross = install_command(&s, t, &Installer::Pip, ("3.11", "x86_64")).join(" ");
        assert!(cross.contains("--only-binary=:all:") && cross.contains("--python-version 3.12"), "{cross}");
        assert!(cross.contains("--platform manylinux2014_aarch64"), "{cross}");
        assert!(cross.contains("--no-compile"), "{cross}");
        let uv = install_command(&s, t, &Installer::Uv("/u/uv".into()), ("3.11", "x86_64")).join(" ");
        assert!(uv.starts_with("/u/uv pip install") && uv.contains("--target /c/t"), "{uv}");
        assert!(uv.contains("--python-platform aarch64-manylinux_2_28 "), "{uv}");
        // A requirement is never taken for an option.
        let s = Spec { requirements: vec!["--index-url=http://x".into()], ..s };
        let argv = install_command(&s, t, &Installer::Pip, ("3.12", "aarch64"));
        assert_eq!(argv[argv.len() - 2..], ["--".to_string(), "--index-url=http://x".into()]);
    }

    #[test]
    fn packs_site_packages_and_bin() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("site-packages/m")).unwrap();
        std::fs::write(t.path().join("site-packages/m/__init__.py"), "X = 1\n").unwrap();
        std::fs::create_dir_all(t.path().join("bin")).unwrap();
        std::fs::write(t.path().join("bin/tool"), "#!/x/python\n").unwrap();
        let out = t.path().join("e.tar.gz");
        let sha = pack(t.path(), &out).unwrap();
        assert_eq!(sha.len(), 64);
        let mut names: Vec<String> =
            tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&out).unwrap()))
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect();
        names.sort();
        assert_eq!(
            names,
            ["bin/", "bin/tool", "site-packages/", "site-packages/m", "site-packages/m/__init__.py"]
        );
        // The same content packs to the same bytes (a stable cache).
        let again = t.path().join("f.tar.gz");
        assert_eq!(pack(t.path(), &again).unwrap(), sha);
    }
}
