//! The commented configuration `ddisco-controller init` prints.

use super::DASK_VERSION;

/// The commented configuration `ddisco-controller init` prints. Parsing it
/// gives exactly `Config::default()` (a unit test holds them together).
/// Long by design: it is the file's text, key by key, in one place.
pub fn template(mgmt_key: Option<&str>) -> String {
    let mgmt = mgmt_key.unwrap_or("").trim();
    format!(
        r#"# ddisco cluster configuration (TOML). Every setting is shown with its default.
# The original disposabledisco config.json (upper-case keys) is accepted as-is too.

# Where nodes run: "local" (processes on this machine, no cloud account) or "ec2".
provider = "local"
# EC2 region; empty: the standard AWS chain (AWS_REGION, profile).
region = ""
# Marks every resource of this cluster; must be unique per cluster.  (TAG_KEY)
tag_key = "ddisco"
# Number of slaves; change a running cluster with `ddisco-controller scale N`.  (NUM_SLAVES)
num_slaves = 0
# Map/reduce engine the nodes run: "disco", "dask" or "none".
engine = "disco"
# A slave being removed is drained (Disco: blacklisted; Dask: retired) this
# long before it is terminated; 0: terminate at once.
drain_timeout_secs = 60.0
# Spend cap in USD over the cost estimate status shows (every node, replaced
# and on-demand ones included); 0: none. At 80% an event and a warning; at
# 100% nothing more is launched and, with on_budget = "destroy", the cluster
# is destroyed ("stop-launching": it keeps what runs).
max_spend_usd = 0.0
on_budget = "destroy"
# Destroy the cluster once it has been idle this long (minutes; 0: never):
# at its size, every node ready, and no work in the engine (Dask: no task
# processing or waiting and no client; Disco: no active job).
autostop_idle_mins = 0.0
# `scale MIN..MAX` (adaptive size): the size grows at once to the engine's
# target and shrinks only after the target stayed lower this long.
adaptive_cooldown_secs = 60.0
# Dead man's switch: a node that has had no session with this controller for
# this long (seconds; 0: never) shuts itself down, so a cluster whose
# controller died stops billing (EC2: the instance powers off and is
# terminated). A controller back within it keeps every node.
orphan_timeout_secs = 3600.0
# Destroy the cluster this long after it was started (minutes; 0: never),
# whatever runs on it: a hard limit on what a forgotten cluster costs.
max_runtime_mins = 0.0
# A failed node is terminated (its step output stays in status and `logs`)
# and replaced; the same step failing on failure_budget nodes within
# failure_window_mins stops replacing them (0: always replace) until the
# oldest of those failures leaves the window.
failure_budget = 3
failure_window_mins = 30.0
# Engine workers per node = max(1, floor(cores x multiplier)).
master_multiplier = 1.0
slave_multiplier = 1.0

# Packages every node gets (apt), then pip requirements (into a virtualenv).
base_packages = ["python3-pip", "python3-venv", "python3-dev", "lighttpd"]
additional_packages = ["git", "libwww-perl", "python3-numpy", "python3-scipy", "libzmq3-dev", "s3cmd", "chrony", "libguess1", "python3-dnspython", "python3-dateutil", "pigz"]
pip_requirements = ["iso8601"]
# Where nodes get their Python packages (pip_requirements and the engine's):
# "controller" prepares them once (cached), serves them over its download
# port and nodes install them with no package index at all; "index": every
# node pip-installs from the package index itself.
pip_source = "controller"
# The nodes' Python, major.minor ("3.12"): the controller prepares wheels
# for it. Empty: this host's python3 (local provider), the Ubuntu image's
# (EC2 with ami = "ubuntu:..."); an AMI by id needs it set.
node_python = ""
# Bash run as root after everything else on every node.
post_init = ""

# EC2 settings (provider = "ec2").
# Image: an official Ubuntu LTS alias ("ubuntu:24.04", "ubuntu:22.04", ...),
# resolved per region and architecture to Canonical's newest server image,
# or an image id (ami-...).
ami = "ubuntu:24.04"
# Spot max price per instance-hour, USD. Empty: none sent, so spot is
# capped at the on-demand price (AWS's recommendation).
max_bid = ""
instance_type = "c5.xlarge"
# Empty: instance_type.
master_instance_type = ""
slave_instance_type = ""
# EC2 key pair for ssh as ssh_user.
key_name = ""
security_groups = []
ssh_user = "ubuntu"
# EC2-compatible endpoint (e.g. moto, LocalStack); empty: AWS.
endpoint_url = ""
# Subnets (and so zones) to launch into, tried in order; empty: default VPC.
subnet_ids = []
# Attempts per EC2 call made by the AWS SDK itself.
ec2_max_attempts = 3
# Run the master on-demand (it holds the cluster together; slaves stay spot).
master_on_demand = false
# Where slaves go: "none" (the cheapest spot price per vCPU with capacity,
# whatever its zone) or "zones" (the zone holding the fewest slaves first,
# then the cheapest there: a zone's loss takes a share, not the cluster).
spread = "none"
# A type/subnet that reported no capacity is skipped this long.
capacity_cooldown_secs = 300.0
# On-demand fallback: "none", "slaves", "master" or "both". A pool whose spot
# launches failed for capacity or price fallback_failures times, or whose
# spot nodes were interrupted fallback_interruptions times, within
# fallback_window_secs launches on-demand until that many seconds pass
# quietly; then new nodes are spot again, and its on-demand slaves are
# replaced by spot ones at the next scale change or once the cluster has been
# idle (every node's load below 0.1 per core) for
# on_demand_idle_replace_secs (0: only at scale changes).
on_demand_fallback = "none"
fallback_failures = 3
fallback_interruptions = 3
fallback_window_secs = 900.0
on_demand_idle_replace_secs = 600.0
# Instance profile (name or ARN) for every node: jobs reach S3 through the
# instance role; no AWS key ever goes to a node.
iam_instance_profile = ""
# EC2 may refuse an instance profile created moments ago ("Invalid IAM
# Instance Profile") until IAM has propagated it: launches retry with backoff
# this long after the first refusal before it counts as a configuration error.
iam_propagation_secs = 120.0
# Agents prove which instance they run on with the instance identity
# document AWS signs. Empty: AWS's certificate for every region but Hong
# Kong, Bahrain, Cape Town, Milan, China and GovCloud (there, give the path
# of the region's certificate from the EC2 user guide).
identity_certificate = ""
# Scratch space: instance-store volumes (striped if several) are formatted
# and mounted here; without instance store, a directory on the root volume.
scratch_path = "/mnt"
# Root volume of every node, GiB (gp3); 0: the image's size (8 GiB for
# Ubuntu). Types without instance store keep scratch on it: give them room.
root_volume_gb = 0
# Slave pools: different instance types with counts (instead of num_slaves).
# Types are tried in order on capacity errors, then the other pools' types.
# [[slave_pools]]
# name = "c5"
# instance_types = ["c5.xlarge", "c5a.xlarge"]
# count = 10
# [[slave_pools]]
# name = "m5"
# instance_types = ["m5.xlarge"]
# count = 10
# Public keys (one per line) added to every node's authorized_keys.
mgmt_key = "{mgmt}"

# Disco engine: install source ("git+URL@REF" or a tarball URL, built with
# make install / make install-node; empty: Disco is preinstalled on the AMI),
# its port, DISCO_ROOT (instance store) and DISCO_GC_AFTER.
disco_source = "git+https://github.com/discoproject/disco.git@0.5.4"
disco_port = 8989
disco_root = "/mnt/disco"
disco_gc_after = 6400
# Where Disco lives on the nodes (DISCO_HOME): a relocatable build made by
# scripts/build-disco (run with python3 <home>/bin/disco); empty: installed
# by make install (/usr/lib/disco, `disco` on PATH).
disco_home = ""
# The Disco build to install on every node: the disco.tar.gz scripts/build-disco
# writes next to the home it prints. The controller serves it; each node
# checks its SHA-256 and unpacks it into disco_home (empty: /opt/disco).
disco_bundle = ""

# Dask engine: version installed with pip on every node; Dask's optional
# parts installed with it (dask[distributed,...]): "dataframe" (pandas,
# pyarrow) for dask.dataframe, "array" for dask.array; scheduler and
# dashboard ports on the master.
dask_version = "{dask}"
dask_extras = []
dask_scheduler_port = 8786
dask_dashboard_port = 8787

# Dashboard and Prometheus /metrics (HTTP). Local by default; any other
# address requires dashboard_token (16 characters at least): browsers sign
# in once on the page (a session cookie), scripts send it as
# "Authorization: Bearer <token>".
dashboard_listen = "127.0.0.1:7445"
dashboard_token = ""

# Controller.
# gRPC (agents, TLS) and agent download (HTTPS) listen addresses.
listen = "127.0.0.1:7443"
download_listen = "127.0.0.1:7444"
# Host name or IP nodes use to reach the controller; empty: the listen IP
# (127.0.0.1 when listening on 0.0.0.0), or with provider = "ec2" on an EC2
# instance, its private IP (and loopback listen addresses bind it).
advertise = ""
# CA, certificates, node records, admin socket, local nodes. Relative paths
# are resolved against this file's folder.
state_dir = ".ddisco"
heartbeat_interval_secs = 5.0
# A node silent for this long is lost and replaced.
heartbeat_timeout_secs = 15.0
# A node that has not enrolled this long after launch is replaced.
boot_timeout_secs = 600.0
# Lifetime of a node's one-time bootstrap token.
token_ttl_secs = 3600.0
# Lifetime of a node's client certificate; agents renew it over their
# session when a third of it is left.
cert_validity_secs = 2592000.0
reconcile_interval_secs = 2.0
# The agent binary served to nodes; empty: ddisco-agent next to this program.
agent_binary = ""
# The arm64 agent for Graviton types (scripts/build-agent --arch arm64); empty:
# pools of arm64 types are refused at start. Nodes pick theirs by `uname -m`.
agent_binary_arm64 = ""
# Local provider: install missing apt packages on this host (changes the host!).
local_install_packages = false
# Local provider: every node a machine of its own (root only): its own network
# (an address on a bridge this controller creates and listens on), host name,
# /etc, /home, /root, /opt, /mnt, /tmp and processes, and an sshd. The Disco
# engine needs it (the master takes its slaves over SSH).
local_machines = false
"#,
        dask = DASK_VERSION,
    )
}
