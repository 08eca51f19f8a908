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
//!   releases them. **Test double:** no real instance can boot here.
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
    pub lifecycle: String,
    pub image_id: String,
    /// ARN of the instance profile attached at launch.
    pub iam_profile: String,
    pub tags: HashMap<String, String>,
    pub launch_index: i32,
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
            lifecycle: i.instance_lifecycle().map(|l| l.as_str().to_string()).unwrap_or_default(),
            image_id: i.image_id().unwrap_or_default().to_string(),
            iam_profile: i.iam_instance_profile().and_then(|p| p.arn()).unwrap_or_default().to_string(),
            tags: i
                .tags()
                .iter()
                .map(|t| (t.key().unwrap_or("").into(), t.value().unwrap_or("").into()))
                .collect(),
            launch_index: i.ami_launch_index().unwrap_or(0),
        })
        .collect()
}

pub fn live(v: &[Inst]) -> Vec<&Inst> {
    v.iter().filter(|i| i.state == "running" || i.state == "pending").collect()
}

// --------------------------------------------------------------------------
// Hypervisor
// --------------------------------------------------------------------------

/// A metadata service for the controller's own machine (IMDSv2), saying
/// its private address is `ip`: what `serve` sees on an EC2 instance.
/// Returns its URL (for `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
pub fn controller_imds(rt: &tokio::runtime::Runtime, ip: &str) -> String {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let ip = ip.to_string();
    // Like EC2's, the token's answer says its lifetime (the AWS SDK needs it).
    let token = || async { ([("x-aws-ec2-metadata-token-ttl-seconds", "21600")], "controller-imds-token") };
    let app = axum::Router::new().route("/latest/api/token", put(token)).route(
        "/latest/meta-data/local-ipv4",
        get(move |headers: HeaderMap| {
            let ip = ip.clone();
            async move {
                if headers.get("X-aws-ec2-metadata-token").is_none() {
                    return (StatusCode::UNAUTHORIZED, "IMDSv2 token required").into_response();
                }
                ip.into_response()
            }
        }),
    );
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

/// The certificate of the key the test metadata services sign identity
/// documents with (tests/fixtures; stands in for AWS's, which nobody here
/// can sign with).
pub fn identity_certificate() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/imds-test-cert.pem")
}

/// The instance identity document of `i` (AWS's layout) and its base64
/// RSA-SHA256 signature by the test key: what a process on that instance
/// reads from its metadata service.
pub fn identity_of(i: &Inst, ip: &str, zone: &str) -> (String, String) {
    let doc = format!(
        "{{\n  \"accountId\" : \"123456789012\",\n  \"architecture\" : \"x86_64\",\n  \
         \"availabilityZone\" : \"{zone}\",\n  \"imageId\" : \"{}\",\n  \"instanceId\" : \"{}\",\n  \
         \"instanceType\" : \"{}\",\n  \"pendingTime\" : \"2026-11-27T00:00:00Z\",\n  \
         \"privateIp\" : \"{ip}\",\n  \"region\" : \"us-east-1\",\n  \"version\" : \"2017-09-30\"\n}}",
        i.image_id, i.id, i.instance_type
    );
    let sig = sign(&doc);
    (doc, sig)
}

/// Base64 RSA PKCS #1 v1.5 SHA-256 signature by the test key, wrapped at
/// 64 columns like AWS's.
pub fn sign(doc: &str) -> String {
    let pem =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/imds-test-key.pem"))
            .unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let key = ring::rsa::KeyPair::from_pkcs8(&der).unwrap();
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), doc.as_bytes(), &mut sig)
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
    b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\n")
}

#[derive(Default, Clone)]
struct Meta {
    identity: (String, String),
    instance_id: String,
    instance_type: String,
    launch_index: i32,
    zone: String,
    ip: String,
    instance_action: Option<String>,
    rebalance: Option<String>,
}

struct Booted {
    pid: i32,
    meta: Arc<Mutex<Meta>>,
    _imds: tokio::task::JoinHandle<()>,
}

/// Which instances a test keeps from booting.
type Hold = Arc<Mutex<Option<Box<dyn Fn(&Inst) -> bool + Send>>>>;

/// Boots the instances moto reports for one cluster tag as local nodes.
pub struct Hypervisor {
    booted: Arc<Mutex<HashMap<String, Booted>>>,
    hold: Hold,
    rt: tokio::runtime::Handle,
    task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
}

impl Hypervisor {
    /// Starts watching moto (directly) for instances tagged `tag_key`.
    pub fn start(rt: &tokio::runtime::Runtime, tag_key: &str) -> Hypervisor {
        Self::start_holding(rt, tag_key, |_| false)
    }

    /// Like `start`, but instances for which `hold` is true are not booted
    /// until [`Hypervisor::release`].
    pub fn start_holding(
        rt: &tokio::runtime::Runtime,
        tag_key: &str,
        hold: impl Fn(&Inst) -> bool + Send + 'static,
    ) -> Hypervisor {
        let dir = tempfile::tempdir().unwrap();
        // The nodes' power button (the agent's `DDISCO_POWEROFF`): the
        // instance's processes end and it is marked powered off; the loop
        // below then does what EC2 does with such an instance.
        let button = dir.path().join("poweroff");
        std::fs::write(&button, "#!/bin/sh\ntouch \"$DDISCO_HOME/powered-off\"\nkill -KILL 0\n").unwrap();
        std::fs::set_permissions(&button, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let booted: Arc<Mutex<HashMap<String, Booted>>> = Arc::default();
        let hold: Hold = Arc::new(Mutex::new(Some(Box::new(hold))));
        let (b, root, tag, h) = (booted.clone(), dir.path().to_path_buf(), tag_key.to_string(), hold.clone());
        let task = rt.spawn(async move {
            let c = client(moto()).await;
            loop {
                let all = instances(&c, &tag).await;
                for i in &all {
                    let known = b.lock().unwrap().contains_key(&i.id);
                    let running = i.state == "running" || i.state == "pending";
                    let held = h.lock().unwrap().as_ref().is_some_and(|f| f(i));
                    if running && !known && !held {
                        match boot(&c, i, &root).await {
                            Ok(node) => {
                                b.lock().unwrap().insert(i.id.clone(), node);
                            }
                            Err(e) => eprintln!("hypervisor: cannot boot {}: {e}", i.id),
                        }
                    } else if !running
                        && known
                        && let Some(node) = b.lock().unwrap().get(&i.id)
                    {
                        kill_group(node.pid);
                    }
                    if running && known && root.join(&i.id).join("powered-off").exists() {
                        let _ = std::fs::remove_file(root.join(&i.id).join("powered-off"));
                        power_off(&c, &i.id).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Hypervisor { booted, hold, rt: rt.handle().clone(), task, dir }
    }

    /// Boots the held instances too (from the next pass on).
    pub fn release(&self) {
        *self.hold.lock().unwrap() = None;
    }

    /// Pid of the node process group booted for an instance.
    pub fn pid(&self, instance_id: &str) -> Option<i32> {
        self.booted.lock().unwrap().get(instance_id).map(|b| b.pid)
    }

    /// Simulates the 2-minute spot interruption notice on an instance.
    pub fn set_instance_action(&self, instance_id: &str) {
        let b = self.booted.lock().unwrap();
        let node = b.get(instance_id).expect("instance booted");
        node.meta.lock().unwrap().instance_action =
            Some(r#"{"action": "terminate", "time": "2026-11-26T12:00:00Z"}"#.to_string());
    }

    /// A spot interruption as EC2 carries it out: the notice now, the
    /// instance terminated `after` later (two minutes on EC2).
    pub fn interrupt(&self, instance_id: &str, after: Duration) {
        self.set_instance_action(instance_id);
        let id = instance_id.to_string();
        self.rt.spawn(async move {
            tokio::time::sleep(after).await;
            let c = client(moto()).await;
            c.terminate_instances()
                .instance_ids(id)
                .send()
                .await
                .expect("terminate the interrupted instance");
        });
    }

    /// What every node's kernel reports as its load (`/proc/loadavg`
    /// format), e.g. "0.00 0.00 0.00 1/100 1" for an idle cluster. Until
    /// this is called, nodes report this machine's own load.
    pub fn set_loadavg(&self, text: &str) {
        std::fs::write(self.dir.path().join("loadavg"), text).unwrap();
    }

    pub fn booted_count(&self) -> usize {
        self.booted.lock().unwrap().len()
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.task.abort();
        for (_, b) in self.booted.lock().unwrap().drain() {
            kill_group(b.pid);
            b._imds.abort();
        }
    }
}

fn kill_group(pid: i32) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

/// An instance powered itself off: EC2 terminates it if it was launched
/// with `InstanceInitiatedShutdownBehavior = terminate`, else stops it
/// (moto's default, as EC2's, is stop).
async fn power_off(c: &Client, id: &str) {
    let behaviour = c
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .ok()
        .and_then(|a| a.instance_initiated_shutdown_behavior().and_then(|v| v.value()).map(String::from));
    let r = if behaviour.as_deref() == Some("terminate") {
        c.terminate_instances().instance_ids(id).send().await.map(|_| ()).map_err(|e| format!("{e:?}"))
    } else {
        c.stop_instances().instance_ids(id).send().await.map(|_| ()).map_err(|e| format!("{e:?}"))
    };
    if let Err(e) = r {
        eprintln!("hypervisor: cannot power {id} off: {e}");
    }
}

/// An instance's userdata, as it reads it from its metadata service.
pub async fn userdata_of(c: &Client, instance_id: &str) -> Result<String, String> {
    let attr = c
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let b64 = attr.user_data().and_then(|u| u.value()).ok_or("no userdata")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

async fn boot(c: &Client, i: &Inst, root: &std::path::Path) -> Result<Booted, String> {
    let userdata = userdata_of(c, &i.id).await?;
    let dir = root.join(&i.id);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("userdata.sh"), userdata).map_err(|e| e.to_string())?;

    let d = c.describe_instances().instance_ids(&i.id).send().await.map_err(|e| format!("{e:?}"))?;
    let inst = d.reservations().first().and_then(|r| r.instances().first()).ok_or("instance vanished")?;
    let zone = inst.placement().and_then(|p| p.availability_zone()).unwrap_or("us-east-1a").to_string();
    let ip = inst.private_ip_address().unwrap_or("").to_string();
    let meta = Arc::new(Mutex::new(Meta {
        identity: identity_of(i, &ip, &zone),
        instance_id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        launch_index: i.launch_index,
        zone,
        ip,
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let imds_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/latest/api/token", put(|| async { "imds-test-token" }))
        .route("/latest/meta-data/{*path}", get(imds_get))
        .route("/latest/dynamic/instance-identity/{part}", get(imds_identity))
        .with_state(meta.clone());
    let imds = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let log = std::fs::File::create(dir.join("console.log")).map_err(|e| e.to_string())?;
    let child: Child = {
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .arg("userdata.sh")
            .current_dir(&dir)
            .env("DDISCO_HOME", &dir)
            .env("DDISCO_IMDS", &imds_url)
            // EC2's host names: ip-10-0-0-7 for 10.0.0.7.
            .env("DDISCO_HOSTNAME", format!("ip-{}", meta.lock().unwrap().ip.replace('.', "-")))
            .env("DDISCO_NOTICE_POLL_MS", "200")
            .env("DDISCO_LOADAVG_FILE", root.join("loadavg"))
            // Never this machine's own `poweroff`.
            .env("DDISCO_POWEROFF", root.join("poweroff"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| e.to_string())?
    };
    let pid = child.id() as i32;
    // Reap it when it exits.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(Booted { pid, meta, _imds: imds })
}

async fn imds_identity(
    State(meta): State<Arc<Mutex<Meta>>>,
    Path(part): Path<String>,
    headers: HeaderMap,
) -> Response {
    if headers.get("X-aws-ec2-metadata-token").is_none() {
        return (StatusCode::UNAUTHORIZED, "IMDSv2 token required").into_response();
    }
    let (doc, sig) = meta.lock().unwrap().identity.clone();
    match part.as_str() {
        "document" => doc.into_response(),
        "signature" => sig.into_response(),
        _ => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn imds_get(
    State(meta): State<Arc<Mutex<Meta>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if headers.get("X-aws-ec2-metadata-token").is_none() {
        return (StatusCode::UNAUTHORIZED, "IMDSv2 token required").into_response();
    }
    let m = meta.lock().unwrap().clone();
    let v = match path.as_str() {
        "instance-id" => Some(m.instance_id),
        "instance-type" => Some(m.instance_type),
        "ami-launch-index" => Some(m.launch_index.to_string()),
        "placement/availability-zone" => Some(m.zone),
        "local-ipv4" => Some(m.ip),
        "spot/instance-action" => m.instance_action,
        "events/recommendations/rebalance" => m.rebalance,
        _ => None,
    };
    match v {
        Some(v) => v.into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

// --------------------------------------------------------------------------
// Fault proxy
// --------------------------------------------------------------------------

/// A fault for requests of one EC2 Action (optionally only those whose form
/// body has `param=value`; param `*`: any parameter has that value, e.g. an
/// instance id at any position of a list).
#[derive(Debug, Clone)]
pub struct Fault {
    pub action: String,
    pub when: Option<(String, String)>,
    pub code: String,
    pub status: u16,
    /// How many more times; `None`: always.
    pub times: Option<u32>,
    /// The error's message (EC2 names the ids it refers to); `None`: a
    /// generic one.
    pub message: Option<String>,
}

/// One call seen: (when, Action, whether a fault was injected, form parameters).
type Call = (Instant, String, bool, Vec<(String, String)>);

/// How the EC2 behind the proxy behaves where moto does not behave like EC2
/// (set per test with [`FaultProxy::set_model`]). **Test double:** these are
/// EC2's documented behaviours, which no emulator here has.
#[derive(Debug, Clone)]
pub struct Model {
    /// Capacity left per instance type (any zone, any market). A
    /// RunInstances asking more than is left launches what is left (EC2
    /// launches the largest number from MinCount to MaxCount it can), or
    /// fails with `InsufficientInstanceCapacity` (HTTP 500, as EC2 answers
    /// it) if even MinCount does not fit. Types not listed: unlimited.
    pub capacity: HashMap<String, u32>,
    /// The account's vCPU quota for running instances (counted over the
    /// instances launched through this proxy): like capacity, what fits is
    /// launched; if not even MinCount fits, `VcpuLimitExceeded` with EC2's
    /// message, which names the limit.
    pub vcpu_quota: Option<u32>,
    /// (moto launches MinCount instances where EC2 launches the most it
    /// can up to MaxCount: the proxy always asks moto for that number.)
    ///
    /// `Unsupported` for a type in a subnet whose zone does not offer it
    /// (moto's own offerings data, e.g. c5.large is not in us-east-1e):
    /// moto launches anything anywhere, EC2 refuses. On by default.
    pub unsupported: bool,
    /// Instances stay out of DescribeInstances answers for this long after
    /// their launch (EC2's eventual consistency).
    pub listing_lag: Duration,
    /// RunInstances answers after this long (a launch that walks slow
    /// candidates).
    pub run_latency: Duration,
    /// RunInstances naming an instance profile fails with "Invalid IAM
    /// Instance Profile" until this moment (a profile created moments ago:
    /// IAM is eventually consistent).
    pub profile_valid_at: Option<Instant>,
    /// The AWS Price List API (`GetProducts`, which moto lacks): Linux
    /// on-demand USD per hour per instance type, answered in AWS's format.
    pub on_demand_usd: HashMap<String, f64>,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            capacity: HashMap::new(),
            vcpu_quota: None,
            unsupported: true,
            listing_lag: Duration::ZERO,
            run_latency: Duration::ZERO,
            profile_valid_at: None,
            // us-east-1's list prices.
            on_demand_usd: [
                ("c5.large", 0.085),
                ("m5.large", 0.096),
                ("c5d.large", 0.096),
                ("m6g.large", 0.077),
            ]
            .into_iter()
            .map(|(t, p)| (t.to_string(), p))
            .collect(),
        }
    }
}

#[derive(Default)]
struct ProxyState {
    calls: Vec<Call>,
    faults: Vec<Fault>,
    model: Model,
    /// Instances launched through the proxy: id -> (when, type).
    launched: HashMap<String, (Instant, String)>,
}

/// Counts EC2 calls per Action and injects faults, in front of moto.
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

impl FaultProxy {
    /// In front of this test process's moto.
    pub fn start(rt: &tokio::runtime::Runtime) -> FaultProxy {
        Self::start_for(rt, moto())
    }

    /// In front of the moto server at `upstream`.
    pub fn start_for(rt: &tokio::runtime::Runtime, upstream: &str) -> FaultProxy {
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let client: HttpClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let shared =
            Shared { state: state.clone(), client, run_lock: Arc::default(), upstream: upstream.to_string() };
        let app = axum::Router::new().fallback(any(proxy)).with_state(shared);
        let task = rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { url, state, task }
    }

    pub fn add_fault(&self, f: Fault) {
        self.state.lock().unwrap().faults.push(f);
    }

    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Sets how EC2 behaves from now on (see [`Model`]).
    pub fn set_model(&self, m: Model) {
        self.state.lock().unwrap().model = m;
    }

    /// Changes the model in place (e.g. raises the quota).
    pub fn with_model(&self, f: impl FnOnce(&mut Model)) {
        f(&mut self.state.lock().unwrap().model);
    }

    /// Calls per Action so far.
    pub fn counts(&self) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        for (_, a, _, _) in &self.state.lock().unwrap().calls {
            *m.entry(a.clone()).or_insert(0) += 1;
        }
        m
    }

    pub fn count(&self, action: &str) -> u32 {
        self.counts().get(action).copied().unwrap_or(0)
    }

    /// Times of the calls of one Action.
    pub fn times(&self, action: &str) -> Vec<Instant> {
        self.state.lock().unwrap().calls.iter().filter(|(_, a, _, _)| a == action).map(|(t, ..)| *t).collect()
    }

    /// The form parameters of every call of one Action, and whether the
    /// call was answered with an injected fault.
    pub fn requests(&self, action: &str) -> Vec<(bool, HashMap<String, String>)> {
        let st = self.state.lock().unwrap();
        st.calls
            .iter()
            .filter(|(_, a, _, _)| a == action)
            .map(|(_, _, faulted, p)| (*faulted, p.iter().cloned().collect()))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<ProxyState>>,
    client: HttpClient,
    /// RunInstances calls are answered one at a time (capacity and quota
    /// are checked and taken together).
    run_lock: Arc<tokio::sync::Mutex<()>>,
    /// The moto server behind.
    upstream: String,
}

/// An EC2 error answer.
struct Refusal {
    code: String,
    status: u16,
    message: String,
}

fn error_response(code: &str, status: u16, message: &str) -> Response {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors>\
         <RequestID>fault-proxy</RequestID></Response>"
    );
    Response::builder().status(status).header("content-type", "text/xml").body(Body::from(xml)).unwrap()
}

async fn proxy(State(sh): State<Shared>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let params: Vec<(String, String)> =
        form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(op) = target.strip_prefix("AWSPriceListService.") {
        return price_list(&sh.state, op, &body);
    }
    let action = params.iter().find(|(k, _)| k == "Action").map(|(_, v)| v.clone()).unwrap_or_default();
    let fault = {
        let mut st = sh.state.lock().unwrap();
        let hit = st.faults.iter_mut().find(|f| {
            f.action == action
                && f.times != Some(0)
                && f.when
                    .as_ref()
                    .is_none_or(|(k, v)| params.iter().any(|(pk, pv)| (k == "*" || pk == k) && pv == v))
        });
        hit.map(|f| {
            if let Some(t) = f.times.as_mut() {
                *t -= 1;
            }
            f.clone()
        })
    };
    let record = |faulted: bool| {
        sh.state.lock().unwrap().calls.push((Instant::now(), action.clone(), faulted, params.clone()));
    };
    if let Some(f) = fault {
        record(true);
        let msg = f.message.as_deref().unwrap_or("injected by the test fault proxy");
        return error_response(&f.code, f.status, msg);
    }
    let model = sh.state.lock().unwrap().model.clone();
    // Held until the launch is recorded: capacity and quota are taken once.
    let _run = if action == "RunInstances" { Some(sh.run_lock.lock().await) } else { None };
    if action == "RunInstances" {
        // The latency in force now, not at the call: a test that lowers
        // it releases the calls waiting.
        let start = Instant::now();
        while start.elapsed() < sh.state.lock().unwrap().model.run_latency {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match run_instances_model(&sh.upstream, &sh.state, &model, &params).await {
            Err(r) => {
                record(true);
                return error_response(&r.code, r.status, &r.message);
            }
            Ok(Some(changed)) => {
                let mut ser = form_urlencoded::Serializer::new(String::new());
                ser.extend_pairs(changed.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                body = Bytes::from(ser.finish());
            }
            Ok(None) => {}
        }
    }
    record(false);
    let uri = format!("{}{}", sh.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut fwd = hyper::Request::builder().method(parts.method.clone()).uri(uri);
    for (k, v) in parts.headers.iter() {
        if k != "host" && k != "content-length" {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match sh.client.request(fwd.body(Full::new(body)).unwrap()).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let (mut parts, body) = resp.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let ok = parts.status.is_success();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let out = if ok && action == "RunInstances" {
        let itype =
            params.iter().find(|(k, _)| k == "InstanceType").map(|(_, v)| v.clone()).unwrap_or_default();
        let ids = xml_values(&text, "instanceId");
        let mut st = sh.state.lock().unwrap();
        if let Some(left) = st.model.capacity.get_mut(&itype) {
            *left = left.saturating_sub(ids.len() as u32);
        }
        for id in ids {
            st.launched.insert(id, (Instant::now(), itype.clone()));
        }
        bytes
    } else if ok && action == "DescribeInstances" && !model.listing_lag.is_zero() {
        let hidden: Vec<String> = {
            let st = sh.state.lock().unwrap();
            st.launched
                .iter()
                .filter(|(_, (t, _))| t.elapsed() < model.listing_lag)
                .map(|(id, _)| id.clone())
                .collect()
        };
        parts.headers.remove("content-length");
        Bytes::from(drop_reservations(&text, &hidden))
    } else {
        bytes
    };
    Response::from_parts(parts, Body::from(out))
}

/// What EC2 would do with a RunInstances that moto would simply carry out:
/// refuse it (`Err`), launch fewer (`Ok(Some(params))` with MinCount and
/// MaxCount lowered), or launch it as asked.
async fn run_instances_model(
    upstream: &str,
    state: &Mutex<ProxyState>,
    model: &Model,
    params: &[(String, String)],
) -> Result<Option<Vec<(String, String)>>, Refusal> {
    let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
    let itype = get("InstanceType").unwrap_or_default();
    let min: u32 = get("MinCount").and_then(|v| v.parse().ok()).unwrap_or(1);
    let max: u32 = get("MaxCount").and_then(|v| v.parse().ok()).unwrap_or(min);
    let refuse = |code: &str, status: u16, message: String| Refusal { code: code.into(), status, message };
    if let Some(at) = model.profile_valid_at
        && Instant::now() < at
        && let Some((_, name)) = params.iter().find(|(k, _)| k.starts_with("IamInstanceProfile."))
    {
        return Err(refuse(
            "InvalidParameterValue",
            400,
            format!(
                "Value ({name}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name"
            ),
        ));
    }
    let c = client(upstream).await;
    let mut zone = String::from("us-east-1");
    if let Some(subnet) = get("SubnetId") {
        let d = c.describe_subnets().subnet_ids(&subnet).send().await;
        if let Some(z) =
            d.ok().and_then(|d| d.subnets().first().and_then(|s| s.availability_zone()).map(String::from))
        {
            zone = z;
        }
        if model.unsupported {
            let offered = c
                .describe_instance_type_offerings()
                .location_type(aws_sdk_ec2::types::LocationType::AvailabilityZone)
                .filters(Filter::builder().name("instance-type").values(&itype).build())
                .send()
                .await
                .map(|o| {
                    o.instance_type_offerings()
                        .iter()
                        .filter_map(|o| o.location())
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if !offered.is_empty() && !offered.contains(&zone) {
                return Err(refuse(
                    "Unsupported",
                    400,
                    format!(
                        "Your requested instance type ({itype}) is not supported in your requested Availability \
                         Zone ({zone}). Please retry your request by not specifying an Availability Zone or \
                         choosing {}.",
                        offered.join(", ")
                    ),
                ));
            }
        }
    }
    let mut fit = max;
    if let Some(&left) = model.capacity.get(&itype) {
        if left < min {
            return Err(refuse(
                "InsufficientInstanceCapacity",
                500,
                format!(
                    "We currently do not have sufficient {itype} capacity in the Availability Zone you requested \
                     ({zone}). Our system will be working on provisioning additional capacity."
                ),
            ));
        }
        fit = fit.min(left);
    }
    if let Some(quota) = model.vcpu_quota {
        let vcpus_of = |t: String| {
            let c = c.clone();
            async move {
                let d =
                    c.describe_instance_types().instance_types(InstanceType::from(t.as_str())).send().await;
                d.ok()
                    .and_then(|d| {
                        d.instance_types()
                            .first()
                            .and_then(|i| i.v_cpu_info())
                            .and_then(|v| v.default_v_cpus())
                    })
                    .unwrap_or(2) as u32
            }
        };
        let launched: Vec<(String, String)> =
            state.lock().unwrap().launched.iter().map(|(id, (_, t))| (id.clone(), t.clone())).collect();
        let mut used = 0;
        if !launched.is_empty() {
            let f = Filter::builder()
                .name("instance-id")
                .set_values(Some(launched.iter().map(|(id, _)| id.clone()).collect()))
                .build();
            let d = c.describe_instances().filters(f).send().await.expect("describe for the quota");
            for i in d.reservations().iter().flat_map(|r| r.instances()) {
                let live = matches!(
                    i.state().and_then(|s| s.name()),
                    Some(
                        aws_sdk_ec2::types::InstanceStateName::Pending
                            | aws_sdk_ec2::types::InstanceStateName::Running
                    )
                );
                if live {
                    used +=
                        vcpus_of(i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default()).await;
                }
            }
        }
        let each = vcpus_of(itype.clone()).await.max(1);
        let room = quota.saturating_sub(used) / each;
        if room < min {
            return Err(refuse(
                "VcpuLimitExceeded",
                400,
                format!(
                    "You have requested more vCPU capacity than your current vCPU limit of {quota} allows for the \
                     instance bucket that the specified instance type belongs to. Please visit \
                     http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."
                ),
            ));
        }
        fit = fit.min(room);
    }
    if min == max && fit >= max {
        return Ok(None);
    }
    // moto launches MinCount instances; EC2 the most it can up to MaxCount.
    let changed = params
        .iter()
        .map(|(k, v)| match k.as_str() {
            "MaxCount" | "MinCount" => (k.clone(), fit.to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    Ok(Some(changed))
}

/// The text of every `<tag>...</tag>` in `xml`.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|r| r.split(close.as_str()).next())
        .map(String::from)
        .collect()
}

/// A DescribeInstances answer without the reservations holding any of
/// `hidden` (instances launched together share one reservation).
fn drop_reservations(xml: &str, hidden: &[String]) -> String {
    let (Some(start), Some(end)) = (xml.find("<reservationSet>"), xml.find("</reservationSet>")) else {
        return xml.to_string();
    };
    let inner = &xml[start + "<reservationSet>".len()..end];
    // Split the set into its top-level <item> elements.
    let mut items = Vec::new();
    let (mut depth, mut from, mut i) = (0usize, None, 0usize);
    while i < inner.len() {
        if inner[i..].starts_with("<item>") {
            if depth == 0 {
                from = Some(i);
            }
            depth += 1;
            i += "<item>".len();
        } else if inner[i..].starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0
                && let Some(f) = from.take()
            {
                items.push(&inner[f..i]);
            }
        } else {
            i += inner[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let kept: String = items
        .into_iter()
        .filter(|item| !xml_values(item, "instanceId").iter().any(|id| hidden.contains(id)))
        .collect();
    format!("{}<reservationSet>{kept}{}", &xml[..start], &xml[end..])
}

/// The Price List API's `GetProducts` (JSON protocol), from the model's
/// price table: one product per type, in AWS's layout.
fn price_list(state: &Mutex<ProxyState>, op: &str, body: &[u8]) -> Response {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| {
        req["Filters"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["Field"] == name))
            .and_then(|f| f["Value"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let (itype, region) = (field("instanceType"), field("regionCode"));
    let mut st = state.lock().unwrap();
    st.calls.push((Instant::now(), op.to_string(), false, vec![("instanceType".into(), itype.clone())]));
    let products: Vec<String> = st
        .model
        .on_demand_usd
        .get(&itype)
        .filter(|_| op == "GetProducts")
        .map(|usd| {
            serde_json::json!({
                "product": {"attributes": {"instanceType": itype, "regionCode": region, "operatingSystem": "Linux"}},
                "terms": {"OnDemand": {"SKU.JRTCKXETXF": {"priceDimensions": {"SKU.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": "Hrs", "pricePerUnit": {"USD": format!("{usd:.10}")}
                }}}}}
            })
            .to_string()
        })
        .into_iter()
        .collect();
    let body = serde_json::json!({"FormatVersion": "aws_v1", "PriceList": products}).to_string();
    Response::builder()
        .status(200)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Body::from(body))
        .unwrap()
}
