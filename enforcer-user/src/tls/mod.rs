//! SPIFFE mutual TLS (TLS 1.3 only): certificate verifiers that take the peer's
//! SPIFFE ID from its single URI SAN and check its chain against the bundle of
//! *that ID's* trust domain, and the rustls configurations built on them.
use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use spiffe::SpiffeId;

use crate::identity::TrustStore;

/// ALPN of HBONE (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer certificate was refused; the `reason` in logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("certificate has no URI SAN (not an X.509-SVID)")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN {0:?} is not a valid SPIFFE ID")]
    InvalidSpiffeId(String),
    #[error("trust domain {0:?} is not trusted by this node")]
    UntrustedTrustDomain(String),
    #[error("leaf certificate is a CA certificate")]
    LeafIsCa,
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
}

impl Reject {
    pub fn code(&self) -> &'static str {
        match self {
            Reject::NoSpiffeId => "no_spiffe_id",
            Reject::MultipleUriSans(_) => "multiple_uri_sans",
            Reject::InvalidSpiffeId(_) => "invalid_spiffe_id",
            Reject::UntrustedTrustDomain(_) => "untrusted_trust_domain",
            Reject::LeafIsCa => "leaf_is_ca",
            Reject::Unparsable(_) => "bad_certificate",
        }
    }
}

fn reject(r: Reject) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
}

/// The SPIFFE ID of an X.509-SVID: its one and only URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Reject> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| Reject::Unparsable(e.to_string()))?;
    if parsed.is_ca() {
        return Err(Reject::LeafIsCa);
    }
    let uris: Vec<&str> = match parsed
        .subject_alternative_name()
        .map_err(|e| Reject::Unparsable(e.to_string()))?
    {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => vec![],
    };
    match uris.as_slice() {
        [] => Err(Reject::NoSpiffeId),
        [one] => SpiffeId::new(one).map_err(|_| Reject::InvalidSpiffeId((*one).to_owned())),
        more => Err(Reject::MultipleUriSans(more.len())),
    }
}

/// The end of a certificate's validity (notAfter).
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
}

/// The reason code of a failed handshake, for logs and metrics.
pub fn handshake_failure_code(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof_during_handshake",
            std::io::ErrorKind::TimedOut => "handshake_timeout",
            _ => "io_error",
        };
    };
    match tls {
        Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => e
            .downcast_ref::<Reject>()
            .map(Reject::code)
            .unwrap_or("bad_certificate"),
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        Error::InappropriateMessage { .. } => "not_tls",
        Error::PeerIncompatible(_) => "incompatible_peer",
        Error::NoApplicationProtocol => "no_alpn",
        Error::AlertReceived(_) => "alert_received",
        Error::General(_) => "no_server_identity",
        _ => "tls_error",
    }
}

/// TLS 1.2 is never negotiated (both configurations are TLS 1.3 only).
/// The peer's SPIFFE ID and the roots of its own trust domain (each side's
/// chain is verified only against the bundle of the ID's trust domain).
fn id_and_roots(
    trust: &TrustStore,
    end_entity: &CertificateDer<'_>,
) -> Result<(SpiffeId, Arc<rustls::RootCertStore>), Error> {
    let id = spiffe_id_of(end_entity).map_err(reject)?;
    let roots = trust
        .current()
        .roots(id.trust_domain_name())
        .ok_or_else(|| reject(Reject::UntrustedTrustDomain(id.trust_domain_name().into())))?;
    Ok((id, roots))
}

fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Verifies client SVIDs (server side of HBONE) against the trust bundles in
/// force at handshake time.
pub struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    pub fn new(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let (id, roots) = id_and_roots(&self.trust, end_entity)?;
        let td = id.trust_domain_name();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| Error::General(format!("trust domain {td}: {e}")))?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies server SVIDs (client side of HBONE): chain against the bundle of
/// the server ID's trust domain; the DNS name is not used (SVIDs carry none).
pub struct SpiffeServerVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    pub fn new(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let (_, roots) = id_and_roots(&self.trust, end_entity)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The crypto provider used everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Always presents one certificate.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Presents {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A fatal `unrecognized_name` alert (RFC 6066 §3) as a plaintext TLS record
/// (RFC 8446 §5.1, §6: alerts before the ServerHello are unencrypted):
/// type alert (21), legacy version 3.3, length 2, level fatal (2),
/// description 112. rustls has no way to send this one, so it is written
/// as is when no workload behind the requested server name has an identity.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

/// Presents no certificate.
#[derive(Debug)]
struct NoCertificate;

impl rustls::server::ResolvesServerCert for NoCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// A server configuration that presents nothing: only used to take back the
/// socket of a handshake that will not proceed.
pub fn no_certificate_config(provider: Arc<CryptoProvider>) -> Result<rustls::ServerConfig, Error> {
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate)))
}

/// Server configuration for one HBONE connection: TLS 1.3, client SVID
/// required, presenting the destination workload's SVID.
pub fn server_config(
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    svid: Arc<rustls::sign::CertifiedKey>,
) -> Result<rustls::ServerConfig, Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(trust, provider.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Presents(svid)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Client configuration for one source workload: presents its SVID.
pub fn client_config(
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    svid: &crate::identity::Svid,
) -> Result<rustls::ClientConfig, Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, provider.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}
