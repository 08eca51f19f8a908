//! The cluster's certificate authority and bootstrap tokens.
//!
//! # Guarantees
//! - The CA key and the server key are written once, mode 0600, in the state
//!   directory, and reused on restart (agents keep trusting the controller).
//! - A node's client certificate carries its node id as common name and is
//!   issued only against a valid, unused, unexpired bootstrap token.
//! - Bootstrap tokens are 256 random bits; only their SHA-256 is stored.
//! - **One CA per use.** The *session CA* (`ca.pem`) signs the controller's
//!   server certificate and the nodes' session certificates, nothing else:
//!   the agents' port trusts it alone. The *engine CA* (`engine-ca.pem`)
//!   signs what an engine's processes and its users hold (Dask's node
//!   certificates and user credentials): a key a job can read (a node's
//!   Dask key) is never accepted where an agent is.
//! - Both CAs belong to one cluster: a completed `destroy` retires them
//!   (`retire`), so the next cluster in the same state directory trusts
//!   nothing the last one issued.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name every agent verifies the controller's certificate against,
/// whatever address it dials (the CA is private to the cluster).
pub const SERVER_NAME: &str = "ddisco-controller";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

pub struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    engine_ca_pem: String,
    engine_issuer: Issuer<'static, KeyPair>,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("ca_fingerprint", &self.ca_fingerprint()).finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the CA and server certificate from `dir`, creating what is
    /// missing. The server certificate is re-issued when `names` (the
    /// addresses it must be valid for) changed since it was written.
    pub fn load_or_create(dir: &Path, cluster: &str, names: &[String]) -> Result<Pki, PkiError> {
        let (ca_pem, ca_key) = load_or_create_ca(dir, "ca", &format!("ddisco CA {cluster}"))?;
        let (engine_ca_pem, engine_key) =
            load_or_create_ca(dir, "engine-ca", &format!("ddisco engine CA {cluster}"))?;
        let engine_issuer = Issuer::from_ca_cert_pem(&engine_ca_pem, engine_key)?;
        let ca_der = pem_to_der(&ca_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

        let mut wanted: Vec<String> = vec![SERVER_NAME.to_string()];
        wanted.extend(names.iter().cloned());
        wanted.sort();
        wanted.dedup();
        let names_path = dir.join("server.names");
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        // The names, and the CA that signed it: a new CA re-issues it too.
        let marker = format!("{}\n{}", hex::encode(Sha256::digest(&ca_der)), wanted.join("\n"));
        let current = std::fs::read_to_string(&names_path).unwrap_or_default();
        let (server_cert_pem, server_key_pem) =
            if current == marker && cert_path.exists() && key_path.exists() {
                (read(&cert_path)?, read(&key_path)?)
            } else {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::new(wanted.clone())?;
                params.distinguished_name = dn(SERVER_NAME);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                validity(&mut params, Duration::from_secs(5 * 365 * 86_400));
                let cert = params.signed_by(&key, &issuer)?;
                write_private(&key_path, &key.serialize_pem())?;
                write_private(&cert_path, &cert.pem())?;
                write_private(&names_path, &marker)?;
                (cert.pem(), key.serialize_pem())
            };
        Ok(Pki { ca_pem, ca_der, issuer, engine_ca_pem, engine_issuer, server_cert_pem, server_key_pem })
    }

    /// The session CA: the controller's server certificate and the nodes'
    /// session certificates chain to it.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The engine CA: engines' node certificates and user credentials
    /// (`issue`) chain to it, and only they.
    pub fn engine_ca_pem(&self) -> &str {
        &self.engine_ca_pem
    }

    /// SHA-256 of the CA certificate (DER), hex.
    pub fn ca_fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.ca_der))
    }

    /// Issues a client certificate for `node_id` over the public key of the
    /// CSR. The CSR's subject is ignored: the identity comes from the token.
    pub fn sign_node(&self, node_id: &str, csr_pem: &str, valid_for: Duration) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("csr_pem is not a valid signing request: {e}")))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(node_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, valid_for);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }
}

impl Pki {
    /// TLS for a port that serves the controller's certificate and asks for
    /// none (downloads, the dashboard beyond loopback), speaking `alpn`.
    pub fn https_config(&self, alpn: &[&[u8]]) -> anyhow::Result<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs =
            CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(tls)
    }

    /// A key and a certificate of the engine CA for an engine's service or
    /// client (Dask's mutual TLS): common name `name`, valid for TLS
    /// servers too when `ips` (its addresses) are given. Returns
    /// (certificate, key) PEMs.
    pub fn issue(
        &self,
        name: &str,
        ips: &[String],
        valid_for: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !ips.is_empty() {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
            for ip in ips {
                let ip: std::net::IpAddr =
                    ip.parse().map_err(|_| PkiError::Invalid(format!("{ip:?} is not an IP address")))?;
                params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
            }
        }
        validity(&mut params, valid_for);
        let cert = params.signed_by(&key, &self.engine_issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The files of a cluster's CAs and server certificate in a state
/// directory.
const PKI_FILES: [&str; 7] =
    ["ca.key", "ca.pem", "engine-ca.key", "engine-ca.pem", "server.key", "server.pem", "server.names"];

/// Retires the cluster's CAs (after a completed destroy): their keys and
/// certificates are removed, so the next `serve` in `dir` makes new ones and
/// trusts nothing issued before (a user's credential, a node's key a job
/// copied). Returns the files removed.
pub fn retire(dir: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let mut gone = vec![];
    for name in PKI_FILES {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => gone.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PkiError::Io { path, source }),
        }
    }
    Ok(gone)
}

/// A CA kept as `<stem>.pem` and `<stem>.key` in `dir`: loaded, or made
/// (common name `cn`, ten years, no intermediate below it).
fn load_or_create_ca(dir: &Path, stem: &str, cn: &str) -> Result<(String, KeyPair), PkiError> {
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    if cert_path.exists() && key_path.exists() {
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        return Ok((read(&cert_path)?, key));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, Duration::from_secs(10 * 365 * 86_400));
    let cert = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    write_private(&cert_path, &cert.pem())?;
    Ok((cert.pem(), key))
}

/// SHA-256 (hex) of a certificate: of its DER, given as DER or PEM.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// SHA-256 (hex) of the DER of a PEM certificate.
pub fn pem_sha256(pem: &str) -> Result<String, PkiError> {
    Ok(cert_sha256(&pem_to_der(pem)?))
}

/// Seconds since the epoch at which a certificate (DER) ends.
pub fn not_after_unix(cert_der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Whether a certificate ending at `not_after` (unix seconds) should be
/// renewed at `now`: when less than a third of `validity` is left.
pub fn renewal_due(not_after: i64, now: i64, validity: Duration) -> bool {
    not_after.saturating_sub(now) < (validity.as_secs() / 3) as i64
}

/// The node id (common name) of a verified client certificate (DER).
pub fn node_id_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// A fresh bootstrap token (256 bits, hex) and its stored hash.
pub fn mint_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let secret = hex::encode(bytes);
    let hash = token_hash(&secret);
    (secret, hash)
}

pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // Tolerate clocks a little behind ours.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + valid_for;
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Writes a file readable by its owner only (atomically: temp + rename).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_a_third_is_left() {
        let v = Duration::from_secs(30 * 86_400);
        let end = 1_000_000_000;
        assert!(!renewal_due(end, end - 11 * 86_400, v));
        assert!(renewal_due(end, end - 9 * 86_400, v));
        assert!(renewal_due(end, end + 5, v), "expired");
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), "t", &["127.0.0.1".into()]).unwrap();
        let b = Pki::load_or_create(dir.path(), "t", &["127.0.0.1".into()]).unwrap();
        assert_eq!(a.ca_pem(), b.ca_pem());
        assert_eq!(a.server_cert_pem, b.server_cert_pem);
        for f in ["ca.key", "ca.pem", "server.key", "server.pem"] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // A new advertised name re-issues the server certificate, same CA.
        let c = Pki::load_or_create(dir.path(), "t", &["10.0.0.5".into()]).unwrap();
        assert_eq!(a.ca_pem(), c.ca_pem());
        assert_ne!(a.server_cert_pem, c.server_cert_pem);
    }

    /// Verifies `cert_pem` as a client certificate against `ca_pem`, as
    /// a TLS server trusting that CA would.
    fn verifies(ca_pem: &str, cert_pem: &str) -> bool {
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(pem_to_der(ca_pem).unwrap())).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let der = CertificateDer::from(pem_to_der(cert_pem).unwrap());
        verifier.verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now()).is_ok()
    }

    #[test]
    fn each_use_has_its_own_ca_and_a_destroy_retires_both() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        assert_ne!(pki.ca_pem(), pki.engine_ca_pem());
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
        let session = pki.sign_node("slave-0001", &csr.pem().unwrap(), Duration::from_secs(60)).unwrap();
        let (dask, _) = pki.issue("dask slave-0001", &["10.0.0.2".into()], Duration::from_secs(60)).unwrap();
        // The agents' port (session CA) takes a session certificate, never
        // an engine's; Dask (engine CA) the other way round.
        assert!(verifies(pki.ca_pem(), &session));
        assert!(!verifies(pki.ca_pem(), &dask), "an engine certificate passes for a node session");
        assert!(verifies(pki.engine_ca_pem(), &dask));
        assert!(!verifies(pki.engine_ca_pem(), &session));

        // Retired: the next cluster of this state directory trusts nothing
        // the last one issued; its server certificate is its own CA's.
        let gone = retire(dir.path()).unwrap();
        assert_eq!(gone.len(), 7, "{gone:?}");
        let next = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        assert!(!verifies(next.engine_ca_pem(), &dask), "a credential of the destroyed cluster is trusted");
        assert!(!verifies(next.ca_pem(), &session));
        assert_ne!(next.server_cert_pem, pki.server_cert_pem);
        assert!(retire(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn a_new_ca_reissues_the_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let b = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        assert_ne!(a.ca_pem(), b.ca_pem());
        assert_ne!(a.server_cert_pem, b.server_cert_pem, "a server certificate of the old CA was kept");
    }

    #[test]
    fn node_certificate_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), "t", &[]).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = dn("i-claim-to-be-the-master");
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let pem = pki.sign_node("slave-0003", &csr, Duration::from_secs(60)).unwrap();
        let der = pem_to_der(&pem).unwrap();
        assert_eq!(node_id_of(&der).as_deref(), Some("slave-0003"));
        assert!(pki.sign_node("x", "garbage", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn tokens_are_long_and_hashed() {
        let (a, ha) = mint_token();
        let (b, _) = mint_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(token_hash(&a), ha);
        assert_ne!(a, ha);
    }
}
