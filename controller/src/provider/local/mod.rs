//! The local provider (the embedded default): every node is a process tree on
//! this machine, started by running its userdata with `sh` in its own folder
//! `<state_dir>/nodes/<node id>/` and its own process group. Killing the group
//! is how an instance dies. Nodes outlive the controller, as instances would;
//! a restarted controller finds them again through their pid files.
//!
//! With `local_machines = true` (root only) every node is a machine of its
//! own instead: see [`machine`].
//!
//! # Guarantees
//! - Only processes that carry this cluster's id and the node's id in their
//!   environment are ever signalled (a recycled pid is never killed).
//! - The node gets a minimal environment (an allow-list), never the
//!   controller's secrets.

pub mod machine;

use super::{LaunchBatch, Launched, Observed, Provider, ProviderError, Target};
use crate::plan::NodeLayout;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Environment variables passed through to local nodes.
const ENV_ALLOW: &[&str] = &[
    "PATH",
    "PIP_CACHE_DIR",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "RUST_LOG",
    "PYENV_ROOT",
    "PYENV_VERSION",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
];

pub struct LocalProvider {
    nodes_dir: PathBuf,
    /// Unique per state directory: tells this cluster's processes apart.
    cluster_id: String,
    /// Second octet of this cluster's loopback range 127.N.x.y.
    net: u8,
    install_packages: bool,
    /// `local_machines`: the nodes' network; `None`: plain process trees.
    machines: Option<machine::Network>,
    /// Launches and terminations take turns: both act on a node's folder,
    /// and a node id can come back (a cluster started over on its state
    /// directory) while its old instance is being terminated beside the
    /// reconcile loop.
    node_ops: tokio::sync::Mutex<()>,
}

impl LocalProvider {
    /// Plain local nodes (process trees in folders).
    pub fn new(state_dir: &Path, install_packages: bool) -> std::io::Result<LocalProvider> {
        let nodes_dir = state_dir.join("nodes");
        std::fs::create_dir_all(&nodes_dir)?;
        let canonical = nodes_dir.canonicalize()?;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(canonical.as_os_str().as_encoded_bytes());
        Ok(LocalProvider {
            nodes_dir: canonical,
            cluster_id: hex::encode(&digest[..8]),
            net: 1 + digest[8] % 254,
            install_packages,
            machines: None,
            node_ops: tokio::sync::Mutex::new(()),
        })
    }

    /// Machine nodes (`local_machines`): creates (or finds) the cluster's
    /// bridge. Root only.
    pub fn machines(state_dir: &Path, install_packages: bool) -> Result<LocalProvider, ProviderError> {
        let mut p = LocalProvider::new(state_dir, install_packages)?;
        p.machines = Some(machine::Network::ensure(&p.cluster_id)?);
        Ok(p)
    }

    /// The address machine nodes dial the controller on (the bridge's).
    pub fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.machines.as_ref().map(machine::Network::gateway)
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.nodes_dir.join(id)
    }

    /// The pid of the node's process group leader, if it is still ours.
    fn live_pid(&self, id: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.node_dir(id).join("pid")).ok()?.trim().parse().ok()?;
        is_ours(pid, &self.cluster_id, id).then_some(pid)
    }

    async fn launch_one(
        &self,
        node_id: &str,
        address: &str,
        userdata: &str,
    ) -> Result<String, ProviderError> {
        let dir = self.node_dir(node_id);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let script = dir.join("userdata.sh");
        crate::pki::write_private(&script, userdata).map_err(|e| ProviderError::Other(e.to_string()))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("console.log"))?;
        let mut cmd = match &self.machines {
            None => {
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("userdata.sh");
                cmd
            }
            Some(_) => {
                std::fs::write(dir.join("boot.sh"), machine::boot_script())?;
                // The node's namespaces; killing this `unshare` (the group
                // leader) kills the node's PID 1, and with it every
                // process of the node.
                let mut cmd = tokio::process::Command::new("unshare");
                cmd.args(["--net", "--uts", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"])
                    .args(["--propagation", "private", "sh", "boot.sh"]);
                cmd
            }
        };
        cmd.current_dir(&dir)
            .env_clear()
            .envs(ENV_ALLOW.iter().filter_map(|k| std::env::var_os(k).map(|v| (*k, v))))
            .env("DDISCO_HOME", &dir)
            .env("DDISCO_NODE_ID", node_id)
            .env("DDISCO_CLUSTER_ID", &self.cluster_id)
            .env("DDISCO_NODE_ADDR", address)
            // Local nodes share this machine's host name; engines need one each.
            .env("DDISCO_HOSTNAME", node_id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let mut child = cmd.spawn()?;
        let pid = child.id().ok_or_else(|| ProviderError::Other("node exited at once".into()))?;
        std::fs::write(dir.join("pid"), pid.to_string())?;
        // Reap the node when it exits, so it does not linger as a zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        if let Some(net) = &self.machines
            && let Err(e) = net.plug(pid, &self.cluster_id, node_id).await
        {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(e);
        }
        Ok(format!("local-{pid}"))
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    /// A local node's host name is its node id (`DDISCO_HOSTNAME`).
    fn host_names(&self, node_id: &str, _address: &str, _instance_id: Option<&str>) -> Vec<String> {
        vec![node_id.to_string()]
    }

    fn layout(&self, node_id: &str) -> NodeLayout {
        if self.machines.is_some() {
            // A machine: engines manage its system as on EC2; its /etc,
            // /home, /root, /opt, /mnt are its own.
            return NodeLayout {
                root: "/".into(),
                system: true,
                home: "/root".into(),
                owner: None,
                venv: "/opt/ddisco/venv".into(),
                install_packages: self.install_packages,
                scratch: None,
            };
        }
        let dir = self.node_dir(node_id);
        NodeLayout {
            root: dir.clone(),
            system: false,
            home: dir.join("home"),
            owner: None,
            venv: dir.join("venv"),
            install_packages: self.install_packages,
            scratch: None,
        }
    }

    fn address_for(&self, seq: u64) -> String {
        if let Some(net) = &self.machines {
            return net.address(seq);
        }
        format!("127.{}.{}.{}", self.net, (seq / 250) % 256, seq % 250 + 2)
    }

    fn max_batch(&self) -> usize {
        1
    }

    async fn launch(&self, batch: LaunchBatch) -> Result<Vec<Launched>, ProviderError> {
        let _turn = self.node_ops.lock().await;
        let mut out = Vec::with_capacity(batch.nodes.len());
        for (i, node) in batch.nodes.iter().enumerate() {
            let address = batch.addresses.get(i).map(String::as_str).unwrap_or("");
            let instance_id = self.launch_one(node, address, &batch.userdata).await?;
            out.push(Launched {
                node_id: node.clone(),
                instance_id,
                instance_type: "local".into(),
                market: crate::model::Market::Spot,
                on_demand_why: None,
                placement: String::new(),
            });
        }
        Ok(out)
    }

    async fn list(&self) -> Result<Vec<Observed>, ProviderError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.nodes_dir)? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = std::fs::read_to_string(entry.path().join("pid")) else { continue };
            out.push(Observed {
                instance_id: format!("local-{}", pid.trim()),
                alive: self.live_pid(&id).is_some(),
                node_id: Some(id),
                batch: None,
                foreign: false, // its own state directory's nodes
            });
        }
        Ok(out)
    }

    async fn terminate(&self, targets: &[Target]) -> Result<(), ProviderError> {
        let _turn = self.node_ops.lock().await;
        // A target whose instance is not the one the node's folder holds now
        // (an old instance of a node id launched again): only that process
        // tree ends; the folder and the new instance are left alone.
        let mut ids: Vec<&String> = Vec::new();
        for t in targets {
            let Some(id) = t.node_id.as_ref() else { continue };
            let wanted = t.instance_id.as_deref().and_then(|i| i.strip_prefix("local-")?.parse::<i32>().ok());
            match (wanted, self.live_pid(id)) {
                (Some(old), Some(current)) if old != current => {
                    if is_ours(old, &self.cluster_id, id) {
                        let _ = killpg(Pid::from_raw(old), Signal::SIGKILL);
                    }
                }
                _ => ids.push(id),
            }
        }
        let mut pids = Vec::new();
        for id in &ids {
            if let Some(pid) = self.live_pid(id) {
                // SIGKILL also ends stopped (SIGSTOP) processes.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                pids.push((id, pid));
            }
        }
        // Wait (bounded) until the leaders are gone, so "terminated" means gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for (id, pid) in &pids {
            while is_ours(*pid, &self.cluster_id, id) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // A daemon a node started left its process group (a new session:
        // Disco's lighttpd): it still carries the node's environment.
        for pid in processes_of(&self.cluster_id, &ids) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for id in ids {
            let _ = std::fs::remove_file(self.node_dir(id).join("pid"));
            // A terminated instance's disk goes with it: the node's files
            // go (its venv, agent binary, machine file system: tens of MB a
            // node, gigabytes over a day of demos); its logs stay.
            remove_but_logs(&self.node_dir(id));
            // The card goes with the node's namespace; a node that died
            // while being plugged in may leave this host's end behind.
            if let Some(net) = &self.machines {
                net.unplug(&self.cluster_id, id);
            }
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<Vec<String>, ProviderError> {
        // After destroy no node is on the machines' bridge any more.
        if let Some(net) = &self.machines {
            net.remove()?;
            tracing::info!(bridge = %net.bridge, "local machines: bridge removed");
        }
        Ok(vec![])
    }
}

/// Every live process of these nodes of this cluster (by its environment,
/// which a process's children inherit whatever session or group they
/// start): one pass over /proc, whatever the number of nodes.
fn processes_of(cluster_id: &str, ids: &[&String]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| node_of(*pid, cluster_id).is_some_and(|node| ids.iter().any(|id| **id == node)))
        .collect()
}

/// Is `pid` a live (not zombie) process of node `id` of this cluster?
fn is_ours(pid: i32, cluster_id: &str, id: &str) -> bool {
    node_of(pid, cluster_id).is_some_and(|node| node == id)
}

/// The node of this cluster a live (not zombie) process `pid` belongs to,
/// by its environment.
fn node_of(pid: i32, cluster_id: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // State is the field after the parenthesised command name.
    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return None;
    }
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let want_cluster = format!("DDISCO_CLUSTER_ID={cluster_id}");
    let mut node = None;
    let mut cluster = false;
    for var in env.split(|b| *b == 0) {
        if let Some(id) = var.strip_prefix(b"DDISCO_NODE_ID=") {
            node = Some(String::from_utf8_lossy(id).into_owned());
        }
        cluster |= var == want_cluster.as_bytes();
    }
    node.filter(|_| cluster)
}

/// Removes what a terminated node left in `dir`, but its logs
/// (`console.log`, `steps/`, `services/`). Entries are removed, not
/// followed (`remove_dir_all` does not follow symlinks).
fn remove_but_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        if matches!(name.to_str(), Some("console.log" | "steps" | "services")) {
            continue;
        }
        let path = e.path();
        let _ = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}
