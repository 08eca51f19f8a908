//! The boot script every node runs (EC2 userdata; the local provider runs the
//! same script with `sh`). It fetches the agent from the controller over
//! HTTPS (trusting only the cluster CA), refuses a binary whose SHA-256
//! differs from the one written here, and starts it with the bootstrap token.
//!
//! **Invariant:** the bootstrap token is the only secret in userdata.

use serde::Serialize;

/// What the agent reads from `bootstrap.json`.
#[derive(Debug, Serialize)]
pub struct Bootstrap<'a> {
    pub controller: &'a str,
    pub server_name: &'a str,
    pub ca_sha256: &'a str,
    /// Instance metadata service (EC2); the agent picks its slot by its
    /// launch index there when there are several slots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imds: Option<&'a str>,
    /// One per instance of the launch call, in launch-index order.
    pub slots: Vec<Slot<'a>>,
    /// The dead man's switch: seconds without a session before the node
    /// shuts itself down (0: never), and how (`Provider::orphan_action`).
    pub orphan_timeout_secs: u64,
    pub orphan_action: &'static str,
}

/// A node and its one-time bootstrap token (`Debug` leaves it out).
#[derive(Serialize)]
pub struct Slot<'a> {
    pub node_id: &'a str,
    pub token: &'a str,
}

impl std::fmt::Debug for Slot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("node_id", &self.node_id).field("token", &"<redacted>").finish()
    }
}

pub struct Userdata<'a> {
    pub bootstrap: Bootstrap<'a>,
    pub ca_pem: &'a str,
    pub agent_url: &'a str,
    pub agent_sha256: &'a str,
    /// The arm64 agent (URL, SHA-256), if served: a node whose `uname -m`
    /// says aarch64 fetches it instead.
    pub agent_arm64: Option<(&'a str, &'a str)>,
    /// Folder on the node for the agent and its identity (EC2:
    /// `/var/lib/ddisco`; the local provider overrides it with DDISCO_HOME).
    pub default_home: &'a str,
}

impl Userdata<'_> {
    pub fn render(&self) -> String {
        let boot = serde_json::to_string(&self.bootstrap).expect("bootstrap serializes");
        format!(
            r#"#!/bin/sh
# ddisco node bootstrap (generated). Holds a one-time bootstrap token.
set -eu
umask 077
D="${{DDISCO_HOME:-{home}}}"
mkdir -p "$D"
cd "$D"
cat > ca.pem <<'DDISCO_CA_EOF'
{ca}DDISCO_CA_EOF
cat > bootstrap.json <<'DDISCO_BOOT_EOF'
{boot}
DDISCO_BOOT_EOF
url='{url}'
sum='{sum}'
case "$(uname -m)" in
  x86_64|amd64) ;;
{arm}  *)
    echo "ddisco: no agent for this machine's architecture ($(uname -m)); use x86_64 or arm64 instance types" >&2
    exit 1 ;;
esac
fetch() {{
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --retry 3 --connect-timeout 10 --max-time 300 --cacert ca.pem -o ddisco-agent.part "$url"
  else
    wget -q --timeout=60 --ca-certificate=ca.pem -O ddisco-agent.part "$url"
  fi
}}
# A node that cannot start its agent does not run on without a purpose.
halt() {{
  echo "ddisco: $1" >&2
{halt}  exit 1
}}
# An image baked by `ddisco-controller bake` may hold this very agent.
if [ -f ddisco-agent ] && [ ! -L ddisco-agent ] && echo "$sum  ddisco-agent" | sha256sum -c - >/dev/null 2>&1; then
  echo "ddisco: agent already on this machine ($sum), starting"
else
start=$(date +%s)
until fetch; do
  if [ $(($(date +%s) - start)) -ge {give_up} ]; then
    halt "cannot download the agent from $url for {give_up}s; is the controller running and reachable?"
  fi
  sleep 2
done
if ! echo "$sum  ddisco-agent.part" | sha256sum -c - >/dev/null 2>&1; then
  rm -f ddisco-agent.part
  halt "the agent binary from $url does not have SHA-256 $sum: refusing to run it"
fi
chmod 0700 ddisco-agent.part
mv -f ddisco-agent.part ddisco-agent
echo "ddisco: agent verified ($sum), starting"
fi
exec ./ddisco-agent run --dir "$D"
"#,
            home = self.default_home,
            // The download is retried for the switch's window (a controller
            // restarting), a minute at least.
            give_up = self.bootstrap.orphan_timeout_secs.max(60),
            halt = match self.bootstrap.orphan_action {
                "poweroff" =>
                    "  echo \"ddisco: powering off (the instance is terminated)\" >&2\n  \
                               \"${DDISCO_POWEROFF:-poweroff}\" || shutdown -h now || true\n",
                _ => "",
            },
            ca = ensure_newline(self.ca_pem),
            boot = boot,
            url = self.agent_url,
            sum = self.agent_sha256,
            arm = match self.agent_arm64 {
                Some((url, sum)) => format!("  aarch64|arm64) url='{url}'; sum='{sum}' ;;\n"),
                None => "  aarch64|arm64)\n    echo \"ddisco: this controller serves no arm64 agent \
                         (agent_binary_arm64)\" >&2\n    exit 1 ;;\n"
                    .into(),
            },
        )
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') { s.to_string() } else { format!("{s}\n") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_token() {
        let slot = || Slot { node_id: "slave-0001", token: "tok-secret-123" };
        let boot = Bootstrap {
            controller: "c",
            server_name: "s",
            ca_sha256: "x",
            imds: None,
            slots: vec![slot()],
            orphan_timeout_secs: 0,
            orphan_action: "exit",
        };
        let shown = format!("{:?} {boot:?}", slot());
        assert!(!shown.contains("tok-secret-123") && shown.contains("slave-0001"), "{shown}");
    }

    #[test]
    fn carries_what_the_node_needs_and_no_other_secret() {
        let u = Userdata {
            bootstrap: Bootstrap {
                controller: "https://10.0.0.1:7443",
                server_name: "ddisco-controller",
                ca_sha256: "ab",
                imds: None,
                slots: vec![Slot { node_id: "slave-0001", token: "tok123" }],
                orphan_timeout_secs: 3600,
                orphan_action: "poweroff",
            },
            ca_pem: "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----",
            agent_url: "https://10.0.0.1:7444/agent/ddisco-agent",
            agent_sha256: "deadbeef",
            agent_arm64: None,
            default_home: "/var/lib/ddisco",
        }
        .render();
        assert!(u.starts_with("#!/bin/sh\n"));
        assert!(u.contains("\"slots\":[{\"node_id\":\"slave-0001\",\"token\":\"tok123\"}]"), "{u}");
        assert!(u.contains("sum='deadbeef'"));
        assert!(u.contains("--cacert ca.pem"));
        assert!(u.contains("-----END CERTIFICATE-----\nDDISCO_CA_EOF"));
        assert!(!u.contains("BEGIN PRIVATE KEY"));
        // The switch reaches the agent; a node that cannot start it powers off.
        assert!(u.contains("\"orphan_timeout_secs\":3600,\"orphan_action\":\"poweroff\""), "{u}");
        assert!(u.contains("${DDISCO_POWEROFF:-poweroff}"), "{u}");
        let out = std::process::Command::new("sh").arg("-n").arg("-c").arg(&u).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// The agent a node runs is the one of its architecture (`uname -m`);
    /// checked by running the script's selection in `sh` with a stub
    /// `uname`.
    #[test]
    fn each_architecture_fetches_its_own_agent() {
        let render = |arm: Option<(&str, &str)>| {
            Userdata {
                bootstrap: Bootstrap {
                    controller: "c",
                    server_name: "s",
                    ca_sha256: "x",
                    imds: None,
                    slots: vec![],
                    orphan_timeout_secs: 0,
                    orphan_action: "exit",
                },
                ca_pem: "",
                agent_url: "https://h/agent/ddisco-agent",
                agent_sha256: "aaa",
                agent_arm64: arm,
                default_home: "/tmp",
            }
            .render()
        };
        let pick = |script: &str, machine: &str| {
            // The selection only: from `url=` to the end of the case.
            let start = script.find("url='").unwrap();
            let end = script.find("esac").unwrap() + 4;
            let prog = format!("uname() {{ echo {machine}; }}\n{}\necho \"$url $sum\"", &script[start..end]);
            let out = std::process::Command::new("sh").arg("-c").arg(prog).output().unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let both = render(Some(("https://h/agent/ddisco-agent-arm64", "bbb")));
        assert_eq!(pick(&both, "x86_64"), (true, "https://h/agent/ddisco-agent aaa".into()));
        assert_eq!(pick(&both, "aarch64"), (true, "https://h/agent/ddisco-agent-arm64 bbb".into()));
        assert!(!pick(&both, "riscv64").0);
        let x86_only = render(None);
        assert!(!pick(&x86_only, "aarch64").0, "an arm64 node must not run the x86_64 agent");
    }
}
