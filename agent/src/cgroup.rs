//! Services in cgroups: whatever a service starts, daemons that leave its
//! process tree and session included (Disco's proxy, lighttpd, forks and
//! detaches), stays in the service's cgroup, and stopping the service
//! kills the cgroup (`cgroup.kill`): nothing it started is left.
//!
//! Used where it holds: the agent runs as root and the machine has a
//! cgroup v2 hierarchy (EC2's Ubuntu images; a hybrid layout's `unified`
//! mount here). Elsewhere services stop as before (their process tree), and
//! the node as a whole ends with its process group or machine.
//!
//! Layout: `<cgroup2 mount>/ddisco/<node>-<cluster>/<service>`, where
//! `<cluster>` is the start of the cluster CA's fingerprint (node ids repeat
//! across clusters on one host) and `<service>` a hash of the service's
//! name. The cgroup file system holds no symlinks and only root writes it.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// This node's cgroup.
#[derive(Debug, Clone)]
pub struct NodeGroup {
    dir: PathBuf,
}

impl NodeGroup {
    /// The node's cgroup (created), if services can use cgroups here.
    pub fn new(node_id: &str, ca_sha256: &str) -> Option<NodeGroup> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let root = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
        let safe = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let cluster = ca_sha256.get(..12).filter(|c| safe(c))?;
        if !safe(node_id) || node_id.is_empty() {
            return None;
        }
        let dir = root.join("ddisco").join(format!("{node_id}-{cluster}"));
        match std::fs::create_dir_all(&dir) {
            Ok(()) if dir.join("cgroup.kill").exists() => Some(NodeGroup { dir }),
            Ok(()) => {
                tracing::info!(
                    "{}: no cgroup.kill (kernel before 5.14): services stop by process tree",
                    dir.display()
                );
                None
            }
            Err(e) => {
                tracing::info!(
                    "cannot use cgroups for services ({}: {e}): they stop by process tree",
                    dir.display()
                );
                None
            }
        }
    }

    /// A service's cgroup (created); what an earlier run of the service
    /// left in it is killed (without waiting: this runs on the agent's
    /// async tasks), so a service started again never runs beside an
    /// earlier copy.
    pub fn service(&self, name: &str) -> std::io::Result<ServiceGroup> {
        let hash = hex::encode(&Sha256::digest(name.as_bytes())[..8]);
        let dir = self.dir.join(format!("svc-{hash}"));
        std::fs::create_dir_all(&dir)?;
        let g = ServiceGroup { dir };
        if !g.is_empty() {
            tracing::warn!(service = %name, "processes of an earlier run of this service were left: killing them");
            let _ = std::fs::write(g.dir.join("cgroup.kill"), "1");
        }
        Ok(g)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process of every service of this node (the dead man's
    /// switch, an agent that starts again).
    pub fn kill_all(&self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
    }
}

/// One service's cgroup.
#[derive(Debug, Clone)]
pub struct ServiceGroup {
    dir: PathBuf,
}

impl ServiceGroup {
    /// `argv` started so that its first process (and so everything it
    /// starts) is in this cgroup before the program runs: `sh` puts itself
    /// in, then execs it. No window in which a fork escapes.
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut v = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            self.dir.join("cgroup.procs").display().to_string(),
        ];
        v.extend(argv.iter().cloned());
        v
    }

    /// Its processes now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// Sends `sig` to each of its processes.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for p in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
        }
    }

    /// Kills every process in it (`cgroup.kill`) and waits (bounded) until
    /// it is empty.
    pub fn kill_now(&self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !self.is_empty() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what is left and removes the cgroup.
    pub fn remove(&self) {
        self.kill_now();
        let _ = std::fs::remove_dir(&self.dir);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (fields: ... mount point (5th) ... ` - ` fs type ...).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Mount points with spaces are octal-escaped (\040): none here.
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_unified_and_hybrid_layouts() {
        let unified =
            "25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      32 30 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("32 30 0:28 / /x rw - cgroup cgroup rw,cpu\n"), None);
    }

    /// As root on a machine with cgroup v2: a service that daemonizes
    /// (double fork, new session) leaves nothing behind when its cgroup is
    /// removed.
    #[test]
    #[ignore = "needs root and cgroup v2: scripts/test runs it as root (cargo test -- --include-ignored)"]
    fn a_daemon_a_service_started_is_killed_with_its_cgroup() {
        let node = NodeGroup::new("test-node", &hex::encode(rand::random::<[u8; 8]>()))
            .expect("this test needs root and cgroup v2 (run it as root, on a cgroup v2 host)");
        let svc = node.service("daemonizes").unwrap();
        let argv: Vec<String> =
            ["sh", "-c", "setsid sh -c 'sleep 300 & echo $! > \"$0\"' \"$0\"; sleep 300", "/dev/null"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let wrapped = svc.wrap(&argv);
        let mut child = std::process::Command::new(&wrapped[0]).args(&wrapped[1..]).spawn().unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while svc.pids().len() < 3 {
            assert!(std::time::Instant::now() < end, "the service's processes: {:?}", svc.pids());
            std::thread::sleep(Duration::from_millis(20));
        }
        let all = svc.pids();
        svc.remove();
        let _ = child.wait();
        for p in all {
            let alive = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
            assert!(!alive, "process {p} of the service survived its cgroup");
        }
        assert!(!svc.dir().exists());
        let _ = std::fs::remove_dir(&node.dir);
    }
}
