//! The `scratch` step: instance-store volumes become the node's scratch
//! space (the engine's data: DISCO_ROOT, Dask's spill directory) before the
//! engine starts. Nothing on them is kept: scratch by design.
//!
//! - Volumes are found in sysfs: NVMe namespaces whose controller model is
//!   `Amazon EC2 NVMe Instance Storage` (every current instance type with
//!   instance store). The step can also name its devices (tests do).
//! - One volume: ext4. Several: one btrfs file system striped over all of
//!   them (`-d raid0 -m raid0`), which needs neither md nor device-mapper;
//!   the Ubuntu kernel has btrfs and the images have btrfs-progs.
//! - Formatting skips discard (instance store comes zeroed; discarding a
//!   large volume takes minutes). Mounted `noatime`.
//! - No instance store: the path is a directory on the root volume, and
//!   the step says so. Already mounted (agent restarted, cloud-init's
//!   ephemeral0 mount): used as it is.

use crate::command::{Outcome, fail, run};
use crate::model::Scratch;
use std::path::{Path, PathBuf};

/// The model string of EC2 instance-store NVMe controllers.
pub const INSTANCE_STORE_MODEL: &str = "Amazon EC2 NVMe Instance Storage";

/// Instance-store block devices under `sys_block` (normally `/sys/block`),
/// as `/dev/<name>`, sorted.
pub fn discover(sys_block: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(sys_block) else { return vec![] };
    let mut out: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/model"))
                .is_ok_and(|m| m.trim() == INSTANCE_STORE_MODEL)
        })
        .map(|e| PathBuf::from("/dev").join(e.file_name()))
        .collect();
    out.sort();
    out
}

/// What is mounted at `path`, per a mounts table (`/proc/self/mounts`).
pub fn mounted_at(mounts: &str, path: &Path) -> Option<(String, String)> {
    let want = path.to_str()?;
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Spaces in mount points are octal-escaped in the table.
        (f.len() >= 3 && f[1].replace("\\040", " ") == want).then(|| (f[0].to_string(), f[2].to_string()))
    })
}

/// How a set of volumes is made into one file system: (mkfs argv, the
/// device to mount).
pub fn format_command(devices: &[PathBuf]) -> (Vec<String>, PathBuf) {
    let s = |p: &PathBuf| p.display().to_string();
    if devices.len() == 1 {
        let argv = ["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1", "-L", "ddisco-scratch"]
            .iter()
            .map(|a| a.to_string())
            .chain([s(&devices[0])])
            .collect();
        (argv, devices[0].clone())
    } else {
        let argv = ["mkfs.btrfs", "-f", "-q", "-K", "-L", "ddisco-scratch", "-d", "raid0", "-m", "raid0"]
            .iter()
            .map(|a| a.to_string())
            .chain(devices.iter().map(s))
            .collect();
        (argv, devices[0].clone())
    }
}

pub async fn scratch(s: &Scratch, log: &Path) -> Outcome {
    scratch_with(s, log, Path::new("/sys/block")).await
}

/// `scratch`, discovering instance store under `sys_block`.
async fn scratch_with(s: &Scratch, log: &Path, sys_block: &Path) -> Outcome {
    let path = PathBuf::from(&s.path);
    if !path.is_absolute() || path == Path::new("/") {
        return fail(format!("scratch path {:?} must be an absolute directory other than /", s.path));
    }
    let devices: Vec<PathBuf> = if s.devices.is_empty() {
        discover(sys_block)
    } else {
        s.devices.iter().map(PathBuf::from).collect()
    };
    if let Err(e) = std::fs::create_dir_all(&path) {
        return fail(format!("cannot create {}: {e}", path.display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some((dev, fs)) = mounted_at(&mounts, &path) {
        return ok(format!("{} is already mounted ({dev}, {fs}): using it as scratch", path.display()));
    }
    if devices.is_empty() {
        return ok(format!(
            "no instance store on this instance type: scratch at {} is on the root volume (choose a type \
             with instance store, e.g. c5d/m5d/r5d, for fast scratch)",
            path.display()
        ));
    }
    if let Some(busy) =
        devices.iter().find(|d| mounts.lines().any(|l| l.split_whitespace().next() == d.to_str()))
    {
        return fail(format!("{} is mounted elsewhere: not formatting it", busy.display()));
    }
    let (argv, target) = format_command(&devices);
    let mut mkfs = tokio::process::Command::new(&argv[0]);
    mkfs.args(&argv[1..]);
    let out = run(mkfs, log).await;
    if out.code != 0 {
        return fail(format!("{} failed (exit {}): {}", argv[0], out.code, out.tail.trim()));
    }
    let mut mount = tokio::process::Command::new("mount");
    mount.args(["-o", "noatime"]).arg(&target).arg(&path);
    let out = run(mount, log).await;
    if out.code != 0 {
        return fail(format!(
            "mount {} {} failed (exit {}): {}",
            target.display(),
            path.display(),
            out.code,
            out.tail.trim()
        ));
    }
    let names: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    let how =
        if devices.len() == 1 { "ext4".to_string() } else { format!("btrfs striped over {}", devices.len()) };
    ok(format!(
        "instance store {} mounted at {} ({how}); nothing on it is kept",
        names.join(", "),
        path.display()
    ))
}

fn ok(msg: String) -> Outcome {
    Outcome { code: 0, tail: msg }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn discovers_only_instance_store_namespaces() {
        let sys = tempfile::tempdir().unwrap();
        let dev = |name: &str, model: &str| {
            let d = sys.path().join(name).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model"), format!("{model}                    \n")).unwrap();
        };
        dev("nvme0n1", "Amazon Elastic Block Store");
        dev("nvme2n1", INSTANCE_STORE_MODEL);
        dev("nvme1n1", INSTANCE_STORE_MODEL);
        std::fs::create_dir_all(sys.path().join("loop0")).unwrap();
        assert_eq!(discover(sys.path()), vec![PathBuf::from("/dev/nvme1n1"), PathBuf::from("/dev/nvme2n1")]);
        assert!(discover(&sys.path().join("missing")).is_empty());
    }

    #[test]
    fn mount_table_and_format_commands() {
        let table = "/dev/vda1 / ext4 rw 0 0\n/dev/nvme1n1 /mnt ext4 rw,noatime 0 0\n";
        assert_eq!(mounted_at(table, Path::new("/mnt")), Some(("/dev/nvme1n1".into(), "ext4".into())));
        assert_eq!(mounted_at(table, Path::new("/data")), None);
        let (argv, target) = format_command(&[PathBuf::from("/dev/a")]);
        assert_eq!((argv[0].as_str(), target), ("mkfs.ext4", PathBuf::from("/dev/a")));
        let (argv, _) = format_command(&[PathBuf::from("/dev/a"), PathBuf::from("/dev/b")]);
        assert_eq!(argv[0], "mkfs.btrfs");
        assert!(argv.windows(2).any(|w| w == ["-d", "raid0"]), "{argv:?}");
        assert!(argv.ends_with(&["/dev/a".to_string(), "/dev/b".to_string()]));
    }

    /// File-backed loop devices stand in for instance-store volumes (no
    /// NVMe instance store exists here). Needs root, losetup and the mkfs
    /// tools: the tests that use it are ignored unless asked for
    /// (scripts/test does, as root), and fail, saying why, without them.
    fn loop_devices(dir: &Path, n: usize, needs: &[&str]) -> Vec<PathBuf> {
        assert!(nix_is_root(), "instance-store mounting needs root (loop devices, mount)");
        for tool in needs.iter().chain(&["losetup", "mount", "umount"]) {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "{tool} is not installed (apt-get install e2fsprogs btrfs-progs mount)"
            );
        }
        let mut devs = Vec::new();
        for i in 0..n {
            let img = dir.join(format!("vol{i}.img"));
            std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
            let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
            assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            devs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
        devs
    }

    fn nix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }

    /// Runs the step on `n` loop devices; returns the file system type
    /// mounted and, for several, what `btrfs filesystem df` says.
    fn mount_on_loops(n: usize, needs: &[&str]) -> (String, String) {
        // One at a time: loop device allocation races between threads.
        static LOOPS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let devs = loop_devices(dir.path(), n, needs);
        let mnt = dir.path().join("mnt");
        let step = Scratch {
            path: mnt.display().to_string(),
            devices: devs.iter().map(|d| d.display().to_string()).collect(),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let t0 = std::time::Instant::now();
        let out = rt.block_on(scratch(&step, &dir.path().join("scratch.log")));
        eprintln!("MEASURE scratch step on {n} x 256 MiB loop device(s): {:.2}s", t0.elapsed().as_secs_f64());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let found = mounted_at(&mounts, &mnt);
        // Usable: a file can be written there.
        let writable = std::fs::write(mnt.join("probe"), b"x").is_ok();
        // Again (agent restarted): already mounted, left alone.
        let again = rt.block_on(scratch(&step, &dir.path().join("scratch.log")));
        let df = if n > 1 {
            let o = Command::new("btrfs").args(["filesystem", "show"]).arg(&mnt).output().unwrap();
            let o2 = Command::new("btrfs").args(["filesystem", "df"]).arg(&mnt).output().unwrap();
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o2.stdout))
        } else {
            String::new()
        };
        let _ = Command::new("umount").arg(&mnt).status();
        for d in &devs {
            let _ = Command::new("losetup").arg("-d").arg(d).status();
        }
        assert_eq!(out.code, 0, "{}", out.tail);
        assert!(out.tail.contains("mounted at"), "{}", out.tail);
        assert!(writable);
        assert_eq!(again.code, 0);
        assert!(again.tail.contains("already mounted"), "{}", again.tail);
        (found.expect("scratch is mounted").1, df)
    }

    #[test]
    #[ignore = "needs root, losetup and mkfs: scripts/test runs it as root (cargo test -- --include-ignored)"]
    fn one_volume_is_formatted_ext4_and_mounted() {
        let (fs, _) = mount_on_loops(1, &["mkfs.ext4"]);
        assert_eq!(fs, "ext4");
    }

    #[test]
    #[ignore = "needs root, losetup and mkfs: scripts/test runs it as root (cargo test -- --include-ignored)"]
    fn several_volumes_are_striped_into_one() {
        let (fs, df) = mount_on_loops(2, &["mkfs.btrfs", "btrfs"]);
        assert_eq!(fs, "btrfs");
        // One file system over both volumes, data striped.
        assert!(df.contains("Total devices 2") && df.contains("Data, RAID0"), "{df}");
    }

    #[test]
    fn without_instance_store_the_root_volume_is_used_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("scratch");
        let step = Scratch { path: mnt.display().to_string(), devices: vec![] };
        // A /sys/block without instance-store namespaces (whatever this
        // machine has).
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("nvme0n1/device")).unwrap();
        std::fs::write(sys.path().join("nvme0n1/device/model"), "Amazon Elastic Block Store\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = rt.block_on(scratch_with(&step, &dir.path().join("log"), sys.path()));
        assert_eq!(out.code, 0);
        assert!(out.tail.contains("no instance store") && out.tail.contains("root volume"), "{}", out.tail);
        assert!(mnt.is_dir());
    }
}
