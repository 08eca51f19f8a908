//! What a node must do before it is ready: the ordered steps handed to its
//! agent. A plain function of the configuration, the role and where the
//! provider puts things on the node.

use crate::config::Config;
use crate::model::Role;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The controller's prepared Python packages (`pyenv`), as a node's plan
/// names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedEnv {
    /// "x86_64", "aarch64".
    pub arch: String,
    pub url: String,
    pub sha256: String,
    pub size: u64,
    /// The nodes' Python, "3.12".
    pub python: String,
    /// It carries bytecode for that Python (else the node compiles it).
    pub compiled: bool,
    pub requirements: Vec<String>,
}

/// Where things live on a node; decided by the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// The node's file system root: `/` on a real node; the local provider
    /// gives each node its own folder so nothing lands on the host.
    pub root: PathBuf,
    /// May engines manage the system (users, packages, builds, host keys)?
    pub system: bool,
    /// Home of the login user (management keys go to `.ssh/authorized_keys`).
    pub home: PathBuf,
    /// Owner to chown the keys to; `None` leaves ownership alone.
    pub owner: Option<String>,
    /// Virtual environment for pip requirements.
    pub venv: PathBuf,
    /// May system package steps install (`apt-get`), or only check?
    pub install_packages: bool,
    /// Scratch space to set up from instance store (EC2); `None`: the
    /// node's own folder serves (local provider).
    pub scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepKind {
    SystemPackages {
        packages: Vec<String>,
        install: bool,
    },
    Pip {
        requirements: Vec<String>,
        venv: String,
    },
    AuthorizedKeys {
        path: String,
        keys: Vec<String>,
        owner: String,
    },
    Shell {
        script: String,
        env: BTreeMap<String, String>,
    },
    /// Instance store formatted and mounted at `path` (striped if several
    /// volumes); without instance store, a directory on the root volume.
    Scratch {
        path: String,
    },
    /// Read a file and send it to the controller as a node attribute.
    Collect {
        attribute: String,
        path: String,
    },
    /// The controller's prepared Python packages (`pyenv`), unpacked into
    /// `venv`: what the `Pip` steps would have installed, from no index.
    PythonEnv {
        url: String,
        sha256: String,
        size: u64,
        venv: String,
        python: String,
        compiled: bool,
        requirements: Vec<String>,
    },
    /// A bake node's last step (`bake`): record the image steps done and
    /// remove what no image may carry (the agent's identity; with
    /// `generalize`, the machine's host keys and per-instance state).
    Seal {
        image: String,
        generalize: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub name: String,
    #[serde(flatten)]
    pub kind: StepKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Content hash: an agent's progress is only reused for the same plan.
    pub id: String,
    pub steps: Vec<Step>,
    /// Per step: its digest if it is an image step (it leaves only machine
    /// state, so a baked image can hold it: [`image_digest`]).
    pub image: Vec<Option<String>>,
}

impl Plan {
    /// A plan without image steps.
    pub fn new(steps: Vec<Step>) -> Plan {
        Plan::with_image_steps(steps, &[])
    }

    /// A plan whose image steps are those [`is_image_step`] picks, the
    /// shell steps named in `image_shell_steps` among them.
    pub fn with_image_steps(steps: Vec<Step>, image_shell_steps: &[&str]) -> Plan {
        let json = serde_json::to_vec(&steps).expect("steps serialize");
        let id = hex::encode(&Sha256::digest(&json)[..12]);
        let image =
            steps.iter().map(|s| is_image_step(s, image_shell_steps).then(|| image_digest(s))).collect();
        Plan { id, steps, image }
    }

    /// The image steps: (step, digest).
    pub fn image_steps(&self) -> impl Iterator<Item = (&Step, &str)> {
        self.steps.iter().zip(&self.image).filter_map(|(s, d)| Some((s, d.as_deref()?)))
    }
}

/// Does `step` leave only machine state that every node of the cluster
/// would make the same (so an image may hold it)? Packages, pip and the
/// prepared Python environment do; shell steps only when their engine says
/// so (installs, users, folders); never scratch (instance store is each
/// instance's own), keys, collected values, POST_INIT (the user's script,
/// told the node's role) or anything that makes a secret (the master's SSH
/// key).
pub fn is_image_step(step: &Step, image_shell_steps: &[&str]) -> bool {
    match &step.kind {
        StepKind::SystemPackages { .. } | StepKind::Pip { .. } | StepKind::PythonEnv { .. } => true,
        StepKind::Shell { env, .. } => env.is_empty() && image_shell_steps.contains(&step.name.as_str()),
        StepKind::AuthorizedKeys { .. }
        | StepKind::Scratch { .. }
        | StepKind::Collect { .. }
        | StepKind::Seal { .. } => false,
    }
}

/// The SHA-256 (hex) of a step's name and content: the same step, done on
/// the bake node, is the one a node booted from the image skips. The
/// Python environment counts by its archive's SHA-256, not by the URL it
/// is fetched from (the controller's address).
pub fn image_digest(step: &Step) -> String {
    let mut step = step.clone();
    if let StepKind::PythonEnv { url, .. } = &mut step.kind {
        url.clear();
    }
    hex::encode(Sha256::digest(serde_json::to_vec(&step).expect("step serializes")))
}

/// A bake node's plan: the image steps of `plans` (every role's), each
/// once, in the order they come, then the seal for `image`.
pub fn bake_plan(plans: &[&Plan], image: &str, generalize: bool) -> Plan {
    let mut steps: Vec<Step> = Vec::new();
    let mut digests: Vec<Option<String>> = Vec::new();
    for plan in plans {
        for (step, digest) in plan.image_steps() {
            if !digests.iter().any(|d| d.as_deref() == Some(digest)) {
                steps.push(step.clone());
                digests.push(Some(digest.to_string()));
            }
        }
    }
    steps.push(Step { name: "seal".into(), kind: StepKind::Seal { image: image.to_string(), generalize } });
    digests.push(None);
    let json = serde_json::to_vec(&steps).expect("steps serialize");
    let id = hex::encode(&Sha256::digest(&json)[..12]);
    Plan { id, steps, image: digests }
}

/// What a node is told when its session opens.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub node_id: String,
    pub role: Role,
    pub workers: u32,
    pub heartbeat_interval_ms: u32,
    pub plan: Plan,
}

/// The steps for a node of `role` with `workers` workers: scratch,
/// packages, pip, the engine's steps (`engine_steps`), management keys,
/// POST_INIT last. With `env` (the controller prepared the packages), every
/// pip step becomes one `python_env` step where the first one was.
pub fn build(
    cfg: &Config,
    role: Role,
    workers: u32,
    layout: &NodeLayout,
    engine_steps: Vec<Step>,
    image_shell_steps: &[&str],
    env: Option<&PreparedEnv>,
) -> Plan {
    let mut steps = Vec::new();
    // Scratch first: everything after it (the engine above all) may use it.
    if let Some(path) = &layout.scratch {
        steps.push(Step {
            name: "scratch".into(),
            kind: StepKind::Scratch { path: path.display().to_string() },
        });
    }
    let packages: Vec<String> = cfg.base_packages.iter().chain(&cfg.additional_packages).cloned().collect();
    if !packages.is_empty() {
        steps.push(Step {
            name: "system_packages".into(),
            kind: StepKind::SystemPackages { packages, install: layout.install_packages },
        });
    }
    if !cfg.pip_requirements.is_empty() {
        steps.push(Step {
            name: "pip_requirements".into(),
            kind: StepKind::Pip {
                requirements: cfg.pip_requirements.clone(),
                venv: layout.venv.display().to_string(),
            },
        });
    }
    steps.extend(engine_steps);
    if !cfg.mgmt_keys.is_empty() {
        steps.push(Step {
            name: "authorized_keys".into(),
            kind: StepKind::AuthorizedKeys {
                path: layout.home.join(".ssh/authorized_keys").display().to_string(),
                keys: cfg.mgmt_keys.clone(),
                owner: layout.owner.clone().unwrap_or_default(),
            },
        });
    }
    if !cfg.post_init.trim().is_empty() {
        let env = BTreeMap::from([
            ("DDISCO_ROLE".to_string(), role.to_string()),
            ("DDISCO_WORKERS".to_string(), workers.to_string()),
            ("DDISCO_VENV".to_string(), layout.venv.display().to_string()),
        ]);
        steps.push(Step {
            name: "post_init".into(),
            kind: StepKind::Shell { script: cfg.post_init.clone(), env },
        });
    }
    if let Some(env) = env {
        steps = with_python_env(steps, env, layout);
    }
    Plan::with_image_steps(steps, image_shell_steps)
}

/// `steps` with their pip steps replaced by one `python_env` step (at the
/// first one's place) that unpacks `env`.
pub fn with_python_env(steps: Vec<Step>, env: &PreparedEnv, layout: &NodeLayout) -> Vec<Step> {
    let first = steps.iter().position(|s| matches!(s.kind, StepKind::Pip { .. }));
    let Some(first) = first else { return steps };
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for (i, s) in steps.into_iter().enumerate() {
        if i == first {
            out.push(Step {
                name: "python_env".into(),
                kind: StepKind::PythonEnv {
                    url: env.url.clone(),
                    sha256: env.sha256.clone(),
                    size: env.size,
                    venv: layout.venv.display().to_string(),
                    python: env.python.clone(),
                    compiled: env.compiled,
                    requirements: env.requirements.clone(),
                },
            });
        } else if !matches!(s.kind, StepKind::Pip { .. }) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> NodeLayout {
        NodeLayout {
            root: "/".into(),
            system: true,
            home: "/home/ubuntu".into(),
            owner: Some("ubuntu".into()),
            venv: "/opt/ddisco/venv".into(),
            install_packages: true,
            scratch: None,
        }
    }

    #[test]
    fn steps_in_order_post_init_last() {
        let cfg = Config {
            mgmt_keys: vec!["ssh-ed25519 AAAA k".into()],
            post_init: "echo hi".into(),
            ..Config::default()
        };
        let p = build(&cfg, Role::Master, 4, &layout(), vec![], &[], None);
        let names: Vec<_> = p.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["system_packages", "pip_requirements", "authorized_keys", "post_init"]);
        match &p.steps[2].kind {
            StepKind::AuthorizedKeys { path, owner, .. } => {
                assert_eq!(path, "/home/ubuntu/.ssh/authorized_keys");
                assert_eq!(owner, "ubuntu");
            }
            other => panic!("{other:?}"),
        }
        match &p.steps[3].kind {
            StepKind::Shell { env, .. } => assert_eq!(env["DDISCO_WORKERS"], "4"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scratch_comes_first_on_nodes_with_instance_store_handling() {
        let cfg = Config { engine: crate::config::EngineKind::Dask, ..Config::default() };
        let engine = vec![Step {
            name: "dask_install".into(),
            kind: StepKind::Shell { script: "true".into(), env: Default::default() },
        }];
        let ec2 = NodeLayout { scratch: Some("/mnt".into()), ..layout() };
        let p = build(&cfg, Role::Slave, 2, &ec2, engine.clone(), &[], None);
        assert_eq!(
            p.steps[0],
            Step { name: "scratch".into(), kind: StepKind::Scratch { path: "/mnt".into() } }
        );
        // The engine's steps come after it.
        assert!(p.steps.iter().position(|s| s.name.starts_with("dask")).unwrap_or(usize::MAX) > 0);
        // Without scratch handling (local nodes): no such step.
        let p = build(&cfg, Role::Slave, 2, &layout(), engine, &[], None);
        assert!(p.steps.iter().all(|s| s.name != "scratch"));
    }

    #[test]
    fn empty_settings_give_no_steps() {
        let cfg = Config {
            base_packages: vec![],
            additional_packages: vec![],
            pip_requirements: vec![],
            ..Config::default()
        };
        assert!(build(&cfg, Role::Slave, 1, &layout(), vec![], &[], None).steps.is_empty());
    }

    #[test]
    fn plan_id_follows_content() {
        let cfg = Config::default();
        let a = build(&cfg, Role::Slave, 2, &layout(), vec![], &[], None);
        assert_eq!(a.id, build(&cfg, Role::Slave, 2, &layout(), vec![], &[], None).id);
        let local = NodeLayout { install_packages: false, ..layout() };
        assert_ne!(a.id, build(&cfg, Role::Slave, 2, &local, vec![], &[], None).id);
    }

    #[test]
    fn image_steps_are_machine_state_and_a_bake_plan_holds_each_once_then_seals() {
        let cfg = Config {
            mgmt_keys: vec!["ssh-ed25519 AAAA k".into()],
            post_init: "echo hi".into(),
            pip_requirements: vec!["six==1.16.0".into()],
            ..Config::default()
        };
        let sh = |name: &str| Step {
            name: name.into(),
            kind: StepKind::Shell { script: format!("echo {name}"), env: Default::default() },
        };
        let ec2 = NodeLayout { scratch: Some("/mnt".into()), ..layout() };
        let image = ["engine_install"];
        let slave = build(&cfg, Role::Slave, 2, &ec2, vec![sh("engine_install")], &image, None);
        let master =
            build(&cfg, Role::Master, 2, &ec2, vec![sh("engine_install"), sh("engine_key")], &image, None);
        let names = |p: &Plan| p.image_steps().map(|(s, _)| s.name.clone()).collect::<Vec<_>>();
        // Scratch, keys, POST_INIT and unnamed shell steps are each node's own.
        assert_eq!(names(&slave), ["system_packages", "pip_requirements", "engine_install"]);
        assert_eq!(names(&master), names(&slave));
        // The same step has the same digest in both roles' plans; another
        // content, another digest.
        assert_eq!(slave.image, master.image[..slave.image.len()].to_vec());
        let other = Config { base_packages: vec!["curl".into()], ..cfg.clone() };
        let other = build(&other, Role::Slave, 2, &ec2, vec![sh("engine_install")], &image, None);
        assert_ne!(other.image_steps().next().unwrap().1, slave.image_steps().next().unwrap().1);

        let bake = bake_plan(&[&slave, &master], "ddisco-x", true);
        let bake_names: Vec<_> = bake.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(bake_names, ["system_packages", "pip_requirements", "engine_install", "seal"]);
        assert_eq!(bake.steps[3].kind, StepKind::Seal { image: "ddisco-x".into(), generalize: true });
        assert_eq!(bake.image[..3], slave.image.iter().flatten().cloned().map(Some).collect::<Vec<_>>()[..]);
        assert_eq!(bake.image[3], None);

        // The prepared Python environment counts by content, wherever the
        // controller serves it from.
        let env = |url: &str| Step {
            name: "python_env".into(),
            kind: StepKind::PythonEnv {
                url: url.into(),
                sha256: "ab".repeat(32),
                size: 1,
                venv: "/opt/ddisco/venv".into(),
                python: "3.12".into(),
                compiled: false,
                requirements: vec!["six==1.16.0".into()],
            },
        };
        assert_eq!(image_digest(&env("https://10.0.0.1:7444/x")), image_digest(&env("https://10.0.0.9:9/x")));
    }
}
