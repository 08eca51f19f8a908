//! Instance attestation on EC2: the **instance identity document** an
//! instance reads from its metadata service (`dynamic/instance-identity/
//! document`), with AWS's RSA signature of it (`.../signature`, base64,
//! PKCS #1 v1.5 over SHA-256), checked against AWS's published certificate
//! for the region (or the one `identity_certificate` names: tests sign with
//! their own key).
//!
//! Plain functions over bytes: no network, no clock.
//!
//! # What it proves, and what not
//! Only the instance itself can read its document and signature, so a
//! verified document proves the caller runs on (or was handed the metadata
//! of) that instance. The document has no nonce and no expiry: what binds it
//! to one enrollment is the single-use bootstrap token of the slot that was
//! launched as that very instance.

use ring::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};
use std::net::IpAddr;

/// AWS's RSA certificate for the identity documents of every region except
/// Hong Kong, Bahrain, Cape Town, Milan, China and GovCloud (published in
/// the EC2 user guide, "Verify the instance identity document"). Only its
/// public key is used; AWS still signs with it after the certificate's own
/// expiry date.
pub const AWS_IDENTITY_CERTIFICATE: &str = include_str!("provider/ec2/aws-identity-rsa.pem");

/// Regions whose documents are signed with another certificate: for these,
/// `identity_certificate` must name AWS's certificate of the region.
pub const REGIONS_WITH_OWN_CERTIFICATE: &[&str] = &["ap-east-1", "me-south-1", "af-south-1", "eu-south-1"];

/// Largest document and signature taken (AWS's are under 1 KiB and 400 B).
pub const MAX_DOCUMENT: usize = 4096;
pub const MAX_SIGNATURE: usize = 2048;

/// What a verified document says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityDoc {
    pub instance_id: String,
    pub region: String,
    pub private_ip: Option<IpAddr>,
    pub account_id: String,
}

/// Why a document was not accepted. The messages are safe to return to an
/// unauthenticated caller: they say nothing the caller does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    #[error("no instance identity document was sent (the agent must read it from instance metadata)")]
    Missing,
    #[error("the instance identity document or its signature is too large")]
    TooLarge,
    #[error("the instance identity signature is not valid base64")]
    SignatureEncoding,
    #[error("the instance identity document's signature does not verify")]
    BadSignature,
    #[error("the instance identity document is not valid: {0}")]
    Malformed(String),
    #[error("the instance identity document is from region {got}, this cluster runs in {want}")]
    WrongRegion { got: String, want: String },
}

/// Checks documents against one public key, for one region.
#[derive(Clone)]
pub struct Attestor {
    /// The DER `RSAPublicKey` of the certificate.
    key: Vec<u8>,
    region: String,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor").field("region", &self.region).finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    instance_id: String,
    region: String,
    #[serde(default)]
    private_ip: Option<String>,
    #[serde(default)]
    account_id: Option<String>,
}

impl Attestor {
    /// From a PEM certificate with an RSA public key.
    pub fn from_pem(pem: &str, region: &str) -> Result<Attestor, String> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("not a certificate: {e}"))?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm.to_id_string() != "1.2.840.113549.1.1.1" {
            return Err("the certificate's key is not an RSA key".into());
        }
        Ok(Attestor { key: spki.subject_public_key.data.to_vec(), region: region.to_string() })
    }

    /// Verifies `document` against `signature_b64` and parses it.
    pub fn verify(&self, document: &str, signature_b64: &str) -> Result<IdentityDoc, AttestError> {
        use base64::Engine;
        if document.is_empty() && signature_b64.is_empty() {
            return Err(AttestError::Missing);
        }
        if document.len() > MAX_DOCUMENT || signature_b64.len() > MAX_SIGNATURE {
            return Err(AttestError::TooLarge);
        }
        let compact: String = signature_b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| AttestError::SignatureEncoding)?;
        UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &self.key)
            .verify(document.as_bytes(), &sig)
            .map_err(|_| AttestError::BadSignature)?;
        let raw: RawDoc =
            serde_json::from_str(document).map_err(|e| AttestError::Malformed(e.to_string()))?;
        if raw.region != self.region {
            return Err(AttestError::WrongRegion { got: raw.region, want: self.region.clone() });
        }
        if !is_instance_id(&raw.instance_id) {
            return Err(AttestError::Malformed("instanceId is not an instance id".into()));
        }
        let private_ip = match raw.private_ip.as_deref() {
            None | Some("") => None,
            Some(s) => {
                Some(s.parse().map_err(|_| AttestError::Malformed("privateIp is not an address".into()))?)
            }
        };
        Ok(IdentityDoc {
            instance_id: raw.instance_id,
            region: raw.region,
            private_ip,
            account_id: raw.account_id.unwrap_or_default(),
        })
    }
}

/// `i-` and 8 or 17 lower-case hex digits.
pub fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|h| {
        (h.len() == 8 || h.len() == 17) && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' signer (tests/fixtures: a key made for the tests, not AWS's).
    const TEST_CERT: &str = include_str!("../../tests/fixtures/imds-test-cert.pem");
    const TEST_KEY: &str = include_str!("../../tests/fixtures/imds-test-key.pem");

    fn sign(doc: &str) -> String {
        use base64::Engine;
        use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
        let der = PrivatePkcs8KeyDer::from_pem_slice(TEST_KEY.as_bytes()).unwrap();
        let key = ring::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            doc.as_bytes(),
            &mut sig,
        )
        .unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig)
    }

    fn doc(id: &str, region: &str) -> String {
        format!(
            r#"{{"accountId":"123456789012","instanceId":"{id}","region":"{region}","privateIp":"10.0.0.7","instanceType":"c5.large"}}"#
        )
    }

    #[test]
    fn a_signed_document_verifies_and_says_which_instance() {
        let a = Attestor::from_pem(TEST_CERT, "us-east-1").unwrap();
        let d = doc("i-0123456789abcdef0", "us-east-1");
        let got = a.verify(&d, &sign(&d)).unwrap();
        assert_eq!(got.instance_id, "i-0123456789abcdef0");
        assert_eq!(got.private_ip, Some("10.0.0.7".parse().unwrap()));
        // AWS serves the signature on several lines.
        let wrapped: String = sign(&d)
            .as_bytes()
            .chunks(64)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert!(a.verify(&d, &wrapped).is_ok());
    }

    #[test]
    fn an_altered_document_or_another_key_is_refused() {
        let a = Attestor::from_pem(TEST_CERT, "us-east-1").unwrap();
        let d = doc("i-0123456789abcdef0", "us-east-1");
        let sig = sign(&d);
        let forged = d.replace("i-0123456789abcdef0", "i-0fedcba9876543210");
        assert_eq!(a.verify(&forged, &sig), Err(AttestError::BadSignature));
        let aws = Attestor::from_pem(AWS_IDENTITY_CERTIFICATE, "us-east-1").unwrap();
        assert_eq!(aws.verify(&d, &sig), Err(AttestError::BadSignature));
        assert_eq!(a.verify("", ""), Err(AttestError::Missing));
        assert_eq!(a.verify(&d, "not base64!"), Err(AttestError::SignatureEncoding));
        assert_eq!(a.verify(&"x".repeat(MAX_DOCUMENT + 1), &sig), Err(AttestError::TooLarge));
    }

    #[test]
    fn a_document_of_another_region_or_without_an_instance_id_is_refused() {
        let a = Attestor::from_pem(TEST_CERT, "eu-west-1").unwrap();
        let d = doc("i-0123456789abcdef0", "us-east-1");
        assert!(matches!(a.verify(&d, &sign(&d)), Err(AttestError::WrongRegion { .. })));
        let a = Attestor::from_pem(TEST_CERT, "us-east-1").unwrap();
        let d = doc("../etc", "us-east-1");
        assert!(matches!(a.verify(&d, &sign(&d)), Err(AttestError::Malformed(_))));
    }

    #[test]
    fn instance_ids() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-1234abcd"));
        assert!(!is_instance_id("i-0123456789ABCDEF0"));
        assert!(!is_instance_id("i-"));
        assert!(!is_instance_id("sir-12345678"));
    }

    #[test]
    fn the_embedded_aws_certificate_loads() {
        assert!(Attestor::from_pem(AWS_IDENTITY_CERTIFICATE, "us-east-1").is_ok());
        assert!(Attestor::from_pem("nonsense", "us-east-1").is_err());
    }
}
