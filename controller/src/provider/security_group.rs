//! The security group a cluster needs, as plain data: which rules, which
//! of them are missing from what exists, and where SSH may come from. The
//! EC2 calls that read and change groups are in `ec2.rs`.
//!
//! The rules (those of the original disposabledisco's README):
//! - all TCP and all UDP between members of the group (Disco, Dask and
//!   SSH between nodes);
//! - SSH (TCP 22) from one CIDR, the operator's;
//! - when the controller runs in another group: the controller's agent
//!   (gRPC) and download ports, in *that* group, from this one (nodes dial
//!   out to the controller; nothing dials in to nodes from it).

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    /// Every protocol (`-1`): covers both others.
    All,
}

impl Proto {
    pub fn as_ec2(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::All => "-1",
        }
    }

    pub fn from_ec2(s: &str) -> Option<Proto> {
        match s {
            "tcp" | "6" => Some(Proto::Tcp),
            "udp" | "17" => Some(Proto::Udp),
            "-1" | "all" => Some(Proto::All),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Members of a security group (its id).
    Group(String),
    Cidr(String),
}

/// One ingress rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub proto: Proto,
    pub from_port: u16,
    pub to_port: u16,
    pub source: Source,
}

impl Rule {
    /// Does this (existing) rule allow everything `other` allows?
    pub fn covers(&self, other: &Rule) -> bool {
        let proto = self.proto == Proto::All || self.proto == other.proto;
        let ports =
            self.proto == Proto::All || (self.from_port <= other.from_port && other.to_port <= self.to_port);
        proto && ports && self.source == other.source
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::All => "all traffic",
        };
        let ports = match (self.from_port, self.to_port) {
            (0, 65535) => "all ports".to_string(),
            (a, b) if a == b => format!("port {a}"),
            (a, b) => format!("ports {a}-{b}"),
        };
        let src = match &self.source {
            Source::Group(g) => format!("members of {g}"),
            Source::Cidr(c) => c.clone(),
        };
        write!(f, "{proto} {ports} from {src}")
    }
}

/// The rules of the cluster's own group `group_id`.
pub fn node_rules(group_id: &str, ssh_from: Option<&str>) -> Vec<Rule> {
    let own = Source::Group(group_id.to_string());
    let mut v = vec![
        Rule { proto: Proto::Tcp, from_port: 0, to_port: 65535, source: own.clone() },
        Rule { proto: Proto::Udp, from_port: 0, to_port: 65535, source: own },
    ];
    if let Some(cidr) = ssh_from {
        v.push(Rule {
            proto: Proto::Tcp,
            from_port: 22,
            to_port: 22,
            source: Source::Cidr(cidr.to_string()),
        });
    }
    v
}

/// The rules the controller's group needs so that nodes of `group_id`
/// reach the controller's `ports`.
pub fn controller_rules(group_id: &str, ports: &[u16]) -> Vec<Rule> {
    let mut ports = ports.to_vec();
    ports.sort();
    ports.dedup();
    ports
        .into_iter()
        .map(|p| Rule {
            proto: Proto::Tcp,
            from_port: p,
            to_port: p,
            source: Source::Group(group_id.to_string()),
        })
        .collect()
}

/// The wanted rules that no existing rule covers.
pub fn missing(wanted: &[Rule], existing: &[Rule]) -> Vec<Rule> {
    wanted.iter().filter(|w| !existing.iter().any(|e| e.covers(w))).cloned().collect()
}

/// Where SSH may come from: `--ssh-from` if given, else the address the
/// caller is logged in from (`SSH_CLIENT`), else `Err` asking for it.
/// `Ok(None)`: no SSH rule (`--no-ssh`).
pub fn ssh_source(
    explicit: Option<&str>,
    no_ssh: bool,
    ssh_client: Option<&str>,
) -> Result<Option<String>, String> {
    if no_ssh {
        return Ok(None);
    }
    if let Some(c) = explicit {
        return normalize_cidr(c).map(Some);
    }
    let from_env =
        ssh_client.and_then(|v| v.split_whitespace().next()).and_then(|ip| ip.parse::<IpAddr>().ok());
    match from_env {
        Some(ip @ IpAddr::V4(_)) => Ok(Some(format!("{ip}/32"))),
        Some(ip @ IpAddr::V6(_)) => Ok(Some(format!("{ip}/128"))),
        None => Err("cannot tell which address you connect from, so SSH would be opened to nobody or to \
                     everybody: pass --ssh-from CIDR (your address, e.g. 203.0.113.7/32; \
                     `curl -s https://checkip.amazonaws.com` shows it) or --no-ssh"
            .into()),
    }
}

/// Checks a CIDR (`a.b.c.d/n`, or an address alone: /32 or /128).
pub fn normalize_cidr(c: &str) -> Result<String, String> {
    let (ip, len) = match c.trim().split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (c.trim(), None),
    };
    let ip: IpAddr =
        ip.parse().map_err(|_| format!("--ssh-from {c:?} is not a CIDR such as 203.0.113.7/32"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        None => max,
        Some(l) => l
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("--ssh-from {c:?}: the prefix length must be 0-{max}"))?,
    };
    Ok(format!("{ip}/{len}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rules_are_those_not_covered() {
        let want = node_rules("sg-1", Some("198.51.100.7/32"));
        assert_eq!(want.len(), 3);
        assert_eq!(missing(&want, &[]), want);
        // An all-traffic rule from the group covers TCP and UDP; SSH is still missing.
        let all = Rule { proto: Proto::All, from_port: 0, to_port: 0, source: Source::Group("sg-1".into()) };
        assert_eq!(missing(&want, &[all]), vec![want[2].clone()]);
        // A narrower existing range does not cover all ports; another group does not count.
        let narrow =
            Rule { proto: Proto::Tcp, from_port: 0, to_port: 1024, source: Source::Group("sg-1".into()) };
        let other =
            Rule { proto: Proto::Udp, from_port: 0, to_port: 65535, source: Source::Group("sg-2".into()) };
        assert_eq!(missing(&want, &[narrow, other]).len(), 3);
        assert!(missing(&want, &want).is_empty());
        assert_eq!(controller_rules("sg-1", &[7444, 7443, 7443]).len(), 2);
        assert_eq!(want[2].to_string(), "TCP port 22 from 198.51.100.7/32");
        assert_eq!(want[0].to_string(), "TCP all ports from members of sg-1");
    }

    #[test]
    fn ssh_source_is_explicit_or_the_callers_address_or_refused() {
        assert_eq!(
            ssh_source(Some("198.51.100.7"), false, None).unwrap().as_deref(),
            Some("198.51.100.7/32")
        );
        assert_eq!(ssh_source(Some("10.0.0.0/8"), false, None).unwrap().as_deref(), Some("10.0.0.0/8"));
        assert!(ssh_source(Some("10.0.0.0/33"), false, None).is_err());
        assert!(ssh_source(Some("somewhere"), false, None).is_err());
        let env = Some("203.0.113.9 51234 22");
        assert_eq!(ssh_source(None, false, env).unwrap().as_deref(), Some("203.0.113.9/32"));
        assert_eq!(
            ssh_source(None, false, Some("2001:db8::1 5 22")).unwrap().as_deref(),
            Some("2001:db8::1/128")
        );
        assert!(ssh_source(None, false, None).unwrap_err().contains("--ssh-from"));
        assert_eq!(ssh_source(None, true, env).unwrap(), None);
    }
}
