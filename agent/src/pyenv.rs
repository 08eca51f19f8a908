//! The `python_env` step: the node's Python packages come from the
//! controller, never from a package index. The controller prepared them
//! once (a tar.gz of `site-packages/...` and `bin/...`); the agent fetches
//! the archive over HTTPS from the controller's download port (the cluster
//! CA, `ca.pem` in the agent's folder, checked at start), checks its SHA-256
//! while it streams, and unpacks it into a virtual environment created
//! without pip. A venv that already holds this archive (its `.ddisco-env`
//! says the SHA-256: a rerun, or a baked image) is left alone.
//!
//! The archive is the controller's, checked by digest, but it is still
//! unpacked defensively: regular files and directories only (no links, no
//! devices), every path relative and inside the venv, into a folder the
//! agent created itself, so nothing in it can write through a symlink.

use crate::command::{Outcome, fail, run};
use crate::model::PythonEnv;
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};

/// The marker file in a venv: the SHA-256 of the archive it holds.
pub const MARKER: &str = ".ddisco-env";

pub async fn python_env(env: &PythonEnv, dir: &Path, log: &Path) -> Outcome {
    let venv = PathBuf::from(&env.venv);
    if std::fs::read_to_string(venv.join(MARKER)).is_ok_and(|m| m.trim() == env.sha256)
        && venv.join("bin/python").exists()
    {
        return Outcome {
            code: 0,
            tail: format!(
                "skipped: {} already holds this environment ({})",
                venv.display(),
                short(&env.sha256)
            ),
        };
    }
    let have = match node_python().await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if have != env.python {
        return fail(format!(
            "this node's python3 is {have}; the controller prepared packages for Python {} \
             (set node_python = \"{have}\" in the controller's config, or use an image with Python {})",
            env.python, env.python
        ));
    }
    let t0 = std::time::Instant::now();
    let archive = dir.join("python-env.tar.gz");
    let ca = match std::fs::read(dir.join("ca.pem")) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot read {}: {e}", dir.join("ca.pem").display())),
    };
    if let Err(e) = fetch(&env.url, &ca, env.size, &env.sha256, &archive).await {
        let _ = std::fs::remove_file(&archive);
        return fail(format!("cannot fetch the Python environment from {}: {e}", env.url));
    }
    let fetched = t0.elapsed();
    // A fresh venv: whatever was there (another environment) goes.
    if venv.exists()
        && let Err(e) = std::fs::remove_dir_all(&venv)
    {
        return fail(format!("cannot remove the old {}: {e}", venv.display()));
    }
    // Readable by all (the engine may run as another user, e.g. `dask`),
    // whatever the agent's own umask.
    let mut mk = tokio::process::Command::new("sh");
    mk.args(["-c", "umask 022 && exec python3 -m venv --without-pip \"$0\""]).arg(&venv);
    let out = run(mk, log).await;
    if out.code != 0 {
        return out;
    }
    let site = venv.join(format!("lib/python{}/site-packages", env.python));
    let (a, v, s) = (archive.clone(), venv.clone(), site.clone());
    let unpacked = tokio::task::spawn_blocking(move || unpack(&a, &v, &s)).await;
    let _ = std::fs::remove_file(&archive);
    let files = match unpacked {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            return fail(format!("cannot unpack the Python environment into {}: {e}", venv.display()));
        }
        Err(e) => return fail(format!("the unpacking task failed: {e}")),
    };
    // Bytecode for this Python, once, readable by all: the engine's user
    // could not write it at each start. A file that does not compile (a
    // package's Python 2 test data) is not an error.
    let compiled = if env.compiled {
        "with its bytecode"
    } else {
        compile(&venv.join("bin/python"), &site, log).await;
        "bytecode compiled here"
    };
    if let Err(e) = std::fs::write(venv.join(MARKER), format!("{}\n", env.sha256)) {
        return fail(format!("cannot write {}: {e}", venv.join(MARKER).display()));
    }
    Outcome {
        code: 0,
        tail: format!(
            "{} ({}, {} files, {:.1} MB, {compiled}) into {} from the controller: fetched in {:.2}s, ready in {:.2}s",
            env.requirements.join(" "),
            short(&env.sha256),
            files,
            env.size as f64 / 1e6,
            venv.display(),
            fetched.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        ),
    }
}

/// Compiles `site`'s modules with `python` (world-readable bytecode).
async fn compile(python: &Path, site: &Path, log: &Path) {
    let mut c = tokio::process::Command::new("sh");
    c.args(["-c", "umask 022 && exec \"$0\" -m compileall -q -j0 \"$1\" >/dev/null"]).arg(python).arg(site);
    let _ = run(c, log).await;
}

fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

/// `python3`'s "major.minor".
async fn node_python() -> Result<String, String> {
    let out = tokio::process::Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .await
        .map_err(|e| format!("cannot run python3 ({e}): the node needs Python 3"))?;
    if !out.status.success() {
        return Err(format!("python3 failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `https://host:port/path` -> (host, port, path).
fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("https://").ok_or("not an https:// URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "443"),
        }
    };
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok((host, port, path.to_string()))
}

/// GETs `url` (server certificate of the cluster CA `ca_pem`) into `to`,
/// at most `size` bytes, and checks the SHA-256.
async fn fetch(url: &str, ca_pem: &[u8], size: u64, sha256: &str, to: &Path) -> Result<(), String> {
    use http_body_util::BodyExt;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    let (host, port, path) = parse_url(url)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| format!("ca.pem: {e}"))?).map_err(|e| format!("ca.pem: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("host {host:?}: {e}"))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())
    };
    let (mut sender, conn) = tokio::time::timeout(std::time::Duration::from_secs(30), connect)
        .await
        .map_err(|_| "no connection within 30 s".to_string())??;
    tokio::spawn(conn);
    let req = hyper::Request::get(&path)
        .header(hyper::header::HOST, &host)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut file = tokio::fs::File::create(to).await.map_err(|e| format!("{}: {e}", to.display()))?;
    let mut hash = Sha256::new();
    let mut got = 0u64;
    // A stalled transfer fails instead of holding the plan forever.
    let idle = std::time::Duration::from_secs(60);
    while let Some(frame) = tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| format!("no data for {} s after {got} bytes", idle.as_secs()))?
    {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            got += data.len() as u64;
            if got > size {
                return Err(format!("more than the {size} bytes announced"));
            }
            hash.update(data);
            file.write_all(data).await.map_err(|e| format!("{}: {e}", to.display()))?;
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    let digest = hex::encode(hash.finalize());
    if digest != sha256 {
        return Err(format!("its SHA-256 is {digest}, the plan says {sha256}: refusing it"));
    }
    Ok(())
}

/// Where an archive entry goes: `site-packages/X` under `site`, `bin/X`
/// under `venv/bin`; `None` for anything else (or a path that climbs).
fn destination(entry: &Path, venv: &Path, site: &Path) -> Option<PathBuf> {
    let mut parts = entry.components().filter(|c| !matches!(c, Component::CurDir));
    let top = match parts.next()? {
        Component::Normal(t) => t.to_str()?.to_string(),
        _ => return None,
    };
    let rest: Vec<_> = parts.collect();
    if rest.iter().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let base = match top.as_str() {
        "site-packages" => site.to_path_buf(),
        "bin" => venv.join("bin"),
        _ => return None,
    };
    Some(rest.iter().fold(base, |p, c| p.join(c)))
}

/// Unpacks the archive; returns the number of files written. Scripts in
/// `bin/` get the venv's python as their interpreter.
fn unpack(archive: &Path, venv: &Path, site: &Path) -> Result<usize, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let f = std::fs::File::open(archive).map_err(|e| e.to_string())?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    make_dirs(site)?;
    let python = venv.join("bin/python");
    let mut files = 0;
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(to) = destination(&path, venv, site) else {
            if path.components().count() <= 1 {
                continue; // the top folders themselves
            }
            return Err(format!("{}: not a path of a Python environment", path.display()));
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => make_dirs(&to)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = to.parent() {
                    make_dirs(parent)?;
                }
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                // create_new: never onto something already there (a link).
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&to)
                    .map_err(|e| format!("{}: {e}", to.display()))?;
                if to.starts_with(venv.join("bin")) {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).map_err(|e| format!("{}: {e}", path.display()))?;
                    if data.starts_with(b"#!") {
                        data = with_interpreter(&data, &python);
                    }
                    out.write_all(&data).map_err(|e| format!("{}: {e}", to.display()))?;
                } else {
                    std::io::copy(&mut entry, &mut out).map_err(|e| format!("{}: {e}", to.display()))?;
                }
                out.set_permissions(std::fs::Permissions::from_mode(mode | 0o444))
                    .map_err(|e| format!("{}: {e}", to.display()))?;
                // The source's time, which its bytecode records: Python
                // uses the bytecode only if they agree.
                if let Ok(secs) = entry.header().mtime() {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                    out.set_modified(at).map_err(|e| format!("{}: {e}", to.display()))?;
                }
                files += 1;
            }
            other => return Err(format!("{}: a {other:?} entry (only files and folders)", path.display())),
        }
    }
    Ok(files)
}

/// Creates `dir` and the folders above it that are missing, each 0755: set,
/// not left to the agent's umask (the engine's user reads them).
fn make_dirs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent)?;
    }
    std::fs::create_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// A script's first line made `#!<python>` when it names a Python.
fn with_interpreter(data: &[u8], python: &Path) -> Vec<u8> {
    let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let first = String::from_utf8_lossy(&data[..end]);
    if !first.contains("python") {
        return data.to_vec();
    }
    let mut out = format!("#!{}", python.display()).into_bytes();
    out.extend_from_slice(&data[end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            parse_url("https://10.0.0.1:7444/env/ab.tar.gz").unwrap(),
            ("10.0.0.1".into(), 7444, "/env/ab.tar.gz".into())
        );
        assert_eq!(parse_url("https://[fd00::1]:7444/x").unwrap(), ("fd00::1".into(), 7444, "/x".into()));
        assert_eq!(parse_url("https://ctl.example").unwrap(), ("ctl.example".into(), 443, "/".into()));
        assert!(parse_url("http://10.0.0.1/x").is_err());
        assert!(parse_url("https://:7444/x").is_err());
        assert!(parse_url("https://h:port/x").is_err());
    }

    #[test]
    fn entries_land_in_the_venv_only() {
        let (venv, site) = (Path::new("/v"), Path::new("/v/lib/python3.12/site-packages"));
        let d = |p: &str| destination(Path::new(p), venv, site);
        assert_eq!(d("site-packages/dask/__init__.py"), Some(site.join("dask/__init__.py")));
        assert_eq!(d("./bin/dask"), Some(venv.join("bin/dask")));
        assert_eq!(d("site-packages/../../etc/passwd"), None);
        assert_eq!(d("/etc/passwd"), None);
        assert_eq!(d("etc/passwd"), None);
        assert_eq!(d("bin/../../x"), None);
    }

    #[tokio::test]
    async fn bytecode_is_compiled_readable_by_all() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site");
        std::fs::create_dir_all(site.join("m")).unwrap();
        std::fs::write(site.join("m/__init__.py"), "X = 1\n").unwrap();
        std::fs::write(site.join("m/py2.py"), "print 'not Python 3'\n").unwrap();
        // As unpacked (whatever the umask of the moment: another test sets one).
        for f in ["m/__init__.py", "m/py2.py"] {
            std::fs::set_permissions(site.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        compile(Path::new("python3"), &site, &t.path().join("log")).await;
        let pyc: Vec<_> = std::fs::read_dir(site.join("m/__pycache__")).unwrap().flatten().collect();
        assert_eq!(pyc.len(), 1, "{pyc:?}");
        assert_eq!(pyc[0].metadata().unwrap().permissions().mode() & 0o044, 0o044);
    }

    #[test]
    fn scripts_get_the_venv_python() {
        let p = Path::new("/v/bin/python");
        assert_eq!(
            with_interpreter(b"#!/tmp/build/bin/python3.12\nimport x\n", p),
            b"#!/v/bin/python\nimport x\n".to_vec()
        );
        assert_eq!(with_interpreter(b"#!/bin/sh\necho\n", p), b"#!/bin/sh\necho\n".to_vec());
    }

    fn archive(dir: &Path, entries: &[(&str, tar::EntryType, &[u8])]) -> PathBuf {
        let path = dir.join("env.tar.gz");
        let gz =
            flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc").unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn unpacks_files_and_refuses_links_and_strays() {
        let t = tempfile::tempdir().unwrap();
        let venv = t.path().join("venv");
        let site = venv.join("lib/python3.12/site-packages");
        let ok = archive(
            t.path(),
            &[
                ("site-packages/m/__init__.py", tar::EntryType::Regular, b"X = 1\n"),
                ("bin/tool", tar::EntryType::Regular, b"#!/build/bin/python\nimport m\n"),
            ],
        );
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        assert_eq!(unpack(&ok, &venv, &site).unwrap(), 2);
        nix::sys::stat::umask(old);
        // Readable by others whatever the umask was.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&site.join("m")), 0o755);
        assert_eq!(mode(&site.join("m/__init__.py")), 0o755);
        assert_eq!(std::fs::read(site.join("m/__init__.py")).unwrap(), b"X = 1\n");
        let tool = std::fs::read_to_string(venv.join("bin/tool")).unwrap();
        assert!(tool.starts_with(&format!("#!{}\n", venv.join("bin/python").display())), "{tool}");
        for bad in [
            archive(t.path(), &[("site-packages/evil", tar::EntryType::Symlink, b"")]),
            archive(t.path(), &[("etc/cron.d/x", tar::EntryType::Regular, b"x")]),
        ] {
            let v2 = t.path().join("v2");
            let _ = std::fs::remove_dir_all(&v2);
            assert!(unpack(&bad, &v2, &v2.join("site")).is_err());
            assert!(!t.path().join("etc").exists());
        }
    }
}
