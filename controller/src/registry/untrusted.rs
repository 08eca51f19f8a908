//! Checks for what nodes send. A node is not trusted: what it reports ends
//! up in other nodes' files (`/etc/hosts`, `known_hosts`, Disco's config
//! table), on command lines and on the operator's terminal. Every value is
//! checked here, by plain functions, before the registry stores it.
//!
//! - Host names are RFC 1123 names (letters, digits, `-`; labels of 1 to 63
//!   characters not starting or ending with `-`; 253 at most).
//! - Addresses parse as IP addresses; at most [`MAX_ADDRESSES`].
//! - SSH public keys are one line `TYPE BASE64`, of a known type, whose
//!   blob names the same type; a comment only if it is printable text.
//! - Free text (step output, messages) loses its control characters, so it
//!   cannot rewrite the operator's terminal.

use super::Facts;
use std::net::IpAddr;

pub const MAX_HOSTNAME: usize = 253;
pub const MAX_ADDRESSES: usize = 16;
/// More cores than any machine EC2 rents (896 vCPUs at most in 2026): a
/// node claiming more is lying (it would draw every task, and shrink the
/// adaptive size).
pub const MAX_CORES: u32 = 1024;
/// 64 TiB, beyond any machine EC2 rents.
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;
pub const MAX_VERSION: usize = 64;
pub const MAX_INSTANCE_ID: usize = 64;
/// An RSA 16384-bit key is about 2.8 KB of base64.
pub const MAX_SSH_KEY: usize = 4096;

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// RFC 1123 host name (not an address, not starting with `-`).
pub fn check_hostname(h: &str) -> Result<(), String> {
    let shown = shown(h);
    if h.is_empty() || h.len() > MAX_HOSTNAME {
        return Err(format!("host name {shown} must be 1 to {MAX_HOSTNAME} characters"));
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "host name {shown} is not an RFC 1123 name (labels of letters, digits and '-', not starting or \
                 ending with '-')"
            ));
        }
    }
    if h.parse::<IpAddr>().is_ok() {
        return Err(format!("host name {shown} is an address"));
    }
    Ok(())
}

/// A node's host name is its own: one of the names the provider knows for
/// it (when it knows any: `own`), with at most an `.internal` domain after
/// it (EC2's `ip-10-0-0-7.ec2.internal`). A node can neither take the name
/// another node has or will have, nor publish `localhost` or a package
/// index's name into every node's `/etc/hosts`.
pub fn check_own_name(hostname: &str, own: &[String]) -> Result<(), String> {
    if own.is_empty() {
        return Ok(());
    }
    let (first, rest) = hostname.split_once('.').unwrap_or((hostname, ""));
    let domain_ok = rest.is_empty() || rest == "internal" || rest.ends_with(".internal");
    if domain_ok && own.iter().any(|n| n.eq_ignore_ascii_case(first)) {
        return Ok(());
    }
    Err(format!("facts.hostname: {} is not this node's name ({})", shown(hostname), own.join(" or ")))
}

/// The facts a node reports about itself.
pub fn check_facts(f: &Facts) -> Result<(), String> {
    check_hostname(&f.hostname).map_err(|e| format!("facts.hostname: {e}"))?;
    // (0: the agent could not tell; counted as one worker.)
    if f.logical_cores > MAX_CORES {
        return Err(format!("facts.logical_cores: {} (at most {MAX_CORES})", f.logical_cores));
    }
    if f.memory_bytes > MAX_MEMORY_BYTES {
        return Err(format!("facts.memory_bytes: {} (at most {MAX_MEMORY_BYTES})", f.memory_bytes));
    }
    if f.addresses.len() > MAX_ADDRESSES {
        return Err(format!("facts.addresses: {} addresses, at most {MAX_ADDRESSES}", f.addresses.len()));
    }
    for a in &f.addresses {
        if a.parse::<IpAddr>().is_err() {
            return Err(format!("facts.addresses: {} is not an IP address", shown(a)));
        }
    }
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if f.agent_version.len() > MAX_VERSION || !printable(&f.agent_version) {
        return Err(format!("facts.agent_version: {} is not a version", shown(&f.agent_version)));
    }
    if f.instance_id.len() > MAX_INSTANCE_ID || !printable(&f.instance_id) {
        return Err(format!("facts.instance_id: {} is not an instance id", shown(&f.instance_id)));
    }
    if f.arch.len() > 16 || !f.arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("facts.arch: {} is not an architecture", shown(&f.arch)));
    }
    Ok(())
}

/// One SSH public key line; returns it as `TYPE BASE64 [COMMENT]` (a
/// comment that is not plain printable text is dropped).
pub fn ssh_public_key(value: &str) -> Result<String, String> {
    use base64::Engine;
    let line = value.trim();
    if line.len() > MAX_SSH_KEY {
        return Err(format!("an SSH public key of {} bytes (at most {MAX_SSH_KEY})", line.len()));
    }
    if line.contains(['\n', '\r']) {
        return Err("an SSH public key must be one line".into());
    }
    let mut parts = line.split_ascii_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("not an SSH public key (TYPE BASE64 [COMMENT])".into());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!("{} is not an SSH key type this cluster accepts", shown(kind)));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the key is not valid base64".to_string())?;
    // The blob starts with the type again: uint32 length, then the name.
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return Err(format!("the key's blob is not a {kind} key"));
    }
    // A comment is kept when it is plain printable text (it follows the
    // key, where neither authorized_keys nor known_hosts reads options).
    let comment = parts.collect::<Vec<_>>().join(" ");
    if !comment.is_empty()
        && comment.len() <= 128
        && comment.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Ok(format!("{kind} {b64} {comment}"));
    }
    Ok(format!("{kind} {b64}"))
}

pub use crate::text::prefix;

/// A line for display and logs: control characters replaced by `?`.
pub fn clean_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// Text for display (step output): newlines and tabs kept, every other
/// control character (escape sequences, carriage returns) replaced by `?`.
pub fn clean_text(s: &str) -> String {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !s.chars().any(bad) {
        return s.to_string();
    }
    s.chars().map(|c| if bad(c) { '?' } else { c }).collect()
}

/// A value quoted for an error message: debug-escaped, cut at 80 chars.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    format!("{cut:?}{}", if s.chars().count() > 80 { "..." } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINDXutbB7qRqVzBDiLzGqDUXnJ+ApqvHYmtaUeSjbDK0";

    fn facts(host: &str, addr: &str) -> Facts {
        Facts {
            hostname: host.into(),
            addresses: vec![addr.into()],
            agent_version: "0.1.0".into(),
            logical_cores: 2,
            ..Default::default()
        }
    }

    #[test]
    fn host_names_follow_rfc_1123() {
        for ok in ["slave-0001", "ip-10-0-0-7.ec2.internal", "a", "x1"] {
            assert_eq!(check_hostname(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "x\n# END ddisco\n10.0.0.9 master",
            "-oProxyCommand=sh",
            "a b",
            "a..b",
            "trailing-",
            "under_score",
            "10.0.0.1",
            &"a".repeat(64),
            &["a"; 130].join("."),
        ] {
            assert!(check_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_node_has_its_own_name() {
        let own = ["slave-0003".to_string()];
        assert_eq!(check_own_name("slave-0003", &own), Ok(()));
        for bad in ["slave-0004", "localhost", "pypi.org", "slave-0003.pypi.org"] {
            assert!(check_own_name(bad, &own).is_err(), "{bad}");
        }
        let ec2 = ["ip-10-0-0-7".to_string(), "i-0abc".to_string()];
        for ok in ["ip-10-0-0-7", "ip-10-0-0-7.ec2.internal", "i-0abc.us-east-1.compute.internal"] {
            assert_eq!(check_own_name(ok, &ec2), Ok(()), "{ok}");
        }
        assert!(check_own_name("ip-10-0-0-8", &ec2).is_err(), "the next node's name");
        // Unknown to the provider: any (checked, unique) name.
        assert_eq!(check_own_name("anything", &[]), Ok(()));
    }

    #[test]
    fn claims_of_capacity_are_bounded() {
        let f = facts("s1", "10.0.0.7");
        for cores in [MAX_CORES + 1, u32::MAX] {
            let e = check_facts(&Facts { logical_cores: cores, ..f.clone() }).unwrap_err();
            assert!(e.starts_with("facts.logical_cores"), "{e}");
        }
        assert!(check_facts(&Facts { memory_bytes: u64::MAX, ..f.clone() }).is_err());
        assert_eq!(check_facts(&Facts { logical_cores: MAX_CORES, ..f }), Ok(()));
    }

    #[test]
    fn facts_need_addresses_that_parse_and_printable_versions() {
        assert_eq!(check_facts(&facts("s1", "10.0.0.7")), Ok(()));
        assert_eq!(check_facts(&facts("s1", "::1")), Ok(()));
        let e = check_facts(&facts("s1", "10.0.0.7 master")).unwrap_err();
        assert!(e.starts_with("facts.addresses"), "{e}");
        let e = check_facts(&facts("s1\nx", "10.0.0.7")).unwrap_err();
        assert!(e.starts_with("facts.hostname") && !e.contains('\n'), "{e}");
        let mut f = facts("s1", "10.0.0.7");
        f.agent_version = "1.0\u{1b}[2J".into();
        assert!(check_facts(&f).unwrap_err().starts_with("facts.agent_version"));
        f.agent_version = "1".into();
        f.addresses = vec!["10.0.0.1".into(); MAX_ADDRESSES + 1];
        assert!(check_facts(&f).is_err());
    }

    #[test]
    fn ssh_keys_are_one_line_of_a_known_type_whose_blob_agrees() {
        assert_eq!(
            ssh_public_key(&format!("{ED25519} root@host\n")).unwrap(),
            format!("{ED25519} root@host")
        );
        assert_eq!(ssh_public_key(&format!("{ED25519} a\u{1b}[2J")).unwrap(), ED25519, "comment dropped");
        for bad in [
            format!("{ED25519}\n@cert-authority * {ED25519}"),
            ED25519.replace("ssh-ed25519", "ssh-rsa"),
            ED25519.replace("AAAAC3", "!!!!C3"),
            format!("-oProxyCommand {}", ED25519.split(' ').nth(1).unwrap()),
            "ssh-ed25519".into(),
            String::new(),
            format!("ssh-ed25519 {}", "A".repeat(MAX_SSH_KEY)),
        ] {
            assert!(ssh_public_key(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn text_for_display_loses_control_characters() {
        assert_eq!(clean_line("a\u{1b}[31mb\nc"), "a?[31mb?c");
        assert_eq!(clean_text("line 1\n\tline 2\r\u{7}"), "line 1\n\tline 2??");
        assert_eq!(clean_line("plain"), "plain");
    }
}
