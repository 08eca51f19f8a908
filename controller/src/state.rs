//! What the state directory holds about the cluster itself: its id.
//!
//! The **cluster id** (`c-` and 12 hex digits) is minted at the first
//! `serve` and kept in `<state_dir>/cluster_id`. Everything the EC2
//! provider launches carries it (`ddisco:cluster` tag); adoption, orphan
//! termination and `destroy` act only on instances that carry it, so two
//! clusters with the same `tag_key` in one account and region never touch
//! each other's nodes.

use std::path::Path;

const FILE: &str = "cluster_id";

/// The cluster id kept in `state_dir`, if there is one.
pub fn cluster_id(state_dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(state_dir.join(FILE)) {
        Ok(s) if is_cluster_id(s.trim()) => Ok(Some(s.trim().to_string())),
        Ok(s) => Err(std::io::Error::other(format!(
            "{}: {:?} is not a cluster id (c- and 12 hex digits)",
            state_dir.join(FILE).display(),
            s.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The cluster id of `state_dir`, minted (and kept) on first use.
pub fn cluster_id_or_mint(state_dir: &Path) -> std::io::Result<String> {
    if let Some(id) = cluster_id(state_dir)? {
        return Ok(id);
    }
    let id = format!("c-{}", hex::encode(rand::random::<[u8; 6]>()));
    crate::pki::write_private(&state_dir.join(FILE), &id).map_err(std::io::Error::other)?;
    Ok(id)
}

/// `c-` and 12 lower-case hex digits.
pub fn is_cluster_id(s: &str) -> bool {
    s.strip_prefix("c-")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cluster_id(dir.path()).unwrap(), None);
        let id = cluster_id_or_mint(dir.path()).unwrap();
        assert!(is_cluster_id(&id), "{id}");
        assert_eq!(cluster_id_or_mint(dir.path()).unwrap(), id);
        assert_eq!(cluster_id(dir.path()).unwrap(), Some(id));
        std::fs::write(dir.path().join(FILE), "../x").unwrap();
        assert!(cluster_id(dir.path()).is_err());
        assert!(!is_cluster_id("c-ABCDEF012345") && !is_cluster_id("c-123"));
    }
}
