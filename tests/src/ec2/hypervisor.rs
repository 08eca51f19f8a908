//! The hypervisor moto lacks: boots a cluster's instances from their
//! userdata as local nodes, with a metadata service each (see `super`).

use super::*;

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

    /// EC2's rebalance recommendation on an instance (its spot pool is at
    /// an elevated risk of interruption; no termination follows by itself).
    pub fn recommend_rebalance(&self, instance_id: &str) {
        let b = self.booted.lock().unwrap();
        let node = b.get(instance_id).expect("instance booted");
        node.meta.lock().unwrap().rebalance = Some(r#"{"noticeTime": "2026-12-05T12:00:00Z"}"#.to_string());
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

/// Tag a baked image carries: the instance it was made from (what
/// `ddisco-controller bake` tags, as EC2 keeps it).
pub const SOURCE_TAG: &str = "ddisco:source-instance";

/// The instance an image was made from (CreateImage), if it was made here.
async fn image_source(c: &Client, image_id: &str) -> Option<String> {
    let out = c.describe_images().image_ids(image_id).send().await.ok()?;
    let img = out.images().first()?;
    img.tags().iter().find(|t| t.key() == Some(SOURCE_TAG)).and_then(|t| t.value()).map(String::from)
}

/// Each instance's folder is its disk. An instance launched from an image
/// made of another instance starts with a copy of that instance's disk
/// (what EC2's CreateImage snapshot holds; the hypervisor's own files
/// aside). Then what the first boot of any instance does (cloud-init):
/// SSH host keys and a machine-id of its own, unless the disk has them.
async fn prepare_disk(
    c: &Client,
    i: &Inst,
    root: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), String> {
    if let Some(src) = image_source(c, &i.image_id).await {
        let from = root.join(&src);
        if !from.is_dir() {
            return Err(format!("image {} was made from {src}, whose disk is not here", i.image_id));
        }
        let out = Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(dir).output();
        let out = out.map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("copying the disk of {src}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        for own in ["console.log", "userdata.sh", "powered-off"] {
            let _ = std::fs::remove_file(dir.join(own));
        }
    }
    let ssh = dir.join("etc/ssh");
    std::fs::create_dir_all(&ssh).map_err(|e| e.to_string())?;
    let key = ssh.join("ssh_host_ed25519_key");
    if !key.exists() {
        std::fs::write(&key, format!("host key of {}\n", i.id)).map_err(|e| e.to_string())?;
    }
    let mid = dir.join("etc/machine-id");
    if std::fs::read_to_string(&mid).map(|t| t.trim().is_empty()).unwrap_or(true) {
        std::fs::write(&mid, format!("{}\n", i.id)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn boot(c: &Client, i: &Inst, root: &std::path::Path) -> Result<Booted, String> {
    let userdata = userdata_of(c, &i.id).await?;
    let dir = root.join(&i.id);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    prepare_disk(c, i, root, &dir).await?;
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
            // The instance's disk: what a seal generalizes.
            .env("DDISCO_IMAGE_ROOT", &dir)
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
