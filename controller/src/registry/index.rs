//! The registry's indexes: bootstrap tokens (by hash, spent ones too) and
//! the names and addresses nodes hold (`claims`), each one lookup whatever
//! the cluster's size.

use super::{NodeEvent, NodeRecord, Registry};
use crate::model::StateKind;

/// Why an enrollment was refused. Refusals change no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown bootstrap token")]
    Unknown,
    #[error("bootstrap token of node {0} was already used")]
    Used(String),
    #[error("bootstrap token of node {0} has expired; the node will be replaced")]
    Expired(String),
    #[error("node {0} is being terminated")]
    Terminated(String),
}

/// A name or address a node holds (see `Registry::claims`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claim {
    Host(String),
    Address(String),
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Host(h) => write!(f, "host name {h}"),
            Claim::Address(a) => write!(f, "address {a}"),
        }
    }
}

/// What a node with `hostname` at `address` holds.
pub fn claims(hostname: &str, address: &str) -> Vec<Claim> {
    let mut v = Vec::with_capacity(2);
    let short = hostname.split('.').next().unwrap_or("");
    if !short.is_empty() {
        v.push(Claim::Host(short.to_ascii_lowercase()));
    }
    if !address.is_empty() {
        v.push(Claim::Address(address.to_string()));
    }
    v
}

pub(super) fn claims_of(rec: &NodeRecord) -> Vec<Claim> {
    claims(rec.facts.as_ref().map_or("", |f| f.hostname.as_str()), rec.address())
}

impl Registry {
    /// Whether `ip` is the address a node holds (one that said hello; on
    /// EC2 its attested address). One lookup.
    pub fn holds_address(&self, ip: std::net::IpAddr) -> bool {
        self.claims.contains_key(&Claim::Address(ip.to_canonical().to_string()))
    }

    /// Checks a bootstrap token without changing anything.
    pub fn check_token(&self, hash: &str, now_unix_ms: u64) -> Result<String, TokenError> {
        // One hash lookup, used tokens included (they stay indexed until
        // their node is removed): no scan, whatever the token.
        let id = self.token_index.get(hash).ok_or(TokenError::Unknown)?;
        let e = self.nodes.get(id).ok_or(TokenError::Unknown)?;
        if e.rec.token_used {
            return Err(TokenError::Used(id.clone()));
        }
        if now_unix_ms > e.rec.token_expires_unix_ms {
            return Err(TokenError::Expired(id.clone()));
        }
        if e.rec.state.is(StateKind::Terminating) {
            return Err(TokenError::Terminated(id.clone()));
        }
        Ok(id.clone())
    }

    /// Applies the journal of spent tokens (`cluster::persist`) to a
    /// restored registry: those tokens are used, whatever the snapshot says.
    /// Spends from the journal that the snapshot missed (a crash between
    /// an enrollment and the next save): the token is spent, and the node's
    /// sessions must present the certificate the journal names. (A line
    /// without one, from an older journal, pins the first certificate a
    /// session presents, as records from before pinning do.)
    pub fn replay_spent(&mut self, spends: &[(String, Option<String>)]) {
        for (id, cert) in spends {
            let Some(e) = self.nodes.get_mut(id) else { continue };
            if !e.rec.token_used {
                e.rec.token_used = true;
                self.dirty = true;
            }
            if e.rec.cert_sha256.is_none() {
                match cert {
                    Some(c) => {
                        e.rec.cert_sha256 = Some(c.clone());
                        e.rec.pin_first_session = false;
                    }
                    None => e.rec.pin_first_session = true,
                }
                self.dirty = true;
            }
            // The snapshot may say it never enrolled; the journal says it
            // did (its agent will say hello with that certificate).
            if let Err(e) = self.transition(id, NodeEvent::Spent) {
                tracing::warn!("replaying tokens.log: {e}");
            }
        }
    }
}
