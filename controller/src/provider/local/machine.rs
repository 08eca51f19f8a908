//! Local nodes as machines (`local_machines = true`, root only).
//!
//! A plain local node is a process tree in a folder: enough for Dask, not
//! for an engine that logs into its nodes (Disco's master starts its slaves
//! over SSH, by host name, as the `disco` user). A machine node is what a
//! small VM would give, built from the kernel's namespaces:
//!
//! - its own **network** (a veth pair into this cluster's bridge, an address
//!   `10.X.a.b/16`; the controller listens on the bridge's `10.X.0.1`) and
//!   **no route out**: like a private subnet without a NAT, a node reaches
//!   the bridge (the controller, the other nodes) and nothing else, so a
//!   node that needed the internet to start fails here,
//! - its own **host name** (UTS namespace: the node id),
//! - its own **processes** (PID namespace: killing the node's `unshare`
//!   kills everything in it, SSH sessions included, as terminating an
//!   instance does),
//! - its own **files** where a machine keeps them: `/etc` and `/usr/local`
//!   are overlays of this host's (users, host keys, `/etc/hosts`, settings,
//!   a Python path written on the node stay on the node), `/home`, `/root`, `/opt`, `/mnt`, `/tmp` and
//!   `/run` are the node's own (under `<node>/fs/`, `/run` a tmpfs);
//!   `/usr` and the rest are this host's, read as installed,
//! - an **sshd** with a host key made at its first boot.
//!
//! The boot script ([`boot_script`]) is the machine's init: it waits for its
//! network card, mounts, names itself, starts sshd and runs the userdata.
//! The controller only creates the bridge ([`Network::ensure`]) and plugs
//! each node's card ([`Network::plug`]).

use super::super::ProviderError;
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// This cluster's bridge and its /16.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub bridge: String,
    /// Second octet: the cluster's nodes are `10.X.0.0/16`.
    pub octet: u8,
}

/// The system's PATH on a machine node (not the controller's: a pyenv shim
/// or a virtualenv of the user's must not decide which `python` Disco runs).
pub const MACHINE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a machine node sees its own folder (`DDISCO_HOME`): the host's
/// path may be under a directory the node mounts its own over.
pub const NODE_DIR_INSIDE: &str = "/run/ddisco";

impl Network {
    /// The bridge's name for a cluster (15 characters at most: IFNAMSIZ).
    pub fn bridge_name(cluster_id: &str) -> String {
        format!("ddisco{}", &cluster_id[..8.min(cluster_id.len())])
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 0, 1)
    }

    /// The address of the `seq`-th node: never the gateway, 250 a /24.
    pub fn address(&self, seq: u64) -> String {
        format!("10.{}.{}.{}", self.octet, (seq / 250) % 256, seq % 250 + 2)
    }

    /// Creates this cluster's bridge, or finds it (a restarted controller):
    /// its /16 is the first of `10.64.0.0/16`..`10.191.0.0/16`, starting at
    /// one picked from the cluster id, that no address or route of this
    /// host uses.
    pub fn ensure(cluster_id: &str) -> Result<Network, ProviderError> {
        check_machine_support()?;
        let bridge = Network::bridge_name(cluster_id);
        let addrs = ip(&["-4", "-o", "addr", "show"])?;
        if let Some(octet) = bridge_octet(&addrs, &bridge) {
            ip(&["link", "set", &bridge, "up"])?;
            return Ok(Network { bridge, octet });
        }
        let routes = ip(&["-4", "route", "show"])?;
        let start = Sha256::digest(cluster_id.as_bytes())[0];
        let octet = free_octet(&addrs, &routes, start).ok_or_else(|| ProviderError::Config {
            key: "local_machines".into(),
            message: "no free 10.X.0.0/16 (X in 64..191) on this host for the nodes' network".into(),
        })?;
        if !ip(&["-o", "link", "show"])?.lines().any(|l| link_name(l) == Some(bridge.as_str())) {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
        }
        let net = Network { bridge: bridge.clone(), octet };
        ip(&["addr", "add", &format!("{}/16", net.gateway()), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        tracing::info!(bridge = %bridge, gateway = %net.gateway(), "local machines: network ready");
        Ok(net)
    }

    /// Removes the bridge (after `destroy`: no node is left on it).
    pub fn remove(&self) -> Result<(), ProviderError> {
        let links = ip(&["-o", "link", "show"])?;
        if links.lines().any(|l| link_name(l) == Some(self.bridge.as_str())) {
            ip(&["link", "del", &self.bridge])?;
        }
        Ok(())
    }

    /// Plugs node `node_id`'s card into the bridge once its process `pid`
    /// (the node's `unshare`) is in a network namespace of its own: the
    /// node sees `eth0`; this host's end joins the bridge.
    pub async fn plug(&self, pid: u32, cluster_id: &str, node_id: &str) -> Result<(), ProviderError> {
        let mine = std::fs::read_link("/proc/self/ns/net")?;
        let theirs = format!("/proc/{pid}/ns/net");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::read_link(&theirs) {
                Ok(ns) if ns != mine => break,
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Ok(_) => {
                    return Err(ProviderError::Other(format!(
                        "node {node_id} (pid {pid}) did not enter a network namespace of its own within 10 s"
                    )));
                }
                Err(e) => {
                    return Err(ProviderError::Other(format!("node {node_id} (pid {pid}) exited: {e}")));
                }
            }
        }
        let host_end = veth_name(cluster_id, node_id);
        let pid = pid.to_string();
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &pid])?;
        ip(&["link", "set", &host_end, "master", &self.bridge, "up"])?;
        Ok(())
    }
}

impl Network {
    /// Removes this host's end of node `node_id`'s card, if still there.
    pub fn unplug(&self, cluster_id: &str, node_id: &str) {
        let name = veth_name(cluster_id, node_id);
        if std::path::Path::new("/sys/class/net").join(&name).exists() {
            let _ = ip(&["link", "del", &name]);
        }
    }
}

/// This host's end of a node's veth pair: `ddv` + 8 hex digits.
fn veth_name(cluster_id: &str, node_id: &str) -> String {
    let d = Sha256::digest(format!("{cluster_id}/{node_id}").as_bytes());
    format!("ddv{}", hex::encode(&d[..4]))
}

/// Machine nodes need root (namespaces, mounts, the bridge) and
/// util-linux's `unshare` and iproute2's `ip`.
fn check_machine_support() -> Result<(), ProviderError> {
    let refuse = |message: String| ProviderError::Config { key: "local_machines".into(), message };
    if !nix::unistd::geteuid().is_root() {
        return Err(refuse(
            "machine nodes need root (network, mount and PID namespaces, a bridge): \
             run serve as root or set local_machines = false"
                .into(),
        ));
    }
    for (tool, package) in [("unshare", "util-linux"), ("ip", "iproute2")] {
        if find_in_path(tool).is_none() {
            return Err(refuse(format!("machine nodes need `{tool}` (Debian package {package})")));
        }
    }
    Ok(())
}

fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    MACHINE_PATH.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> Result<String, ProviderError> {
    let out = std::process::Command::new(find_in_path("ip").unwrap_or_else(|| "ip".into()))
        .args(args)
        .output()
        .map_err(|e| ProviderError::Other(format!("cannot run ip: {e}")))?;
    if !out.status.success() {
        return Err(ProviderError::Other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `2: eth0: <...>` or `3: veth@if2: <...>` -> the link's name.
fn link_name(line: &str) -> Option<&str> {
    let name = line.split(':').nth(1)?.trim();
    Some(name.split('@').next().unwrap_or(name))
}

/// The second octet of `bridge`'s `10.X.0.1/16`, from `ip -4 -o addr show`.
fn bridge_octet(addrs: &str, bridge: &str) -> Option<u8> {
    addrs.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let name = f.nth(1)?;
        if name != bridge || f.next()? != "inet" {
            return None;
        }
        let ip: Ipv4Addr = f.next()?.split('/').next()?.parse().ok()?;
        let o = ip.octets();
        (o[0] == 10 && o[2] == 0 && o[3] == 1).then_some(o[1])
    })
}

/// The first X in 64..192 (from `start`, wrapping) such that no address
/// and no route of this host is in 10.X.0.0/16 (or covers it, short of
/// the default route).
fn free_octet(addrs: &str, routes: &str, start: u8) -> Option<u8> {
    let used = |x: u8| {
        let inside = |ip: Ipv4Addr, len: u8| {
            let o = ip.octets();
            // A prefix of 16 or longer inside 10.X/16, or a shorter one
            // (10.0.0.0/8, say) that covers it.
            o[0] == 10 && (len < 16 || o[1] == x) && len >= 8
        };
        let prefix = |s: &str| -> Option<(Ipv4Addr, u8)> {
            let (a, l) = s.split_once('/').unwrap_or((s, "32"));
            Some((a.parse().ok()?, l.parse().ok()?))
        };
        addrs.lines().any(|l| {
            let mut f = l.split_whitespace().skip(2);
            f.next() == Some("inet") && f.next().and_then(prefix).is_some_and(|(a, l)| inside(a, l.max(16)))
        }) || routes
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|dst| *dst != "default")
            .filter_map(prefix)
            .any(|(a, l)| inside(a, l))
    };
    (0..128u16).map(|i| 64 + ((start as u16 + i) % 128) as u8).find(|x| !used(*x))
}

/// The machine's init: run by `unshare` as PID 1 of the node's namespaces,
/// in the node's folder on this host. Everything it needs comes in the
/// environment (`DDISCO_NODE_ADDR`, `DDISCO_HOSTNAME`).
pub fn boot_script() -> String {
    format!(
        r#"#!/bin/sh
# A local machine node's boot (ddisco local_machines): the node's init.
set -eu
export PATH='{path}'
# The node's own /run, and its folder where the node sees it: its path on
# the host may be under a directory mounted over below (the working
# directory still reaches it).
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p '{inside}' /run/sshd
mount --bind . '{inside}'
cd '{inside}'
export DDISCO_HOME='{inside}'
mkdir -p fs/etc fs/.etc-work fs/usr-local fs/.usr-local-work fs/home fs/root fs/opt fs/mnt fs/tmp
chmod 0700 fs/root; chmod 1777 fs/tmp
mount -t overlay overlay -o "lowerdir=/etc,upperdir={inside}/fs/etc,workdir={inside}/fs/.etc-work" /etc
mount -t overlay overlay -o "lowerdir=/usr/local,upperdir={inside}/fs/usr-local,workdir={inside}/fs/.usr-local-work" /usr/local
for d in home root opt mnt tmp; do mount --bind "fs/$d" "/$d"; done
export HOME=/root TMPDIR=/tmp
# The network card: the controller plugs it in once this namespace exists.
i=0
until ip link show eth0 >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -gt 200 ]; then echo "boot: no network card after 20 s" >&2; exit 1; fi
  sleep 0.1
done
ip link set lo up
ip addr add "$DDISCO_NODE_ADDR/16" dev eth0
ip link set eth0 up
# No default route: the bridge's /16 (the controller, the other nodes) is
# all a node reaches, as in a private subnet without a NAT.
hostname "$DDISCO_HOSTNAME"
echo "$DDISCO_HOSTNAME" > /etc/hostname
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s %s\n' "$DDISCO_NODE_ADDR" "$DDISCO_HOSTNAME" > /etc/hosts
# A host key of its own, made at first boot (as cloud-init does).
if [ -x /usr/sbin/sshd ]; then
  rm -f /etc/ssh/ssh_host_*
  ssh-keygen -q -t ed25519 -N '' -C "root@$DDISCO_HOSTNAME" -f /etc/ssh/ssh_host_ed25519_key
  /usr/sbin/sshd -D -e -o HostKey=/etc/ssh/ssh_host_ed25519_key -o PasswordAuthentication=no -o PidFile=/run/sshd.pid &
else
  echo "boot: no /usr/sbin/sshd (Debian package openssh-server): nothing can log into this node" >&2
fi
sh userdata.sh &
# PID 1 of the node: reap whatever is orphaned until the userdata ends.
node=$!
while kill -0 "$node" 2>/dev/null; do wait "$node" || true; done
"#,
        path = MACHINE_PATH,
        inside = NODE_DIR_INSIDE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRS: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 10.64.3.7/24 brd 10.64.3.255 scope global eth0\\       valid_lft forever
7: ddisco1a2b3c4d    inet 10.77.0.1/16 scope global ddisco1a2b3c4d\\       valid_lft forever";

    #[test]
    fn a_restarted_controller_finds_its_bridge() {
        assert_eq!(bridge_octet(ADDRS, "ddisco1a2b3c4d"), Some(77));
        assert_eq!(bridge_octet(ADDRS, "ddiscoffffffff"), None);
        assert!(Network::bridge_name("1a2b3c4d5e6f7a8b").len() <= 15);
    }

    #[test]
    fn the_network_avoids_what_the_host_uses() {
        // 10.64/16 has an address; 10.65/16 a route; 10.66 is free.
        let routes = "default via 10.64.3.1 dev eth0\n10.65.0.0/16 via 10.64.3.9 dev eth0\n";
        assert_eq!(free_octet(ADDRS, routes, 0), Some(66));
        // Starting past the end wraps around.
        assert_eq!(free_octet(ADDRS, routes, 127), Some(191));
        // A route covering all of 10/8 leaves nothing.
        assert_eq!(free_octet("", "10.0.0.0/8 dev wg0\n", 5), None);
        // 172.16/12 or a default route do not matter.
        assert_eq!(
            free_octet("", "default via 172.17.0.1 dev eth0\n172.16.0.0/12 dev docker0\n", 3),
            Some(67)
        );
    }

    #[test]
    fn addresses_are_unique_and_never_the_gateway() {
        let net = Network { bridge: "b".into(), octet: 70 };
        let all: std::collections::HashSet<String> = (0..5000).map(|s| net.address(s)).collect();
        assert_eq!(all.len(), 5000);
        assert!(!all.contains(&net.gateway().to_string()));
        assert_eq!(net.address(0), "10.70.0.2");
        assert_eq!(net.address(250), "10.70.1.2");
    }

    #[test]
    fn the_boot_script_is_valid_sh() {
        let out = std::process::Command::new("sh").arg("-n").arg("-c").arg(boot_script()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
