//! The agent's domain: what the controller asks of the node (assignment,
//! plan, engine directives) and what the agent reports back. Plain data;
//! `wire` converts it from and to the generated protobuf types.

use std::collections::HashMap;

/// What the agent reports about its node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// Empty where there is none (no instance metadata).
    pub instance_id: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub logical_cores: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
    /// When the agent process started (boot diagnostics).
    pub started_unix_ms: u64,
    /// `std::env::consts::ARCH`.
    pub arch: String,
}

/// What the controller sends on the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Assignment(Assignment),
    Directives(Directives),
    Shutdown(String),
    /// Send a signing request for a fresh key (the certificate nears its end).
    RenewCertificate,
    /// The certificate for the fresh key.
    NewCertificate(String),
    /// A message this agent does not know (a newer controller).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Slave,
    Unknown,
}

/// The node's role, worker count and plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub node_id: String,
    pub role: Role,
    pub workers: u32,
    pub heartbeat_interval_ms: u32,
    pub plan: Option<Plan>,
}

/// The ordered steps that make the node ready; `id` is their content hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub id: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    /// The step's digest when it only leaves machine state (an image can
    /// hold it: `bake`); `None` for steps every node runs itself.
    pub image_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Check (and with `install`, apt-get install) Debian packages.
    SystemPackages { packages: Vec<String>, install: bool },
    /// pip install into a virtualenv (created if missing).
    Pip { requirements: Vec<String>, venv: String },
    /// Add public keys to an authorized_keys file.
    AuthorizedKeys { path: String, keys: Vec<String>, owner: String },
    /// A script run with bash (or sh).
    Shell { script: String, env: HashMap<String, String> },
    /// Instance store formatted and mounted as scratch space.
    Scratch(Scratch),
    /// Read a file and send it to the controller as a node attribute.
    Collect { attribute: String, path: String },
    /// The controller's prepared Python packages, unpacked into a venv.
    PythonEnv(PythonEnv),
    /// Record what an image holds and remove what it must not (`bake`).
    Seal { image: String, generalize: bool },
    /// A kind this agent does not know (a newer controller): the step fails
    /// and says so.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonEnv {
    pub url: String,
    pub sha256: String,
    pub venv: String,
    /// "3.12": the node's python3 must be this version.
    pub python: String,
    pub requirements: Vec<String>,
    /// The archive's size: the download is refused beyond it.
    pub size: u64,
    /// It carries bytecode for `python` (else compiled after unpacking).
    pub compiled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scratch {
    pub path: String,
    /// Devices to use; empty: the instance-store volumes found in sysfs.
    pub devices: Vec<String>,
}

/// The engine's desired state on this node, pushed after membership
/// changes; `id` is its content hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Directives {
    pub id: String,
    pub items: Vec<Directive>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    pub name: String,
    pub kind: DirectiveKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DirectiveKind {
    Service(Service),
    File(ManagedFile),
    Post(Post),
    /// A local URL read about once a second; its body reported on change.
    Probe {
        url: String,
    },
    /// A kind this agent does not know: ignored.
    Unknown,
}

/// A process kept running (restarted with backoff) while it is wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub argv: Vec<String>,
    pub env: HashMap<String, String>,
    pub workdir: String,
    /// Between SIGTERM and SIGKILL when it is stopped.
    pub grace_ms: u32,
}

/// A file whose content (or the block between `marker` lines) is owned by
/// the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedFile {
    pub path: String,
    pub content: String,
    /// 0: 0644.
    pub mode: u32,
    pub owner: String,
    pub marker: String,
}

/// An HTTP POST made until it is accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Post {
    pub url: String,
    pub body: String,
    pub content_type: String,
}

/// What the agent tells the controller besides hello and heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Step(StepReport),
    Attribute {
        name: String,
        value: String,
    },
    Notice {
        kind: NoticeKind,
        detail: String,
    },
    Directive(DirectiveReport),
    /// A probe's body, changed since the last report (at most
    /// `MAX_PROBE_BODY` bytes).
    Probe {
        name: String,
        body: String,
    },
}

/// The most of a probe's answer that is reported.
pub const MAX_PROBE_BODY: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub plan_id: String,
    pub index: u32,
    pub name: String,
    pub status: StepStatus,
    pub duration_ms: u64,
    /// -1 when killed by a signal or not a process.
    pub exit_code: i32,
    /// The last bytes of its output.
    pub output_tail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Running,
    Succeeded,
    /// Not run: already done (baked into the node's image).
    Skipped,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    SpotInterruption,
    Rebalance,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectiveReport {
    pub directives_id: String,
    pub name: String,
    pub ok: bool,
    pub message: String,
}
