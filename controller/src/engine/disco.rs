//! The Disco engine, after Disco 0.5's documented contract
//! (shared/docs/disco-facts.md):
//!
//! - install from a configured source (git URL + ref, or a tarball URL):
//!   `make install` on the master, `make install-node` on slaves; Erlang and
//!   build packages; the `disco` user;
//! - one Erlang cookie per cluster, from the controller, delivered over the
//!   mutual-TLS session as a managed file (mode 0400) -- never in userdata;
//! - SSH trust without disabling host key checking: the master's disco
//!   public key goes into every slave's authorized_keys and every slave's
//!   host key into the master's known_hosts, collected and relayed by the
//!   controller;
//! - short host names resolvable cluster-wide: a managed block in every
//!   node's /etc/hosts;
//! - `/etc/disco/settings.py` as the original set it, DDFS replicas no
//!   larger than the number of nodes;
//! - Disco on the master, supervised by the agent;
//! - the config table `[["host","workers"], ...]` (strings) POSTed to the
//!   master's `save_config_table` by the master's agent on every membership
//!   or worker-count change, the master included; a leaving slave is
//!   blacklisted first so its tasks drain.
//!
//! With the local provider (`layout.system == false`) nothing touches the
//! host system: files go under the node's own root, and no user, package or
//! build step runs.

use super::{Directive, DirectiveKind, Engine, Member, Probed, master, under};
use crate::model::Role;
use crate::plan::{NodeLayout, Step, StepKind};
use crate::text::prefix;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub struct Disco {
    /// `git+URL@REF`, or an `http(s)://...tar.gz` URL; empty: preinstalled.
    pub source: String,
    pub port: u16,
    pub root: String,
    pub gc_after: u32,
    /// The cluster's Erlang cookie (a secret: never logged, never userdata).
    pub cookie: String,
    /// `DISCO_HOME` of a relocatable build (`scripts/build-disco`); `None`:
    /// installed by `make install`.
    pub home_dir: Option<String>,
    /// The login user management keys go to (`ssh_user`): the one the
    /// status's SSH tunnel line names.
    pub login_user: String,
    /// The build every node installs, if any.
    pub bundle: Option<Bundle>,
}

/// Where `make install` puts Disco's Erlang code (its `DISCO_HOME`).
const INSTALLED_HOME: &str = "/usr/lib/disco";

/// Ends the part of `settings.py` whose change restarts the master; what
/// follows (the replica counts) reaches a running master by `save_settings`.
const REPLICAS_MARK: &str = "# DDFS's replica counts: changed at run time (save_settings), no restart.\n";

/// The Disco build the controller serves (`disco_bundle`): built once, by
/// whoever runs the controller, and installed on every node from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub url: String,
    pub sha256: String,
}

impl Disco {
    /// What every node gets: the cluster's host names, Disco's settings,
    /// the Erlang cookie.
    fn common_files(
        &self,
        members: &[Member],
        layout: &NodeLayout,
        settings: String,
        owner: &str,
    ) -> Vec<Directive> {
        // Short host names, resolvable cluster-wide.
        let mut hosts: Vec<String> = members
            .iter()
            .filter(|m| !m.address.is_empty() && !m.hostname.is_empty())
            .map(|m| format!("{} {}", m.address, m.hostname))
            .collect();
        hosts.sort();
        vec![
            Disco::file("hosts", under(layout, "etc/hosts"), hosts.join("\n") + "\n", 0o644, "", "ddisco"),
            Disco::file("disco_settings", under(layout, "etc/disco/settings.py"), settings, 0o644, "", ""),
            Disco::file(
                "erlang_cookie",
                format!("{}/.erlang.cookie", Disco::home(layout)),
                self.cookie.clone(),
                0o400,
                owner,
                "",
            ),
        ]
    }

    /// The slaves' SSH host keys, for the master's `known_hosts`.
    fn known_hosts(members: &[Member]) -> String {
        let mut known: Vec<String> = members
            .iter()
            .filter(|m| !m.is_master())
            .filter_map(|m| {
                let key = m.attributes.get("ssh_host_key")?;
                Some(format!("{},{} {}", m.hostname, m.address, key.trim()))
            })
            .collect();
        known.sort();
        known.join("\n") + "\n"
    }

    /// The master's Disco (`disco nodaemon`), restarted when its settings
    /// change (their digest is in its environment).
    fn master_service(&self, layout: &NodeLayout, settings_sha: &str) -> Directive {
        // Disco reads DISCO_SETTINGS_FILE (its launcher overwrites
        // DISCO_SETTINGS with the list of names it exports).
        let mut env = BTreeMap::from([
            ("DISCO_SETTINGS_FILE".into(), under(layout, "etc/disco/settings.py")),
            ("DDISCO_SETTINGS_SHA256".into(), settings_sha.to_string()),
        ]);
        let mut argv: Vec<String> = match &self.disco_home(layout) {
            Some(h) => {
                env.insert("PYTHONPATH".into(), format!("{h}/lib"));
                vec!["python3".into(), format!("{h}/bin/disco"), "nodaemon".into()]
            }
            None => vec!["disco".into(), "nodaemon".into()],
        };
        if layout.system {
            argv.splice(0..0, ["runuser", "-u", "disco", "--"].map(String::from));
            // The system's programs, not whatever the agent's PATH holds (a
            // pyenv shim broke `/usr/bin/env python`).
            env.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        Directive {
            name: "disco".into(),
            // As `disco`, in its home: the agent's folder is root's alone,
            // and Disco's launcher lists its working directory.
            kind: DirectiveKind::Service {
                argv,
                env,
                workdir: if layout.system { Disco::home(layout) } else { String::new() },
                grace_ms: 10_000,
            },
        }
    }

    /// What the master's agent posts to and probes at the master: the
    /// leaving slaves' blacklists, DDFS's GC while they leave, the job
    /// list and node info, the config table.
    fn master_calls(&self, members: &[Member], settings_sha: &str) -> Vec<Directive> {
        let mut out = Vec::new();
        let base = format!("http://127.0.0.1:{}/disco/ctrl", self.port);
        // A restarted master forgets what was posted to it (blacklist):
        // the posts carry the settings digest too, so the agent posts
        // them again to the new master (Disco ignores the query).
        let again = format!("?settings={settings_sha}");
        // Leaving slaves are blacklisted first, so their tasks drain, and
        // blacklisted for DDFS, so its GC re-replicates their data onto
        // the others during the drain.
        let mut leaving: Vec<&Member> =
            members.iter().filter(|m| m.leaving && !m.is_master() && m.ready).collect();
        leaving.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        if !leaving.is_empty() {
            // While a slave leaves, DDFS's GC runs back to back (it moves
            // the blacklisted nodes' data away), and the agent reports
            // which of them hold nothing only they have
            // (`safe_gc_blacklist`): those go at once (`probed`).
            let ddfs = format!("http://127.0.0.1:{}/ddfs/ctrl", self.port);
            for name in ["gc_start", "safe_gc_blacklist"] {
                out.push(Directive {
                    name: name.into(),
                    kind: DirectiveKind::Probe { url: format!("{ddfs}/{name}") },
                });
            }
        }
        for m in leaving {
            for op in ["blacklist", "gc_blacklist"] {
                out.push(Directive {
                    name: format!("{op} {}", m.hostname),
                    kind: DirectiveKind::Post {
                        url: format!("{base}/{op}{again}"),
                        body: serde_json::to_string(&m.hostname).expect("serializes"),
                        content_type: "application/json".into(),
                    },
                });
            }
        }
        // Whether a job runs (autostop), and how busy the nodes are
        // (adaptive size).
        for name in ["joblist", "nodeinfo"] {
            out.push(Directive {
                name: name.into(),
                kind: DirectiveKind::Probe { url: format!("{base}/{name}") },
            });
        }
        // DDFS's replicas follow the planned size without a restart (the
        // master keeps its running jobs).
        let replicas = Disco::replicas(members).to_string();
        out.push(Directive {
            name: "ddfs_replicas".into(),
            kind: DirectiveKind::Post {
                url: format!("{base}/save_settings{again}"),
                body: serde_json::json!({"DDFS_BLOB_REPLICAS": replicas, "DDFS_TAG_REPLICAS": replicas})
                    .to_string(),
                content_type: "application/json".into(),
            },
        });
        out.push(Directive {
            name: "config_table".into(),
            kind: DirectiveKind::Post {
                url: format!("{base}/save_config_table{again}"),
                body: Disco::config_table(members),
                content_type: "application/json".into(),
            },
        });
        out
    }

    pub fn from_config(cfg: &crate::config::Config, cookie: String, bundle: Option<Bundle>) -> Disco {
        Disco {
            source: cfg.disco.source.clone(),
            port: cfg.disco.port,
            root: cfg.disco.root.clone(),
            gc_after: cfg.disco.gc_after,
            cookie,
            home_dir: (!cfg.disco.home.is_empty()).then(|| cfg.disco.home.clone()),
            login_user: cfg.ssh_user.clone(),
            bundle,
        }
    }

    fn home(layout: &NodeLayout) -> String {
        under(layout, "home/disco")
    }

    /// `DISCO_HOME` on this node, when Disco runs from a relocatable build:
    /// `disco_home`, or with a bundle `/opt/disco` (under a local node's
    /// root).
    fn disco_home(&self, layout: &NodeLayout) -> Option<String> {
        match (&self.home_dir, &self.bundle) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(_)) => Some(under(layout, "opt/disco")),
            (None, None) => None,
        }
    }

    /// Disco's `DISCO_ROOT` on this node (under the node's own root for
    /// the local provider).
    fn root(&self, layout: &NodeLayout) -> String {
        if layout.system { self.root.clone() } else { under(layout, self.root.trim_start_matches('/')) }
    }

    /// A complete `settings.py` (Disco execs it as Python): every setting
    /// Disco cannot guess, `DISCO_HOME` included.
    fn settings(&self, members: &[Member], me: &Member, layout: &NodeLayout) -> String {
        let replicas = Disco::replicas(members);
        let master_host = master(members).map(|m| m.hostname.as_str()).unwrap_or("");
        let proxy = if me.is_master() { "on" } else { "" };
        format!(
            "# Managed by ddisco: rewritten on every membership change.\n\
             DISCO_HOME = \"{home}\"\n\
             DISCO_MASTER_HOST = \"{master_host}\"\n\
             DISCO_PORT = \"{port}\"\n\
             DISCO_ROOT = \"{root}\"\n\
             DISCO_DATA = \"{root}/data\"\n\
             DISCO_LOG_DIR = \"{root}/log\"\n\
             DISCO_GC_AFTER = \"{gc}\"\n\
             DISCO_PROXY_ENABLED = \"{proxy}\"\n\
             # Erlang without a shell: the agent supervises it with stdin closed.\n\
             SYSTEMD_ENABLED = True\n\
             # A tag operation needs one replica: on spot, nodes die, and\n\
             # with every replica required one lost slave blocks every tag.\n\
             DDFS_TAG_MIN_REPLICAS = \"1\"\n\
             # DDFS's GC may start at once (it is started while slaves leave).\n\
             DDFS_GC_INITIAL_WAIT = \"0\"\n\
             {REPLICAS_MARK}\
             DDFS_TAG_REPLICAS = \"{replicas}\"\n\
             DDFS_BLOB_REPLICAS = \"{replicas}\"\n",
            home = self.disco_home(layout).as_deref().unwrap_or(INSTALLED_HOME),
            port = self.port,
            root = self.root(layout),
            gc = self.gc_after,
        )
    }

    /// DDFS's replica count: the planned size (every node not leaving,
    /// ready or still coming; the master reads the settings at start,
    /// before any slave is ready, and counting ready nodes would leave them
    /// at 1), at most 3. A change later reaches the running master through
    /// `save_settings` (patch disco-0012), not a restart.
    fn replicas(members: &[Member]) -> usize {
        members.iter().filter(|m| !m.leaving).count().clamp(1, 3)
    }

    /// The part of the settings a running master cannot take without a
    /// restart: everything before the replica counts.
    fn restart_part(settings: &str) -> &str {
        settings.split(REPLICAS_MARK).next().unwrap_or(settings)
    }

    /// The config table: the master and every ready slave (leaving ones too:
    /// they are blacklisted, then dropped once gone). Values are strings.
    pub fn config_table(members: &[Member]) -> String {
        let mut rows: Vec<(String, String)> = members
            .iter()
            .filter(|m| m.ready && !m.hostname.is_empty())
            .map(|m| (m.hostname.clone(), m.workers.max(1).to_string()))
            .collect();
        // Master first, then by host name: a stable body for change detection.
        rows.sort_by_key(|(h, _)| (!members.iter().any(|m| m.is_master() && &m.hostname == h), h.clone()));
        serde_json::to_string(&rows.iter().map(|(h, w)| [h, w]).collect::<Vec<_>>()).expect("serializes")
    }

    fn file(name: &str, path: String, content: String, mode: u32, owner: &str, marker: &str) -> Directive {
        Directive {
            name: name.into(),
            kind: DirectiveKind::File { path, content, mode, owner: owner.into(), marker: marker.into() },
        }
    }
}

impl Engine for Disco {
    fn name(&self) -> &'static str {
        "disco"
    }

    /// Not `disco_ssh_key` (each master its own key), the collects, nor
    /// `disco_dirs` (the data folder is on scratch: each node's own).
    fn image_steps(&self) -> &'static [&'static str] {
        &["disco_user", "disco_install", "disco_bundle", "disco_python"]
    }

    fn steps(&self, role: Role, _workers: u32, layout: &NodeLayout) -> Vec<Step> {
        let mut steps = Vec::new();
        let home = Disco::home(layout);
        if layout.system {
            steps.push(Step {
                name: "disco_packages".into(),
                kind: StepKind::SystemPackages {
                    packages: [
                        "erlang-nox",
                        "erlang-dev",
                        "make",
                        "git",
                        "curl",
                        "openssh-server",
                        "lighttpd",
                        "python3",
                        // Disco's classic worker is run by its
                        // `#!/usr/bin/env python` line (Ubuntu 24.04 and
                        // Debian 12 have no `python` otherwise).
                        "python-is-python3",
                        // Disco's external tasks (`disco.util.external`, the
                        // C interface of `ext/disco.c`) are built static
                        // against Judy, on the node that submits the job.
                        "gcc",
                        "libc6-dev",
                        "libjudy-dev",
                    ]
                    .map(String::from)
                    .to_vec(),
                    install: layout.install_packages,
                },
            });
            // The user, and its home even when the user came with the
            // image (SSH reads the master's key from it).
            steps.push(shell(
                "disco_user",
                "id disco >/dev/null 2>&1 || useradd --create-home --shell /bin/bash disco; \
                 H=\"$(getent passwd disco | cut -d: -f6)\"; \
                 [ -d \"$H\" ] || { mkdir -p \"$H\" && chown disco:disco \"$H\"; }",
            ));
            // A bundle (built once, by the controller's side) replaces
            // building from source on every node.
            if !self.source.is_empty() && self.bundle.is_none() {
                let target = if role == Role::Master { "install" } else { "install-node" };
                steps.push(shell("disco_install", &install_script(&self.source, target)));
            }
        }
        if let (Some(b), Some(h)) = (&self.bundle, self.disco_home(layout)) {
            steps.push(shell("disco_bundle", &bundle_script(b, &h)));
            if layout.system {
                // What `make install-node` did with setup.py (distutils is
                // gone from Python 3.12): the `disco` package importable by
                // the system's Python, for the workers Disco starts.
                steps.push(shell(
                    "disco_python",
                    &format!(
                        "set -e; umask 022; SP=\"$(python3 -c 'import site; print(site.getsitepackages()[0])')\"; \
                         mkdir -p \"$SP\" && echo '{h}/lib' > \"$SP/ddisco-disco.pth\" && \
                         cd / && python3 -c 'import disco.core, sys; print(\"disco\", disco.__file__, \"for\", sys.version.split()[0])'"
                    ),
                ));
            }
        }
        if layout.system {
            steps.push(shell(
                "disco_dirs",
                &format!("mkdir -p {r}/data {r}/log && chown -R disco:disco {r}", r = self.root),
            ));
        }
        if role == Role::Master {
            // The key is the disco user's, made by that user: its home is
            // writable by Disco's jobs, and root would follow a symlink one
            // of them put there.
            let make = format!(
                "umask 077; H='{home}'; mkdir -p \"$H/.ssh\" && chmod 700 \"$H/.ssh\" && \
                 {{ [ -f \"$H/.ssh/id_ed25519\" ] || ssh-keygen -q -t ed25519 -N '' -C disco@master -f \"$H/.ssh/id_ed25519\"; }}"
            );
            let script = if layout.system {
                format!("runuser -u disco -- sh -c '{}'", make.replace('\'', "'\\''"))
            } else {
                make
            };
            steps.push(shell("disco_ssh_key", &script));
            steps.push(Step {
                name: "disco_collect_key".into(),
                kind: StepKind::Collect {
                    attribute: "disco_pubkey".into(),
                    path: format!("{home}/.ssh/id_ed25519.pub"),
                },
            });
        } else if layout.system {
            steps.push(Step {
                name: "disco_collect_host_key".into(),
                kind: StepKind::Collect {
                    attribute: "ssh_host_key".into(),
                    path: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
                },
            });
        }
        steps
    }

    fn directives(&self, me: &Member, members: &[Member], layout: &NodeLayout) -> Vec<Directive> {
        let home = Disco::home(layout);
        let owner = if layout.system { "disco" } else { "" };
        let settings = self.settings(members, me, layout);
        // Disco reads its settings once, at start: the master's service
        // carries their digest, so a change restarts it; the replica counts
        // are left out of it (they are posted to the running master).
        let settings_sha = hex::encode(&Sha256::digest(Disco::restart_part(&settings).as_bytes())[..8]);
        let mut out = self.common_files(members, layout, settings, owner);
        if me.is_master() {
            out.push(Disco::file(
                "known_hosts",
                format!("{home}/.ssh/known_hosts"),
                Disco::known_hosts(members),
                0o644,
                owner,
                "ddisco",
            ));
            out.push(self.master_service(layout, &settings_sha));
            out.extend(self.master_calls(members, &settings_sha));
        } else if let Some(m) = members.iter().find(|m| m.is_master())
            && let Some(key) = m.attributes.get("disco_pubkey")
        {
            out.push(Disco::file(
                "authorized_keys",
                format!("{home}/.ssh/authorized_keys"),
                key.trim().to_string() + "\n",
                0o600,
                owner,
                "ddisco-master",
            ));
        }
        out
    }

    fn probed(&self, name: &str, body: &str) -> Result<Probed, String> {
        match name {
            "gc_start" => Ok(Probed::default()),
            "safe_gc_blacklist" => {
                let hosts: Vec<String> = serde_json::from_str(body)
                    .map_err(|e| format!("safe_gc_blacklist: not a JSON list of host names: {e}"))?;
                if let Some(bad) = hosts.iter().find(|h| !valid_host(h)) {
                    return Err(format!("safe_gc_blacklist: {:?} is not a host name", prefix(bad, 64)));
                }
                Ok(Probed { safe_to_remove: Some(hosts), ..Default::default() })
            }
            // [[priority, status, name], ...]: busy while a job is active.
            "joblist" => {
                let jobs: Vec<(serde_json::Value, String, serde_json::Value)> =
                    serde_json::from_str(body).map_err(|e| format!("joblist: not Disco's job list: {e}"))?;
                Ok(Probed {
                    busy: Some(jobs.iter().any(|(_, status, _)| status == "active")),
                    ..Default::default()
                })
            }
            // {host: {"max_workers": n, "tasks": [job, ...], "connected": b,
            // "blacklisted": b, ...}}: the adaptive target, in workers.
            "nodeinfo" => {
                let nodes: BTreeMap<String, serde_json::Value> = serde_json::from_str(body)
                    .map_err(|e| format!("nodeinfo: not Disco's node info: {e}"))?;
                let mut slots = 0u64;
                let mut running = 0u64;
                let mut widest = 1u64;
                for info in nodes.values() {
                    let usable = info["connected"] == true && info["blacklisted"] != true;
                    let max = info["max_workers"].as_u64().unwrap_or(0);
                    if usable {
                        slots = slots.saturating_add(max);
                        widest = widest.max(max);
                    }
                    running = running.saturating_add(info["tasks"].as_array().map_or(0, |t| t.len() as u64));
                }
                Ok(Probed {
                    target_workers: Some(disco_target(running, slots, widest)),
                    ..Default::default()
                })
            }
            other => Err(format!("probe {:?} is not one the disco engine asks for", prefix(other, 64))),
        }
    }

    fn endpoints(&self, members: &[Member]) -> BTreeMap<String, String> {
        let mut e = BTreeMap::new();
        if let Some(m) = master(members) {
            e.insert("master".into(), format!("http://{}:{}", m.address, self.port));
            e.insert("master_host".into(), m.hostname.clone());
            e.insert("proxy".into(), format!("http://{}:8999", m.address));
        }
        e
    }

    fn lines(&self, members: &[Member]) -> Vec<String> {
        match master(members) {
            None => vec!["Disco: waiting for a ready master".into()],
            Some(m) => vec![
                format!("Disco master: {} ({}), web UI on port {}", m.hostname, m.address, self.port),
                // mgmt_key goes to the login user, not to `disco`.
                format!("  ssh {}@{} -L 8090:localhost:8999", self.login_user, m.address),
                "  export DISCO_PROXY=http://localhost:8090".into(),
            ],
        }
    }
}

/// Disco's master lists running tasks, not queued ones: when every slot
/// of the usable nodes runs a task, the backlog asks for one node more
/// (`widest` slots); otherwise for the slots in use. The adaptive size then
/// grows a node at a time while the cluster stays saturated, and shrinks
/// (after its cooldown) to what runs.
fn disco_target(running: u64, slots: u64, widest: u64) -> u32 {
    let t = if slots > 0 && running >= slots { slots.saturating_add(widest) } else { running };
    t.min(u64::from(u32::MAX)) as u32
}

/// A host name as Disco reports them (letters, digits, `-`, `.`).
fn valid_host(h: &str) -> bool {
    !h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn shell(name: &str, script: &str) -> Step {
    Step { name: name.into(), kind: StepKind::Shell { script: script.into(), env: BTreeMap::new() } }
}

/// Installs the controller's Disco build into `home`, unless the same
/// build (by digest) is there already: fetched over HTTPS (the cluster CA,
/// `ca.pem` in the agent's folder, where steps run), checked against its
/// SHA-256, unpacked beside `home`, then moved into place.
fn bundle_script(b: &Bundle, home: &str) -> String {
    format!(
        r#"set -eu
H='{home}'; want='{sha}'; url='{url}'
if [ "$(cat "$H/.ddisco-bundle" 2>/dev/null)" = "$want" ]; then echo "Disco $want already in $H"; exit 0; fi
t="$(mktemp -d)"; trap 'rm -rf "$t"' EXIT
if command -v curl >/dev/null 2>&1; then
  curl -fsS --retry 3 --cacert ca.pem -o "$t/disco.tar.gz" "$url"
else
  wget -q --ca-certificate=ca.pem -O "$t/disco.tar.gz" "$url"
fi
if ! echo "$want  $t/disco.tar.gz" | sha256sum -c - >/dev/null 2>&1; then
  echo "the Disco build from $url does not have SHA-256 $want: refusing it" >&2; exit 1
fi
mkdir -p "$t/x" "$(dirname "$H")"
tar xzf "$t/disco.tar.gz" -C "$t/x" --no-same-owner
rm -rf "$H"; mv "$t/x/disco" "$H"
echo "$want" > "$H/.ddisco-bundle"
echo "Disco $want installed in $H"
"#,
        sha = b.sha256,
        url = b.url,
    )
}

/// Fetch and build Disco from `source`, once per source.
fn install_script(source: &str, target: &str) -> String {
    let fetch = if let Some(git) = source.strip_prefix("git+") {
        let (url, reference) = git.rsplit_once('@').unwrap_or((git, "master"));
        format!("git clone --depth 1 --branch '{reference}' '{url}' \"$S\"")
    } else {
        format!("mkdir -p \"$S\" && curl -fsSL '{source}' | tar xz -C \"$S\" --strip-components=1")
    };
    format!(
        "set -e; S=/opt/disco-src; M=\"$S/.ddisco-{target}\"; \
         if [ ! -f \"$M\" ]; then rm -rf \"$S\"; {fetch}; make -C \"$S\" {target}; touch \"$M\"; fi"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(system: bool) -> NodeLayout {
        NodeLayout {
            root: if system { "/".into() } else { "/n".into() },
            home: "/home/ubuntu".into(),
            owner: None,
            venv: "/opt/ddisco/venv".into(),
            install_packages: true,
            system,
            scratch: None,
        }
    }

    fn disco() -> Disco {
        Disco {
            source: "git+https://github.com/discoproject/disco.git@0.5.4".into(),
            port: 8989,
            root: "/mnt/disco".into(),
            gc_after: 6400,
            cookie: "COOKIE".into(),
            home_dir: None,
            login_user: "ubuntu".into(),
            bundle: None,
        }
    }

    fn m(id: &str, role: Role, host: &str, workers: u32) -> Member {
        Member {
            id: id.into(),
            role: Some(role),
            address: format!("10.0.0.{}", id.len()),
            hostname: host.into(),
            workers,
            ready: true,
            ..Default::default()
        }
    }

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.name.as_str()).collect()
    }

    /// Issue 26, item 3: the master's key is made by the disco user (its
    /// home is writable by jobs: root would follow their symlinks), and the
    /// script survives the quoting: run without the user switch in a
    /// scratch home, it makes the key once.
    #[test]
    fn the_masters_key_is_made_by_the_disco_user() {
        let steps = disco().steps(Role::Master, 2, &layout(true));
        let StepKind::Shell { script, .. } = &steps.iter().find(|s| s.name == "disco_ssh_key").unwrap().kind
        else {
            panic!("not a shell step")
        };
        let inner = script.strip_prefix("runuser -u disco -- ").expect("run as disco");
        let home = tempfile::tempdir().unwrap();
        let here = inner.replace(&Disco::home(&layout(true)), &home.path().display().to_string());
        if std::process::Command::new("ssh-keygen").arg("-?").output().is_err() {
            panic!("ssh-keygen is needed (openssh-client)");
        }
        for _ in 0..2 {
            let out = std::process::Command::new("sh").args(["-c", &here]).output().unwrap();
            assert!(out.status.success(), "{here}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(home.path().join(".ssh/id_ed25519.pub").exists());
    }

    #[test]
    fn plans_per_role() {
        let master = disco().steps(Role::Master, 4, &layout(true));
        assert_eq!(
            names(&master),
            [
                "disco_packages",
                "disco_user",
                "disco_install",
                "disco_dirs",
                "disco_ssh_key",
                "disco_collect_key"
            ]
        );
        match &master[2].kind {
            StepKind::Shell { script, .. } => {
                assert!(script.contains("git clone --depth 1 --branch '0.5.4'"), "{script}");
                assert!(script.contains("make -C \"$S\" install;"), "{script}");
            }
            other => panic!("{other:?}"),
        }
        let slave = disco().steps(Role::Slave, 4, &layout(true));
        assert_eq!(
            names(&slave),
            ["disco_packages", "disco_user", "disco_install", "disco_dirs", "disco_collect_host_key"]
        );
        match &slave[2].kind {
            StepKind::Shell { script, .. } => {
                assert!(script.contains("make -C \"$S\" install-node"), "{script}")
            }
            other => panic!("{other:?}"),
        }
        // A bundle (built once) replaces building on every node, and the
        // packages give the worker its `python`.
        let b = Bundle { url: "https://10.0.0.1:7444/disco/disco.tar.gz".into(), sha256: "ab".into() };
        let with_bundle = Disco { bundle: Some(b), ..disco() };
        let steps = with_bundle.steps(Role::Slave, 1, &layout(true));
        assert_eq!(
            names(&steps),
            [
                "disco_packages",
                "disco_user",
                "disco_bundle",
                "disco_python",
                "disco_dirs",
                "disco_collect_host_key"
            ]
        );
        match &steps[0].kind {
            StepKind::SystemPackages { packages, .. } => {
                assert!(packages.iter().any(|p| p == "python-is-python3"), "{packages:?}")
            }
            other => panic!("{other:?}"),
        }
        // Tarball sources.
        let d = Disco { source: "https://example.org/disco-0.5.4.tar.gz".into(), ..disco() };
        match &d.steps(Role::Slave, 1, &layout(true))[2].kind {
            StepKind::Shell { script, .. } => assert!(
                script.contains("curl -fsSL 'https://example.org/disco-0.5.4.tar.gz' | tar xz"),
                "{script}"
            ),
            other => panic!("{other:?}"),
        }
        // Local provider: nothing touches the host system.
        let local = disco().steps(Role::Master, 1, &layout(false));
        assert_eq!(names(&local), ["disco_ssh_key", "disco_collect_key"]);
        assert!(disco().steps(Role::Slave, 1, &layout(false)).is_empty());
    }

    #[test]
    fn config_table_has_string_values_master_first() {
        let members = [m("s2", Role::Slave, "ip-10-0-0-2", 2), m("master", Role::Master, "ip-10-0-0-1", 4)];
        assert_eq!(Disco::config_table(&members), r#"[["ip-10-0-0-1","4"],["ip-10-0-0-2","2"]]"#);
    }

    #[test]
    fn master_blacklists_leaving_slaves_and_posts_the_table() {
        let mut leaving = m("s3", Role::Slave, "ip-3", 1);
        leaving.leaving = true;
        let master = m("master", Role::Master, "ip-1", 4);
        let members = [master.clone(), m("s2", Role::Slave, "ip-2", 2), leaving];
        let d = disco().directives(&master, &members, &layout(true));
        let posts: Vec<(&str, &str)> = d
            .iter()
            .filter_map(|d| match &d.kind {
                // The query is the settings digest (re-posts after a restart).
                DirectiveKind::Post { url, body, .. } => {
                    Some((url.split('?').next().unwrap(), body.as_str()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            posts,
            [
                ("http://127.0.0.1:8989/disco/ctrl/blacklist", "\"ip-3\""),
                ("http://127.0.0.1:8989/disco/ctrl/gc_blacklist", "\"ip-3\""),
                // The leaving slave does not count: 2 planned nodes.
                (
                    "http://127.0.0.1:8989/disco/ctrl/save_settings",
                    r#"{"DDFS_BLOB_REPLICAS":"2","DDFS_TAG_REPLICAS":"2"}"#
                ),
                (
                    "http://127.0.0.1:8989/disco/ctrl/save_config_table",
                    r#"[["ip-1","4"],["ip-2","2"],["ip-3","1"]]"#
                ),
            ]
        );
        let service = d.iter().find(|d| d.name == "disco").unwrap();
        assert!(
            matches!(&service.kind, DirectiveKind::Service { argv, .. } if argv[..3] == ["runuser", "-u", "disco"])
        );
    }

    #[test]
    fn cookie_settings_hosts_and_ssh_trust() {
        let mut master = m("master", Role::Master, "ip-1", 4);
        master.attributes.insert("disco_pubkey".into(), "ssh-ed25519 MASTERKEY disco@master".into());
        let mut slave = m("s2", Role::Slave, "ip-2", 2);
        slave.attributes.insert("ssh_host_key".into(), "ssh-ed25519 HOSTKEY root@ip-2".into());
        let members = [master.clone(), slave.clone()];
        let find = |d: &[Directive], n: &str| -> (String, String, u32, String) {
            match &d.iter().find(|x| x.name == n).unwrap().kind {
                DirectiveKind::File { path, content, mode, marker, .. } => {
                    (path.clone(), content.clone(), *mode, marker.clone())
                }
                other => panic!("{other:?}"),
            }
        };
        let sd = disco().directives(&slave, &members, &layout(true));
        let (path, content, mode, _) = find(&sd, "erlang_cookie");
        assert_eq!((path.as_str(), content.as_str(), mode), ("/home/disco/.erlang.cookie", "COOKIE", 0o400));
        let (path, content, _, marker) = find(&sd, "authorized_keys");
        assert_eq!(path, "/home/disco/.ssh/authorized_keys");
        assert_eq!(content, "ssh-ed25519 MASTERKEY disco@master\n");
        assert_eq!(marker, "ddisco-master");
        let (path, content, _, marker) = find(&sd, "hosts");
        assert_eq!((path.as_str(), marker.as_str()), ("/etc/hosts", "ddisco"));
        assert!(content.contains("ip-1") && content.contains("ip-2"));
        let (_, settings, _, _) = find(&sd, "disco_settings");
        assert!(settings.contains("DISCO_ROOT = \"/mnt/disco\""));
        assert!(settings.contains("DDFS_BLOB_REPLICAS = \"2\""), "{settings}");
        assert!(settings.contains("DISCO_PROXY_ENABLED = \"\""));
        let md = disco().directives(&master, &members, &layout(true));
        let (_, known, _, _) = find(&md, "known_hosts");
        assert!(known.contains("ip-2,10.0.0.2 ssh-ed25519 HOSTKEY"), "{known}");
        let (_, settings, _, _) = find(&md, "disco_settings");
        assert!(settings.contains("DISCO_PROXY_ENABLED = \"on\""));
        // Local provider: paths under the node's root.
        let ld = disco().directives(&slave, &members, &layout(false));
        assert_eq!(find(&ld, "hosts").0, "/n/etc/hosts");
        let (_, local, _, _) = find(&ld, "disco_settings");
        assert!(local.contains("DISCO_ROOT = \"/n/mnt/disco\""), "{local}");
    }

    /// The settings file is Python that Disco execs: it must load, and set
    /// what Disco cannot guess (DISCO_HOME) and what keeps the master up
    /// under a supervisor (SYSTEMD_ENABLED: Erlang with -noshell).
    #[test]
    fn settings_load_as_python_and_name_the_home() {
        let members = [m("m", Role::Master, "ip-1", 2), m("s", Role::Slave, "ip-2", 1)];
        let d = Disco { home_dir: Some("/opt/disco".into()), ..disco() };
        let set = d.directives(&members[0], &members, &layout(false));
        let settings = match &set.iter().find(|x| x.name == "disco_settings").unwrap().kind {
            DirectiveKind::File { content, .. } => content.clone(),
            other => panic!("{other:?}"),
        };
        let prog = format!(
            "{settings}\nassert DISCO_HOME == '/opt/disco' and SYSTEMD_ENABLED is True\nprint(DISCO_ROOT)"
        );
        let out = std::process::Command::new("python3").arg("-c").arg(prog).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/n/mnt/disco");
        assert!(
            disco()
                .settings(&members, &members[0], &layout(true))
                .contains("DISCO_HOME = \"/usr/lib/disco\"")
        );
        // The master runs the build's launcher with python3, told where the
        // settings are (DISCO_SETTINGS_FILE: Disco overwrites DISCO_SETTINGS).
        let service = set.iter().find(|x| x.name == "disco").unwrap();
        let DirectiveKind::Service { argv, env, .. } = &service.kind else { panic!("{service:?}") };
        assert_eq!(argv, &["python3", "/opt/disco/bin/disco", "nodaemon"]);
        assert_eq!(env["DISCO_SETTINGS_FILE"], "/n/etc/disco/settings.py");
        assert_eq!(env["PYTHONPATH"], "/opt/disco/lib");
        assert!(!env.contains_key("DISCO_SETTINGS"));
    }

    /// DDFS replicas follow the planned size (slaves still booting count):
    /// the master reads them at start, and a running master takes a change
    /// through `save_settings` (a post that carries the new counts), not a
    /// restart: the master's service stays the same, so its jobs live on.
    #[test]
    fn replicas_follow_the_planned_size_without_restarting_the_master() {
        let master = m("m", Role::Master, "ip-1", 2);
        let mut booting = m("s1", Role::Slave, "ip-2", 1);
        booting.ready = false;
        let one = [master.clone()];
        let three = [master.clone(), booting.clone(), Member { id: "s2".into(), ..booting.clone() }];
        let four = [three.to_vec(), vec![Member { id: "s3".into(), ..booting.clone() }]].concat();
        let settings_of = |members: &[Member]| disco().settings(members, &master, &layout(true));
        assert!(settings_of(&three).contains("DDFS_BLOB_REPLICAS = \"3\""), "{}", settings_of(&three));
        assert!(
            settings_of(&four).contains("DDFS_BLOB_REPLICAS = \"3\""),
            "at most 3: {}",
            settings_of(&four)
        );
        assert!(settings_of(&one).contains("DDFS_TAG_REPLICAS = \"1\""), "{}", settings_of(&one));
        let directive = |members: &[Member], name: &str| {
            disco().directives(&master, members, &layout(true)).into_iter().find(|d| d.name == name).unwrap()
        };
        assert_eq!(
            directive(&one, "disco"),
            directive(&three, "disco"),
            "a replica change must not restart the master"
        );
        let post = |members: &[Member]| match directive(members, "ddfs_replicas").kind {
            DirectiveKind::Post { url, body, .. } => {
                (url, serde_json::from_str::<serde_json::Value>(&body).unwrap())
            }
            other => panic!("{other:?}"),
        };
        let (url, body) = post(&three);
        // Posted again to a restarted master (the query carries the digest).
        assert!(url.contains("/disco/ctrl/save_settings?settings="), "{url}");
        assert_eq!(body, serde_json::json!({"DDFS_BLOB_REPLICAS": "3", "DDFS_TAG_REPLICAS": "3"}));
        assert_eq!(post(&one).1, serde_json::json!({"DDFS_BLOB_REPLICAS": "1", "DDFS_TAG_REPLICAS": "1"}));
        // Anything else in the settings still restarts it (Disco reads them
        // once).
        let mut moved = master.clone();
        moved.hostname = "ip-9".into();
        let other = [moved.clone(), booting.clone()];
        let svc = |members: &[Member], me: &Member| {
            disco().directives(me, members, &layout(true)).into_iter().find(|d| d.name == "disco").unwrap()
        };
        assert_ne!(svc(&other, &moved), svc(&three, &master));
    }

    /// While a slave leaves, the master's agent keeps DDFS's GC going and
    /// reports `safe_gc_blacklist`; the hosts in it may go. A body that is
    /// not a list of host names, or a probe never asked for, is refused.
    #[test]
    fn leaving_slaves_are_released_by_the_ddfs_gc() {
        let mut leaving = m("s3", Role::Slave, "ip-3", 1);
        leaving.leaving = true;
        let master = m("master", Role::Master, "ip-1", 4);
        let probes = |members: &[Member]| -> Vec<String> {
            disco()
                .directives(&master, members, &layout(true))
                .into_iter()
                .filter_map(|d| match d.kind {
                    DirectiveKind::Probe { url } => Some(format!("{} {url}", d.name)),
                    _ => None,
                })
                .collect()
        };
        let joblist = "joblist http://127.0.0.1:8989/disco/ctrl/joblist";
        let nodeinfo = "nodeinfo http://127.0.0.1:8989/disco/ctrl/nodeinfo";
        assert_eq!(probes(&[master.clone(), m("s2", Role::Slave, "ip-2", 1)]), [joblist, nodeinfo]);
        assert_eq!(
            probes(&[master.clone(), leaving]),
            [
                "gc_start http://127.0.0.1:8989/ddfs/ctrl/gc_start",
                "safe_gc_blacklist http://127.0.0.1:8989/ddfs/ctrl/safe_gc_blacklist",
                joblist,
                nodeinfo
            ]
        );
        let d = disco();
        let safe = |body: &str| d.probed("safe_gc_blacklist", body).map(|p| p.safe_to_remove);
        assert_eq!(safe(r#"["ip-3"]"#), Ok(Some(vec!["ip-3".to_string()])));
        assert_eq!(safe("[]"), Ok(Some(vec![])));
        assert_eq!(d.probed("gc_start", "\"GC has started\""), Ok(Probed::default()));
        // nodeinfo: saturated -> one node more; else the slots in use.
        let target = |body: &str| d.probed("nodeinfo", body).map(|p| p.target_workers);
        let node = |tasks: usize, slots: u32| serde_json::json!({"max_workers": slots, "tasks": vec!["J"; tasks], "connected": true, "blacklisted": false});
        let info = |a: serde_json::Value, b: serde_json::Value| {
            serde_json::json!({"ip-1": a, "ip-2": b}).to_string()
        };
        assert_eq!(target(&info(node(2, 2), node(4, 4))), Ok(Some(10)));
        assert_eq!(target(&info(node(1, 2), node(2, 4))), Ok(Some(3)));
        assert_eq!(target(&info(node(0, 2), node(0, 4))), Ok(Some(0)));
        assert!(target("[]").is_err());
        let busy = |body: &str| d.probed("joblist", body).map(|p| p.busy);
        assert_eq!(busy(r#"[[0, "active", "WordCount@1"], [0, "ready", "Grep@2"]]"#), Ok(Some(true)));
        assert_eq!(busy(r#"[[0, "ready", "WordCount@1"]]"#), Ok(Some(false)));
        assert_eq!(busy("[]"), Ok(Some(false)));
        assert!(busy("nope").is_err());
        assert!(d.probed("safe_gc_blacklist", r#"["ip-3\n10.0.0.9 x"]"#).is_err());
        assert!(d.probed("safe_gc_blacklist", "GC is waiting").is_err());
        assert!(d.probed("anything", "[]").is_err());
    }

    #[test]
    fn the_tunnel_line_names_the_login_user() {
        let members = [m("m", Role::Master, "ip-1", 2)];
        let lines = disco().lines(&members).join("\n");
        assert!(lines.contains("ssh ubuntu@") && !lines.contains("ssh disco@"), "{lines}");
    }

    /// The install step takes the controller's build only with its digest,
    /// installs it once, and leaves the home alone when the digest differs.
    /// (Run with `sh`; a file:// URL stands in for the controller's HTTPS.)
    #[test]
    fn a_bundle_is_installed_once_and_only_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src/disco");
        std::fs::create_dir_all(src.join("master/ebin")).unwrap();
        std::fs::write(src.join(".disco-home"), "").unwrap();
        let tarball = dir.path().join("disco.tar.gz");
        let ok = std::process::Command::new("tar")
            .arg("czf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path().join("src"))
            .arg("disco")
            .status()
            .unwrap();
        assert!(ok.success());
        let sha = hex::encode(Sha256::digest(std::fs::read(&tarball).unwrap()));
        let home = dir.path().join("node/opt/disco");
        let run = |sha: &str| {
            let b = Bundle { url: format!("file://{}", tarball.display()), sha256: sha.into() };
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(bundle_script(&b, home.to_str().unwrap()))
                .current_dir(dir.path())
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, out) = run(&"0".repeat(64));
        assert!(!ok && out.contains("does not have SHA-256"), "{out}");
        assert!(!home.exists(), "a build with the wrong digest was installed");
        let (ok, out) = run(&sha);
        assert!(ok && out.contains("installed"), "{out}");
        assert!(home.join(".disco-home").exists() && home.join("master/ebin").is_dir());
        let (ok, out) = run(&sha);
        assert!(ok && out.contains("already"), "{out}");
    }
}
