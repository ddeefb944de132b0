//! The embedded CA: a P-256 key and a self-signed CA certificate for one trust
//! domain, kept in the state directory (key 0600) or loaded from files so that
//! several nodes share one trust root.
use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use spiffe::{SpiffeId, TrustDomain};

use super::Svid;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("CA certificate {path}: {message}")]
    BadCert { path: PathBuf, message: String },
    #[error("issuing a certificate for {id}: {message}")]
    Issue { id: String, message: String },
}

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain.to_string())
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |e| CaError::File {
        path: path.to_owned(),
        message: if e.kind() == std::io::ErrorKind::AlreadyExists {
            "already exists; refusing to overwrite an existing CA".into()
        } else {
            e.to_string()
        },
    }
}

impl Ca {
    /// A new CA for `trust_domain`.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let err = |m: rcgen::Error| CaError::Issue {
            id: format!("CA of {trust_domain}"),
            message: m.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "enforcer");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("enforcer CA {trust_domain}"));
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().map_err(err)?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + CA_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(err)?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Self {
            trust_domain: trust_domain.clone(),
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
        })
    }

    /// Loads a CA from PEM files (certificate, PKCS#8 key).
    pub fn load(trust_domain: &TrustDomain, cert: &Path, key: &Path) -> Result<Self, CaError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(file_err(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(file_err(key))?;
        let mode = std::fs::metadata(key)
            .map_err(file_err(key))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::File {
                path: key.to_owned(),
                message: format!(
                    "CA key is readable by group or others (mode {:o}); chmod 600 it",
                    mode & 0o777
                ),
            });
        }
        let bad = |message: String| CaError::BadCert {
            path: cert.to_owned(),
            message,
        };
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| CaError::File {
            path: key.to_owned(),
            message: format!("not a PKCS#8 private key: {e}"),
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad(
                "is not a CA certificate (basicConstraints CA:FALSE)".into()
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(bad(format!("does not match the key in {}", key.display())));
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key_pair).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            issuer,
            cert_der,
            cert_pem,
        })
    }

    /// Loads the CA of the state directory, creating it on first start.
    pub fn load_or_create(trust_domain: &TrustDomain, dir: &Path) -> Result<Self, CaError> {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert.exists() || key.exists() {
            return Self::load(trust_domain, &cert, &key);
        }
        let ca = Self::generate(trust_domain)?;
        ca.write(&cert, &key)?;
        Ok(ca)
    }

    /// Writes the certificate (0644) and the key (0600, never world-readable
    /// even for an instant); refuses to overwrite.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), CaError> {
        for p in [cert, key] {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(file_err(dir))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        let mut k = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key)
            .map_err(file_err(key))?;
        k.write_all(self.issuer.key().serialize_pem().as_bytes())
            .map_err(file_err(key))?;
        let mut c = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(cert)
            .map_err(file_err(cert))?;
        c.write_all(self.cert_pem.as_bytes())
            .map_err(file_err(cert))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// An X.509-SVID for `id`, valid from `not_before` to `not_after`: EC P-256
    /// key, one URI SAN, digitalSignature, serverAuth + clientAuth.
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Svid, CaError> {
        let err = |m: rcgen::Error| CaError::Issue {
            id: id.to_string(),
            message: m.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "enforcer");
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(err)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Svid {
            spiffe_id: id.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            received_at: SystemTime::now(),
        })
    }

    /// An SVID valid from (almost) now for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        let now = SystemTime::now();
        let not_after = now.checked_add(ttl).ok_or_else(|| CaError::Issue {
            id: id.to_string(),
            message: format!("a lifetime of {} s is out of range", ttl.as_secs()),
        })?;
        // A little backdating absorbs clock skew between nodes.
        self.issue_between(id, now - Duration::from_secs(60).min(ttl), not_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("ai.example.org").expect("td")
    }

    #[test]
    fn svid_has_one_uri_san_and_both_ekus() {
        let ca = Ca::generate(&td()).expect("ca");
        let id = SpiffeId::new("spiffe://ai.example.org/agent/support").expect("id");
        let svid = ca.issue(&id, Duration::from_secs(3600)).expect("svid");
        // The verifiers' own reading: exactly one URI SAN, not a CA.
        let read = crate::tls::spiffe_id_of(&svid.chain[0]).expect("one SPIFFE ID");
        assert_eq!(read, id);
        let (_, cert) = x509_parser::parse_x509_certificate(&svid.chain[0]).expect("parse");
        let eku = cert.extended_key_usage().expect("ext").expect("eku");
        assert!(eku.value.server_auth && eku.value.client_auth);
        let ttl = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(ttl, 3600 + 60);
    }

    #[test]
    fn state_dir_ca_is_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("enforcer-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&td(), &dir).expect("create");
        let mode = std::fs::metadata(dir.join("ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(&td(), &dir).expect("reload");
        assert_eq!(ca.cert_der(), again.cert_der());
        // A key readable by others is refused.
        std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err = Ca::load_or_create(&td(), &dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        // A key that does not match the certificate is refused.
        std::fs::remove_file(dir.join("ca.key")).expect("rm");
        let other = Ca::generate(&td()).expect("other");
        let mut k = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("ca.key"))
            .expect("key");
        k.write_all(other.issuer.key().serialize_pem().as_bytes())
            .expect("write");
        let err = Ca::load_or_create(&td(), &dir).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
