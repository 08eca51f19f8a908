//! The controller's own resource limits: the open-file limit it raises at
//! start, and whether it is enough for the cluster asked for. Each node holds
//! one connection (its session) and briefly a second (enrollment, agent
//! download); the controller needs a few more of its own (state files, the
//! AWS endpoint, the admin socket, the dashboard).

/// Descriptors the controller keeps for itself besides the nodes'.
pub const RESERVED_FDS: u64 = 256;

/// Descriptors a cluster of `nodes` needs (two per node: a session, and an
/// enrollment or download in flight during a scale-up).
pub fn fds_needed(nodes: u32) -> u64 {
    2 * u64::from(nodes) + RESERVED_FDS
}

/// A warning when `limit` allows fewer connections than `nodes` need.
pub fn fd_warning(limit: u64, nodes: u32) -> Option<String> {
    let need = fds_needed(nodes);
    (limit < need).then(|| {
        format!(
            "open-file limit {limit} is below the {need} that {nodes} nodes need: nodes will fail to \
             connect; raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn, or \
             /etc/security/limits.conf) and restart serve"
        )
    })
}

/// Raises the soft open-file limit to the hard limit; returns (soft before,
/// hard), and the limit in force after.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok((soft, hard, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_when_the_limit_is_too_low() {
        assert_eq!(fds_needed(1000), 2256);
        assert!(fd_warning(1024, 1000).unwrap().contains("open-file limit 1024 is below the 2256"));
        assert_eq!(fd_warning(1 << 20, 10_001), None);
        assert_eq!(fd_warning(2256, 1000), None);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let (before, hard, now) = raise_fd_limit().unwrap();
        assert!(now >= before);
        assert_eq!(now, hard);
    }
}
