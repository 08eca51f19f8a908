//! Facts about this node, reported at enrollment and in every hello.

use crate::model::Facts;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, Networks, RefreshKind, System};

/// Facts from this machine, completed from instance metadata when there is
/// an instance metadata service.
pub async fn gather_with(imds: Option<&crate::imds::Imds>) -> Facts {
    let mut f = gather();
    if let Some(imds) = imds {
        if let Ok(Some(id)) = imds.get("instance-id").await {
            f.instance_id = id.trim().to_string();
        }
        if let Ok(Some(ip)) = imds.get("local-ipv4").await
            && !ip.trim().is_empty()
        {
            f.addresses.retain(|a| a != ip.trim());
            f.addresses.insert(0, ip.trim().to_string());
        }
    }
    f
}

/// The 1-minute load average x 1000, from `/proc/loadavg` (or the file
/// `DDISCO_LOADAVG_FILE` names: the test hypervisor's stand-in for a node's
/// own kernel). `None` if it cannot be read.
pub fn load_milli() -> Option<u32> {
    let path = std::env::var_os("DDISCO_LOADAVG_FILE")
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .unwrap_or_else(|| "/proc/loadavg".into());
    let text = std::fs::read_to_string(path).ok()?;
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> Option<u32> {
    let load1: f64 = text.split_whitespace().next()?.parse().ok()?;
    (load1.is_finite() && load1 >= 0.0).then(|| (load1 * 1000.0).round().min(u32::MAX as f64) as u32)
}

pub fn gather() -> Facts {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .ok();
    let cores = sys
        .as_ref()
        .map(|s| s.cpus().len())
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    // The provider may fix the node's address (the local provider's
    // loopback IPs); otherwise report the non-loopback interface addresses.
    let addresses = match std::env::var("DDISCO_NODE_ADDR") {
        Ok(a) if !a.is_empty() => vec![a],
        _ => Networks::new_with_refreshed_list()
            .map(|nets| {
                let mut v: Vec<String> = nets
                    .values()
                    .flat_map(|n| n.ip_networks().iter().map(|ip| ip.addr))
                    .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                    .map(|ip| ip.to_string())
                    .collect();
                v.sort();
                v.dedup();
                v
            })
            .unwrap_or_default(),
    };
    Facts {
        instance_id: std::env::var("DDISCO_INSTANCE_ID").unwrap_or_default(),
        hostname: std::env::var("DDISCO_HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| System::host_name().ok())
            .unwrap_or_default(),
        addresses,
        logical_cores: cores as u32,
        memory_bytes: sys.map(|s| s.total_memory()).unwrap_or(0),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix_ms: started_unix_ms(),
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// Now, in unix ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When this process started (unix ms), taken once.
pub fn started_unix_ms() -> u64 {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(unix_ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loadavg_is_parsed_to_thousandths() {
        assert_eq!(super::parse_loadavg("0.42 0.30 0.20 1/123 4567\n"), Some(420));
        assert_eq!(super::parse_loadavg("3.00 1 1 1/1 1"), Some(3000));
        assert_eq!(super::parse_loadavg(""), None);
        assert_eq!(super::parse_loadavg("x"), None);
        assert!(super::load_milli().is_some(), "this Linux machine has /proc/loadavg");
    }
}
