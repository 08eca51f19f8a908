//! Enrollment and the node's identity.
//!
//! # Expected flow
//! 1. The userdata wrote `bootstrap.json` (controller URL, server name, CA
//!    fingerprint, node id, one-time token) and `ca.pem` into the agent's dir.
//! 2. The agent checks `ca.pem` against the fingerprint, generates a key,
//!    and calls `Enroll` with the token and a CSR, trusting only that CA.
//! 3. It keeps `identity/key.pem` + `identity/cert.pem` (0600) and blanks the
//!    token in `bootstrap.json`: after enrollment no bootstrap secret is left.
//! 4. A restarted agent finds its identity and goes straight to its session.

use crate::Fatal;
use ddisco_proto::v1 as api;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    pub controller: String,
    pub server_name: String,
    pub ca_sha256: String,
    /// Instance metadata service, on EC2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds: Option<String>,
    /// One slot per instance of the launch call, in launch-index order.
    pub slots: Vec<Slot>,
    /// The dead man's switch (`orphan`): seconds without a session with
    /// the controller before the node shuts itself down (0: never), and how.
    #[serde(default)]
    pub orphan_timeout_secs: u64,
    #[serde(default)]
    pub orphan_action: crate::orphan::OrphanAction,
}

/// Reads `bootstrap.json` (the switch needs it before enrollment).
pub fn read_bootstrap(dir: &Path) -> Result<Bootstrap, Fatal> {
    serde_json::from_str(&read(&dir.join("bootstrap.json"))?)
        .map_err(|e| Fatal::Setup(format!("bootstrap.json is not valid: {e}")))
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Slot {
    pub node_id: String,
    #[serde(default)]
    pub token: String,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// What the agent needs to talk to the controller.
#[derive(Clone)]
pub struct Creds {
    pub imds: Option<crate::imds::Imds>,
    pub controller: String,
    pub server_name: String,
    pub node_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds")
            .field("controller", &self.controller)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Creds {
    /// A channel to the controller with mutual TLS (or server-only TLS when
    /// `with_identity` is false, for enrollment).
    pub fn endpoint(&self, with_identity: bool) -> Result<Endpoint, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(self.server_name.clone());
        if with_identity {
            tls = tls.identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        }
        Ok(Endpoint::from_shared(self.controller.clone())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true))
    }
}

fn read(path: &Path) -> Result<String, Fatal> {
    std::fs::read_to_string(path).map_err(|e| Fatal::Setup(format!("cannot read {}: {e}", path.display())))
}

fn identity_dir(dir: &Path) -> PathBuf {
    dir.join("identity")
}

/// Loads the identity from `dir`, enrolling first if there is none yet.
/// Transport errors are retried with backoff; refusals are fatal.
pub async fn load_or_enroll(dir: &Path) -> Result<Creds, Fatal> {
    let boot = read_bootstrap(dir)?;
    let ca_pem = read(&dir.join("ca.pem"))?;
    check_ca(&ca_pem, &boot.ca_sha256)?;
    let imds = crate::imds::Imds::from_env_or(boot.imds.as_deref());
    let idir = identity_dir(dir);
    let (cert_p, key_p, node_p) = (idir.join("cert.pem"), idir.join("key.pem"), idir.join("node_id"));
    let mut creds = Creds {
        imds: imds.clone(),
        controller: boot.controller.clone(),
        server_name: boot.server_name.clone(),
        node_id: String::new(),
        ca_pem,
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    finish_renewal(&idir).map_err(Fatal::Setup)?;
    if cert_p.exists() && key_p.exists() && node_p.exists() {
        creds.cert_pem = read(&cert_p)?;
        creds.key_pem = read(&key_p)?;
        creds.node_id = read(&node_p)?.trim().to_string();
        tracing::info!(node = %creds.node_id, "using the identity from an earlier enrollment");
        return Ok(creds);
    }
    let slot = pick_slot(&boot, imds.as_ref()).await?;
    if slot.token.is_empty() {
        return Err(Fatal::Setup("no identity and no bootstrap token: this node cannot enroll".into()));
    }
    let (key, csr) = signing_request().map_err(Fatal::Setup)?;
    let facts = crate::facts::gather_with(imds.as_ref()).await;
    let identity = match imds.as_ref() {
        Some(imds) => Some(instance_identity(imds).await?),
        None => None,
    };
    let req =
        api::EnrollRequest { token: slot.token.clone(), csr_pem: csr, facts: Some(facts.into()), identity };
    let mut backoff = crate::backoff::Backoff::new();
    let reply = loop {
        match try_enroll(&creds, req.clone()).await {
            Ok(r) => break r,
            Err(Attempt::Refused(msg)) => return Err(Fatal::EnrollmentRefused(msg)),
            Err(Attempt::Retry(msg)) => {
                let wait = backoff.next_delay();
                tracing::warn!("enrollment: {msg}; retrying in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
            }
        }
    };
    std::fs::create_dir_all(&idir).map_err(|e| Fatal::Setup(format!("{}: {e}", idir.display())))?;
    let save = |p: &Path, s: &str| {
        crate::files::write_private(p, s).map_err(|e| Fatal::Setup(format!("{}: {e}", p.display())))
    };
    save(&key_p, &key.serialize_pem())?;
    save(&cert_p, &reply.certificate_pem)?;
    save(&node_p, &reply.node_id)?;
    // The tokens are spent or not ours; leave no copy of them behind.
    let spent = Bootstrap {
        slots: boot.slots.iter().map(|s| Slot { node_id: s.node_id.clone(), token: String::new() }).collect(),
        ..boot
    };
    save(&dir.join("bootstrap.json"), &serde_json::to_string(&spent).expect("serializes"))?;
    tracing::info!(node = %reply.node_id, "enrolled");
    creds.node_id = reply.node_id;
    creds.cert_pem = reply.certificate_pem;
    creds.key_pem = key.serialize_pem();
    Ok(creds)
}

/// A fresh key and a signing request for it (the controller sets the
/// subject).
pub fn signing_request() -> Result<(rcgen::KeyPair, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key generation: {e}"))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| format!("signing request: {e}"))?;
    Ok((key, csr))
}

/// Keeps a renewed certificate and its key: both written beside the
/// current ones (`*.new`), then renamed key first, certificate last. A
/// crash in between is finished by [`finish_renewal`] at the next start.
pub fn store_renewed(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let idir = identity_dir(dir);
    let (cert_new, key_new) = (idir.join("cert.pem.new"), idir.join("key.pem.new"));
    crate::files::write_private(&key_new, key_pem).map_err(|e| format!("{}: {e}", key_new.display()))?;
    crate::files::write_private(&cert_new, cert_pem).map_err(|e| format!("{}: {e}", cert_new.display()))?;
    finish_renewal(&idir)
}

/// Moves a renewed key and certificate into place (key first): once
/// `cert.pem.new` is written, both new files are complete.
fn finish_renewal(idir: &Path) -> Result<(), String> {
    let (cert_new, key_new) = (idir.join("cert.pem.new"), idir.join("key.pem.new"));
    if !cert_new.exists() {
        let _ = std::fs::remove_file(&key_new); // a renewal cut short: the old pair stands
        return Ok(());
    }
    let mv = |from: &Path, to: &str| {
        std::fs::rename(from, idir.join(to)).map_err(|e| format!("{} -> {to}: {e}", from.display()))
    };
    if key_new.exists() {
        mv(&key_new, "key.pem")?;
    }
    mv(&cert_new, "cert.pem")
}

/// This instance's slot: the only one, or the one at its launch index.
async fn pick_slot(boot: &Bootstrap, imds: Option<&crate::imds::Imds>) -> Result<Slot, Fatal> {
    let index = match (boot.slots.len(), imds) {
        (0, _) => return Err(Fatal::Setup("bootstrap.json has no slots".into())),
        (1, _) => 0,
        (_, None) => return Err(Fatal::Setup("several slots but no instance metadata to pick one".into())),
        (_, Some(imds)) => {
            let mut backoff = crate::backoff::Backoff::new();
            let mut tries = 0;
            loop {
                match imds.get("ami-launch-index").await {
                    Ok(Some(i)) => {
                        break i
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| Fatal::Setup(format!("ami-launch-index {i:?} is not a number")))?;
                    }
                    Ok(None) => return Err(Fatal::Setup("instance metadata has no ami-launch-index".into())),
                    Err(e) if tries < 10 => {
                        tries += 1;
                        tracing::warn!("{e}; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(Fatal::Setup(e)),
                }
            }
        }
    };
    boot.slots
        .get(index)
        .cloned()
        .ok_or_else(|| Fatal::Setup(format!("launch index {index} has no slot ({} slots)", boot.slots.len())))
}

/// The signed instance identity document the controller checks the
/// instance with (transient metadata errors are retried a few times).
async fn instance_identity(imds: &crate::imds::Imds) -> Result<api::InstanceIdentity, Fatal> {
    let mut backoff = crate::backoff::Backoff::new();
    let mut tries = 0;
    loop {
        match imds.identity().await {
            Ok((document, signature)) => return Ok(api::InstanceIdentity { document, signature }),
            Err(e) if tries < 10 => {
                tries += 1;
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(Fatal::Setup(e)),
        }
    }
}

enum Attempt {
    Refused(String),
    Retry(String),
}

async fn try_enroll(creds: &Creds, req: api::EnrollRequest) -> Result<api::EnrollResponse, Attempt> {
    let ch = creds
        .endpoint(false)
        .map_err(|e| Attempt::Refused(format!("bad controller address {:?}: {e}", creds.controller)))?
        .connect()
        .await
        .map_err(|e| Attempt::Retry(format!("cannot reach {}: {e}", creds.controller)))?;
    // A stalled exchange is retried, never waited on forever.
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(30));
    match api::enrollment_client::EnrollmentClient::new(ch).enroll(request).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                Err(Attempt::Refused(format!("{:?}: {}", s.code(), s.message())))
            }
            _ => Err(Attempt::Retry(format!("{:?}: {}", s.code(), s.message()))),
        },
    }
}

fn check_ca(ca_pem: &str, want: &str) -> Result<(), Fatal> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| Fatal::Setup(format!("ca.pem is not a certificate: {e}")))?;
    let got = hex::encode(Sha256::digest(der.as_ref()));
    if !want.is_empty() && got != want {
        return Err(Fatal::Setup(format!(
            "ca.pem has SHA-256 {got}, bootstrap.json expects {want}: refusing it"
        )));
    }
    Ok(())
}
