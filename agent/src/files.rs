//! Writing and reading files as root, safely.
//!
//! The agent runs as root and writes into directories that other users own
//! (a Disco job runs as `disco`, whose home holds managed files). Every such
//! write and read goes through this module:
//!
//! - the directory is opened component by component with `O_NOFOLLOW`; a
//!   symlink is followed only where the directory holding it is trusted
//!   (owned by root or by the agent's own user, writable by nobody else);
//! - a file is written to a random `O_EXCL | O_NOFOLLOW` temporary in that
//!   directory, given its mode and owner through its descriptor
//!   (`fchmod`, `fchown`), synced, and renamed over the target with
//!   `renameat` (a symlink at the target is replaced, never followed);
//! - a file is read only if it is a regular file (`O_NOFOLLOW`, `fstat`).

use nix::fcntl::{AT_FDCWD, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{Gid, Uid, fchown};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

/// The agent's own private files (0600, temporary + rename) in its own
/// directory, which only root (or the agent's user) can write.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Who a written file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The user `name` (and its primary group).
    pub fn of_user(name: &str) -> Result<Owner, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Owner { uid: u.uid.as_raw(), gid: u.gid.as_raw() }),
            Ok(None) => Err(format!("no user {name:?} on this node")),
            Err(e) => Err(format!("cannot look up user {name:?}: {e}")),
        }
    }
}

fn io(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Is this directory safe to follow a symlink in (nobody but root or this
/// process's user can have planted it)?
fn trusted(dir: &OwnedFd) -> std::io::Result<bool> {
    let st = fstat(dir).map_err(io)?;
    let me = nix::unistd::geteuid().as_raw();
    Ok((st.st_uid == 0 || st.st_uid == me) && st.st_mode & 0o022 == 0)
}

/// Opens the absolute directory `dir` without following a symlink planted
/// by another user; with `create`, missing directories are made (0755).
pub fn open_dir(dir: &Path, create: bool) -> std::io::Result<OwnedFd> {
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    if !dir.is_absolute() {
        return Err(std::io::Error::other(format!("{} is not an absolute path", dir.display())));
    }
    let mut fd = openat(AT_FDCWD, "/", dir_flags, Mode::empty()).map_err(io)?;
    let mut so_far = std::path::PathBuf::from("/");
    for c in dir.components() {
        let name = match c {
            Component::RootDir => continue,
            Component::Normal(n) => n,
            other => {
                return Err(std::io::Error::other(format!("{}: {other:?} in a path", dir.display())));
            }
        };
        so_far.push(name);
        let next = match openat(&fd, name, dir_flags | OFlag::O_NOFOLLOW, Mode::empty()) {
            Ok(f) => f,
            Err(nix::errno::Errno::ENOENT) if create => {
                let made = match mkdirat(&fd, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => true,
                    Err(nix::errno::Errno::EEXIST) => false,
                    Err(e) => return Err(io(e)),
                };
                let dir = openat(&fd, name, dir_flags | OFlag::O_NOFOLLOW, Mode::empty()).map_err(io)?;
                // 0755 whatever the umask (the userdata's is 077): other
                // users read what is written there (`/etc/disco` for
                // the `disco` user).
                if made {
                    fchmod(&dir, Mode::from_bits_truncate(0o755)).map_err(io)?;
                }
                dir
            }
            // A symlink (ELOOP) or a symlink to a non-directory (ENOTDIR).
            Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
                if !trusted(&fd)? {
                    return Err(std::io::Error::other(format!(
                        "refusing to follow the symlink {}: its directory can be written by other users",
                        so_far.display()
                    )));
                }
                openat(&fd, name, dir_flags, Mode::empty()).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        };
        fd = next;
    }
    Ok(fd)
}

fn split(path: &Path) -> std::io::Result<(&Path, &std::ffi::OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(std::io::Error::other(format!("{} names no file", path.display()))),
    }
}

/// Largest file [`read_in`] reads: a managed file (`known_hosts` of a
/// thousand nodes is ~100 KiB), a collected key, a bake record.
pub const MAX_READ: u64 = 4 * 1024 * 1024;

/// Reads `name` in `dir` if it is a regular file of at most [`MAX_READ`]
/// bytes; `None` if it is missing. A symlink or anything else (a FIFO a job
/// planted: opened without blocking, then refused) is refused.
pub fn read_in(dir: &OwnedFd, name: &std::ffi::OsStr) -> std::io::Result<Option<String>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let f = match openat(dir, name, flags, Mode::empty()) {
        Ok(f) => f,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(nix::errno::Errno::ELOOP) => {
            return Err(std::io::Error::other(format!(
                "refusing to read {}: it is a symlink",
                Path::new(name).display()
            )));
        }
        Err(e) => return Err(io(e)),
    };
    let st = fstat(&f).map_err(io)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(std::io::Error::other(format!(
            "refusing to read {}: not a regular file",
            Path::new(name).display()
        )));
    }
    if st.st_size as u64 > MAX_READ {
        return Err(std::io::Error::other(format!(
            "refusing to read {}: {} bytes, more than {MAX_READ}",
            Path::new(name).display(),
            st.st_size
        )));
    }
    // A file that grows while read stops at the bound too.
    let mut text = String::new();
    std::fs::File::from(f).take(MAX_READ).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// Reads `path` (absolute) safely: see [`read_in`].
pub fn read_safely(path: &Path) -> std::io::Result<Option<String>> {
    let (dir, name) = split(path)?;
    match open_dir(dir, false) {
        Ok(d) => read_in(&d, name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `name` in `dir` with `contents`, of `mode` and `owner`, through
/// a random exclusive temporary and `renameat`.
pub fn write_in(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    contents: &[u8],
    mode: u32,
    owner: Option<Owner>,
) -> std::io::Result<()> {
    let tmp = format!(".ddisco-{}.tmp", hex::encode(rand::random::<[u8; 8]>()));
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, tmp.as_str(), flags, Mode::from_bits_truncate(0o600)).map_err(io)?;
    let result = (|| {
        if let Some(o) = owner {
            fchown(&fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))).map_err(io)?;
        }
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(io)?;
        let mut f = std::fs::File::from(fd);
        f.write_all(contents)?;
        f.sync_all()?;
        renameat(dir, tmp.as_str(), dir, name).map_err(io)
    })();
    if result.is_err() {
        let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    result
}

/// Opens (creating it if needed) the directory `dir` and gives it `mode`
/// and `owner` through its descriptor.
pub fn prepare_dir(dir: &Path, mode: u32, owner: Option<Owner>) -> std::io::Result<OwnedFd> {
    let d = open_dir(dir, true)?;
    if let Some(o) = owner {
        fchown(&d, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))).map_err(io)?;
    }
    fchmod(&d, Mode::from_bits_truncate(mode)).map_err(io)?;
    Ok(d)
}

/// Writes `path` (absolute) safely, creating its directory if needed: see
/// [`open_dir`] and [`write_in`].
pub fn write_safely(path: &Path, contents: &[u8], mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    let (dir, name) = split(path)?;
    let d = open_dir(dir, true)?;
    write_in(&d, name, contents, mode, owner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A home directory owned by `nobody` (65534): another user's, as
    /// `~disco` is on a Disco node.
    fn users_home(base: &Path) -> std::path::PathBuf {
        let home = base.join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        home
    }

    /// The agent runs under the userdata's umask 077; directories it makes
    /// for a file are still 0755, or `/etc/disco/settings.py` would be
    /// unreadable to the `disco` user (found on a machine node).
    #[test]
    fn directories_made_for_a_file_are_0755_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("etc/disco/settings.py");
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
        let written = write_safely(&p, b"x = 1", 0o644, None);
        nix::sys::stat::umask(old);
        written.unwrap();
        for dir in ["etc", "etc/disco"] {
            let mode = std::fs::metadata(d.path().join(dir)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{dir}");
        }
    }

    #[test]
    fn writes_and_reads_regular_files_with_mode_and_owner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/file");
        let owner = root().then_some(Owner { uid: 65534, gid: 65534 });
        write_safely(&p, b"hello", 0o640, owner).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o640);
        if root() {
            assert_eq!((md.uid(), md.gid()), (65534, 65534));
        }
        assert_eq!(read_safely(&p).unwrap().as_deref(), Some("hello"));
        assert_eq!(read_safely(&d.path().join("a/missing")).unwrap(), None);
        // No temporary is left behind.
        assert_eq!(std::fs::read_dir(d.path().join("a/b")).unwrap().count(), 1);
    }

    /// A job makes a file the agent reads a FIFO (the open would block
    /// until a writer came: directive application stopped for good) or a
    /// huge sparse file (the root agent out of memory): both refused, at
    /// once.
    #[test]
    fn a_fifo_or_a_huge_file_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("known_hosts");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_safely(&f).map_err(|e| e.to_string()));
        });
        let res = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("reading a FIFO blocked");
        assert!(res.unwrap_err().contains("not a regular file"));
        let huge = d.path().join("authorized_keys");
        std::fs::File::create(&huge).unwrap().set_len(MAX_READ + 1).unwrap();
        let e = read_safely(&huge).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    /// Root only (it gives files to another user): ignored by a plain
    /// `cargo test`, run by `scripts/test` (as root, `--include-ignored`).
    #[ignore = "needs root: scripts/test runs it as root (cargo test -- --include-ignored)"]
    #[test]
    fn a_symlink_planted_by_another_user_is_never_followed() {
        assert!(
            root(),
            "this test needs root (it gives files to another user): run it as root, as scripts/test does"
        );
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "SECRET").unwrap();
        let home = users_home(d.path());
        // The managed file itself replaced by a symlink to a secret: reading
        // it is refused, writing replaces the link, the secret is untouched.
        let managed = home.join("known_hosts");
        std::os::unix::fs::symlink(&secret, &managed).unwrap();
        let e = read_safely(&managed).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        write_safely(&managed, b"new", 0o644, None).unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
        assert!(!std::fs::symlink_metadata(&managed).unwrap().file_type().is_symlink());
        // The old predictable temporary name, planted: nothing uses it.
        std::os::unix::fs::symlink(&secret, home.join("known_hosts.ddisco-tmp")).unwrap();
        write_safely(&managed, b"newer", 0o644, None).unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
        // A directory on the way replaced by a symlink: refused.
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.join(".ssh")).unwrap();
        let e = write_safely(&home.join(".ssh/authorized_keys"), b"k", 0o600, None).unwrap_err();
        assert!(e.to_string().contains("refusing to follow the symlink"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // A symlink in a directory only root can write is followed.
        let trusted_link = d.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &trusted_link).unwrap();
        write_safely(&trusted_link.join("f"), b"ok", 0o644, None).unwrap();
        assert_eq!(std::fs::read_to_string(elsewhere.join("f")).unwrap(), "ok");
    }
}
