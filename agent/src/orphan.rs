//! The dead man's switch: a node whose agent has had no session with its
//! controller for `orphan_timeout_secs` shuts itself down, so that a
//! cluster whose controller died (its host crashed, its laptop slept, it
//! was killed) stops billing by itself.
//!
//! The clock starts when the agent starts and is reset by every sign of a
//! live session: enrollment, a session opened, each message from the
//! controller, each heartbeat sent on an open session (a silently dead
//! controller host is noticed by HTTP/2 keepalive within a minute, and the
//! session ends). A controller back within the window re-adopts the node:
//! its next session resets the clock.
//!
//! What "shut down" means is the provider's (`orphan_action` in
//! `bootstrap.json`):
//! - `poweroff` (EC2): the machine powers off; nodes are launched with
//!   `InstanceInitiatedShutdownBehavior = terminate`, so EC2 terminates the
//!   instance and billing stops. The command is `$DDISCO_POWEROFF` when set
//!   (the EC2 test hypervisor points it at its model of a power-off), else
//!   `poweroff`, then `shutdown -h now`.
//! - `exit` (local provider): every process of the node's process group
//!   (the node the provider started) is killed, the agent with them; a
//!   machine node's init then ends, and its namespaces with everything in
//!   them.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a node shuts itself down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrphanAction {
    /// End the node's process group (local provider).
    #[default]
    Exit,
    /// Power the machine off (EC2: the instance is terminated).
    Poweroff,
}

/// The switch: when the controller was last heard from.
#[derive(Debug)]
pub struct Orphan {
    timeout: Option<Duration>,
    action: OrphanAction,
    start: Instant,
    /// Milliseconds since `start` of the last contact.
    last_ms: AtomicU64,
    /// The node's services' cgroup, once known: killed first.
    cgroup: std::sync::OnceLock<crate::cgroup::NodeGroup>,
}

impl Orphan {
    /// `timeout_secs = 0`: off.
    pub fn new(timeout_secs: u64, action: OrphanAction) -> Orphan {
        Orphan {
            timeout: (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs)),
            action,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            cgroup: std::sync::OnceLock::new(),
        }
    }

    /// The node's services' cgroup (their daemons go too when it fires).
    pub fn set_cgroup(&self, g: crate::cgroup::NodeGroup) {
        let _ = self.cgroup.set(g);
    }

    /// The controller was heard from (one relaxed store).
    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the controller was last heard from.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Whether the window has passed (never when off).
    pub fn expired(&self) -> bool {
        self.timeout.is_some_and(|t| self.silent_for() >= t)
    }

    pub fn enabled(&self) -> bool {
        self.timeout.is_some()
    }

    /// Waits until the window passes without contact, then shuts the node
    /// down. Never returns when the switch is off.
    pub async fn watch(&self) {
        let Some(timeout) = self.timeout else { return std::future::pending().await };
        let mut tick =
            tokio::time::interval(Duration::from_secs(1).min(timeout / 4).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            if self.expired() {
                break;
            }
        }
        tracing::error!(
            "no session with the controller for {}s (orphan_timeout_secs): shutting this node down so that it \
             stops billing ({:?})",
            self.silent_for().as_secs(),
            self.action
        );
        if let Some(g) = self.cgroup.get() {
            g.kill_all();
        }
        // Returns only if every way failed: try again, a node left running
        // is what this exists to prevent.
        loop {
            shut_down(self.action);
            tracing::error!("could not shut this node down; trying again in 60 s");
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

/// Shuts the node down; returns only if every way failed.
fn shut_down(action: OrphanAction) {
    match action {
        OrphanAction::Exit => {
            // The node is this process group (the provider started it as
            // one): every process of it goes, this one included.
            let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::Signal::SIGKILL);
        }
        OrphanAction::Poweroff => {
            let configured = std::env::var("DDISCO_POWEROFF").ok().filter(|c| !c.is_empty());
            let tries: Vec<Vec<String>> = match configured {
                Some(cmd) => vec![vec![cmd]],
                None => vec![
                    vec!["poweroff".into()],
                    vec!["shutdown".into(), "-h".into(), "now".into()],
                    vec!["systemctl".into(), "poweroff".into()],
                ],
            };
            for argv in tries {
                match std::process::Command::new(&argv[0]).args(&argv[1..]).status() {
                    Ok(s) if s.success() => return,
                    Ok(s) => tracing::error!("{}: {s}", argv.join(" ")),
                    Err(e) => tracing::error!("{}: {e}", argv.join(" ")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_runs_from_the_last_contact_and_zero_is_off() {
        let o = Orphan::new(1, OrphanAction::Exit);
        assert!(o.enabled() && !o.expired());
        std::thread::sleep(Duration::from_millis(600));
        o.touch();
        std::thread::sleep(Duration::from_millis(600));
        assert!(!o.expired(), "a contact 0.6 s ago: the 1 s window is still open");
        std::thread::sleep(Duration::from_millis(500));
        assert!(o.expired());
        let off = Orphan::new(0, OrphanAction::Poweroff);
        assert!(!off.enabled() && !off.expired());
    }

    #[test]
    fn the_action_reads_as_the_controller_writes_it() {
        let a: OrphanAction = serde_json::from_str("\"poweroff\"").unwrap();
        assert_eq!(a, OrphanAction::Poweroff);
        assert_eq!(serde_json::to_string(&OrphanAction::Exit).unwrap(), "\"exit\"");
    }
}
