//! What the EC2 tests need besides moto itself (see
//! shared/docs/ec2-emulation-notes.md):
//!
//! - [`moto`]: one moto server per test process, with its validation on.
//! - [`Hypervisor`]: plays the cloud's hypervisor, which moto lacks. It
//!   watches moto for a cluster's instances, reads each one's UserData back
//!   from moto and runs it as a local node (like the local provider does),
//!   with a per-instance metadata service (IMDSv2 token, instance-id,
//!   ami-launch-index, instance-type, zone, local-ipv4, and the
//!   `spot/instance-action` / rebalance notices a test can set, and the
//!   instance identity document, signed like AWS signs it but with the test
//!   key of `tests/fixtures/`: [`IDENTITY_CERTIFICATE`] is what the
//!   controller must be told to trust). Terminating the instance in moto
//!   kills its node. Instances a test holds are not booted until it
//!   releases them. Each instance's folder is its disk: one launched from
//!   an image made of another instance (CreateImage) starts with a copy of
//!   that instance's folder, as EC2's snapshot would hold it; every first
//!   boot makes SSH host keys and a machine-id (cloud-init's part).
//!   **Test double:** no real instance can boot here.
//! - [`FaultProxy`]: an HTTP proxy in front of moto that counts EC2 calls
//!   per Action and injects faults (capacity errors, throttling, latency)
//!   for chosen Actions, because moto never produces them.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceType};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod hypervisor;
mod model;
mod proxy;

pub use hypervisor::*;
pub use model::Model;
pub use proxy::*;

/// The moto server of this test process: `DDISCO_MOTO_URL` if set, else one
/// started from `.venv-moto/bin/moto_server` (scripts/test installs it).
pub fn moto() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| std::env::var("DDISCO_MOTO_URL").unwrap_or_else(|_| start_moto(&[])))
}

/// A moto server whose only images are those of `amis_json` (moto's
/// `MOTO_AMIS_PATH`), for tests that need particular images to exist.
pub fn moto_with_amis(amis_json: &std::path::Path) -> String {
    start_moto(&[("MOTO_AMIS_PATH", amis_json.to_str().expect("utf-8 path"))])
}

/// Starts a moto server (with its validations on) that lives as long as
/// this test process; returns its URL.
pub fn start_moto(env: &[(&str, &str)]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let server = std::env::var_os("DDISCO_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-moto/bin/moto_server"));
    assert!(
        server.exists(),
        "{} is missing: the EC2 tests need moto (scripts/test installs it: \
         python3 -m venv .venv-moto && .venv-moto/bin/pip install 'moto[server]')",
        server.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // moto runs under a watchdog shell that kills it when this process's
    // end of the stdin pipe closes, i.e. when the test process exits.
    let script = r#"
        "$0" -H 127.0.0.1 -p "$1" >/dev/null 2>&1 &
        m=$!
        cat >/dev/null
        kill "$m"
    "#;
    let child = Command::new("sh")
        .args(["-c", script])
        .arg(&server)
        .arg(port.to_string())
        .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
        .env("MOTO_ENABLE_AMI_VALIDATION", "true")
        .env("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    // Keep the pipe open for the life of the process.
    std::mem::forget(child);
    let url = format!("http://127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "moto did not start on {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
    url
}

/// Environment for anything that talks to moto with the AWS SDK.
pub fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// An SDK client for moto (directly, not through the proxy).
pub async fn client(endpoint: &str) -> Client {
    let creds = aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test");
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    Client::new(&cfg)
}

/// Creates an IAM instance profile in moto (IAM query API; moto routes the
/// request by the service named in the credential scope and checks no
/// signature) and returns its ARN.
pub fn create_instance_profile(endpoint: &str, name: &str) -> String {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let body = format!("Action=CreateInstanceProfile&InstanceProfileName={name}&Version=2010-05-08");
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20261126/us-east-1/iam/aws4_request, \
         SignedHeaders=host, Signature=00\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(addr).expect("connect to moto");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let arn = resp.split("<Arn>").nth(1).and_then(|r| r.split("</Arn>").next());
    arn.unwrap_or_else(|| panic!("CreateInstanceProfile failed: {resp}")).to_string()
}

/// The id of the default security group in moto.
pub async fn default_sg(c: &Client) -> String {
    let r = c.describe_security_groups().group_names("default").send().await.expect("default sg");
    r.security_groups()[0].group_id().unwrap().to_string()
}

/// One instance of a cluster, as moto reports it.
#[derive(Debug, Clone)]
pub struct Inst {
    pub id: String,
    pub state: String,
    pub instance_type: String,
    /// Its availability zone.
    pub zone: String,
    pub lifecycle: String,
    pub image_id: String,
    /// ARN of the instance profile attached at launch.
    pub iam_profile: String,
    pub tags: HashMap<String, String>,
    pub launch_index: i32,
    /// When EC2 launched it (unix seconds; 0: not said).
    pub launch_time: i64,
}

impl Inst {
    /// How long ago it was launched.
    pub fn age(&self) -> Duration {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        Duration::from_secs(now.saturating_sub(self.launch_time).max(0) as u64)
    }
}

/// Every instance carrying the cluster's tag.
pub async fn instances(c: &Client, tag_key: &str) -> Vec<Inst> {
    let f = Filter::builder().name(format!("tag:{tag_key}")).values("master").values("slave").build();
    let r = c.describe_instances().filters(f).send().await.expect("describe");
    r.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| Inst {
            id: i.instance_id().unwrap().to_string(),
            state: i.state().and_then(|s| s.name()).map(|s| s.as_str().to_string()).unwrap_or_default(),
            instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
            zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
            lifecycle: i.instance_lifecycle().map(|l| l.as_str().to_string()).unwrap_or_default(),
            image_id: i.image_id().unwrap_or_default().to_string(),
            iam_profile: i.iam_instance_profile().and_then(|p| p.arn()).unwrap_or_default().to_string(),
            tags: i
                .tags()
                .iter()
                .map(|t| (t.key().unwrap_or("").into(), t.value().unwrap_or("").into()))
                .collect(),
            launch_index: i.ami_launch_index().unwrap_or(0),
            launch_time: i.launch_time().map(|t| t.secs()).unwrap_or(0),
        })
        .collect()
}

pub fn live(v: &[Inst]) -> Vec<&Inst> {
    v.iter().filter(|i| i.state == "running" || i.state == "pending").collect()
}
