//! Each node's [`Liveness`]: the hot path's state (last heartbeat, open
//! sessions, load, the outbound channel), updated with atomics by the
//! node's session task without the registry's lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// `Liveness::load_milli` before any report (a load of 4 million is
/// clamped below it).
const NO_LOAD: u32 = u32::MAX;

/// Liveness of one node, shared with its session task. Updating it costs one
/// atomic store: no lock, no allocation, no scan.
#[derive(Debug)]
pub struct Liveness {
    /// Controller-clock milliseconds of the last message; 0 = never.
    last_seen_ms: AtomicU64,
    /// Set when the node is terminated: its session must end. A copy of
    /// "the state is `Terminating`" (set by that transition only) that the
    /// session task reads without the registry's lock.
    revoked: AtomicBool,
    /// Open agent sessions (0 or 1, briefly 2 during a reconnect).
    sessions: AtomicU32,
    /// Last reported 1-minute load average x 1000; [`NO_LOAD`]: none yet.
    load_milli: AtomicU32,
    /// Its instance has been in a provider listing (since this start): an
    /// observation of the provider, not a state.
    pub(super) listed: AtomicBool,
    /// The newest session's outbound channel, and the id of the directives
    /// last sent on it (a new session gets the full set again).
    push: parking_lot::Mutex<Option<(tokio::sync::mpsc::Sender<Outbound>, String)>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            last_seen_ms: AtomicU64::new(0),
            revoked: AtomicBool::new(false),
            sessions: AtomicU32::new(0),
            load_milli: AtomicU32::new(NO_LOAD),
            listed: AtomicBool::new(false),
            push: parking_lot::Mutex::new(None),
        }
    }
}

/// What the controller sends on an agent's session. Kept small (the
/// assignment is boxed): every session's channel holds a block of these.
#[derive(Debug, Clone)]
pub enum Outbound {
    Assignment(Box<crate::plan::Assignment>),
    Directives(Arc<crate::engine::DirectiveSet>),
    Shutdown(String),
    /// Ask the agent for a signing request (its certificate nears its end).
    RenewCertificate,
    /// The renewed certificate.
    NewCertificate(String),
}

/// Counts an open session for as long as it lives.
pub struct SessionGuard(Arc<Liveness>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Liveness {
    /// A heartbeat's load report (one relaxed store).
    pub fn set_load(&self, load_milli: Option<u32>) {
        let v = load_milli.map_or(NO_LOAD, |l| l.min(NO_LOAD - 1));
        self.load_milli.store(v, Ordering::Relaxed);
    }

    /// The last reported load (x 1000), if any.
    pub fn load_milli(&self) -> Option<u32> {
        Some(self.load_milli.load(Ordering::Relaxed)).filter(|l| *l != NO_LOAD)
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms.max(1), Ordering::Relaxed);
    }
    pub fn last_seen_ms(&self) -> Option<u64> {
        match self.last_seen_ms.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Relaxed);
    }
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }
    pub fn session(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionGuard(self.clone())
    }
    pub fn connected(&self) -> bool {
        self.sessions.load(Ordering::Relaxed) > 0
    }
    /// Registers a session's outbound channel.
    pub fn set_push(&self, tx: tokio::sync::mpsc::Sender<Outbound>) {
        *self.push.lock() = Some((tx, String::new()));
    }
    /// Forgets a session's channel when that session ends (not a newer one's),
    /// so its stream can close.
    pub fn clear_push(&self, tx: &tokio::sync::mpsc::Sender<Outbound>) {
        let mut guard = self.push.lock();
        if guard.as_ref().is_some_and(|(t, _)| t.same_channel(tx)) {
            *guard = None;
        }
    }

    /// Sends `directives` unless this session already has them; returns
    /// whether the session has them now. Never blocks: a full channel (or
    /// no session) drops the push, and the next publish tries again.
    pub fn push_directives(&self, d: &Arc<crate::engine::DirectiveSet>) -> bool {
        let mut guard = self.push.lock();
        let Some((tx, last)) = guard.as_mut() else { return false };
        if *last == d.id {
            return true;
        }
        if tx.try_send(Outbound::Directives(d.clone())).is_ok() {
            *last = d.id.clone();
            return true;
        }
        false
    }
}
