//! Workload identity (DESIGN §1 step 3): X.509-SVIDs per SPIFFE ID from the
//! configured provider, renewed at half-life, and trust bundles per trust domain.
pub mod ca;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use spiffe::{SpiffeId, TrustDomain};
use tracing::info;

pub use ca::{Ca, CaError};

/// An X.509-SVID: the chain (leaf first), its private key, and its validity.
pub struct Svid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// Half-way through the validity: when a new SVID is due.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// An SVID ready for rustls, with a generation number that changes on renewal.
pub struct IssuedSvid {
    pub svid: Svid,
    pub certified: Arc<CertifiedKey>,
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("SVID for {id}: {message}")]
    Key { id: String, message: String },
    #[error("trust bundle {path}: {message}")]
    Bundle { path: String, message: String },
}

/// Trust bundles: the CA certificates trusted for each trust domain.
#[derive(Clone, Default)]
pub struct Bundles {
    roots: HashMap<String, Arc<RootCertStore>>,
}

impl Bundles {
    pub fn insert(
        &mut self,
        trust_domain: &TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<(), IdentityError> {
        let mut store = RootCertStore::empty();
        for c in certs {
            store.add(c).map_err(|e| IdentityError::Bundle {
                path: trust_domain.to_string(),
                message: e.to_string(),
            })?;
        }
        self.roots.insert(trust_domain.to_string(), Arc::new(store));
        Ok(())
    }

    /// Reads a PEM bundle file (one or more CA certificates).
    pub fn insert_pem_file(
        &mut self,
        trust_domain: &TrustDomain,
        path: &Path,
    ) -> Result<(), IdentityError> {
        let err = |message: String| IdentityError::Bundle {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(err("contains no certificate".into()));
        }
        self.insert(trust_domain, certs)
    }

    pub fn roots(&self, trust_domain: &str) -> Option<Arc<RootCertStore>> {
        self.roots.get(trust_domain).cloned()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.roots.keys().map(String::as_str)
    }
}

/// Issues and caches SVIDs for the workloads of this node.
pub struct IdentityManager {
    ca: Ca,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    svids: Mutex<HashMap<SpiffeId, Arc<IssuedSvid>>>,
    next_generation: std::sync::atomic::AtomicU64,
    bundles: Bundles,
}

impl IdentityManager {
    pub fn new(ca: Ca, ttl: Duration, bundles: Bundles, provider: Arc<CryptoProvider>) -> Self {
        Self {
            ca,
            ttl,
            provider,
            svids: Mutex::default(),
            next_generation: 1.into(),
            bundles,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    pub fn bundles(&self) -> &Bundles {
        &self.bundles
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The current SVID of `id`, issuing or renewing it when due.
    pub fn svid(&self, id: &SpiffeId) -> Result<Arc<IssuedSvid>, IdentityError> {
        let now = SystemTime::now();
        let previous = {
            let svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
            match svids.get(id) {
                Some(s) if now < s.svid.renew_at() => return Ok(s.clone()),
                other => other.map(|s| s.generation),
            }
        };
        let svid = self.ca.issue(id, self.ttl)?;
        let certified =
            CertifiedKey::from_der(svid.chain.clone(), svid.key.clone_key(), &self.provider)
                .map_err(|e| IdentityError::Key {
                    id: id.to_string(),
                    message: e.to_string(),
                })?;
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let issued = Arc::new(IssuedSvid {
            svid,
            certified: Arc::new(certified),
            generation,
        });
        info!(
            spiffe_id = %id,
            generation,
            renewed_from = previous,
            ttl_secs = self.ttl.as_secs(),
            "{}",
            if previous.is_some() { "SVID renewed" } else { "SVID issued" }
        );
        self.svids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// Renews every cached SVID that reached half-life; run periodically so an
    /// identity in use always holds a fresh SVID.
    pub fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = self
            .svids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| now >= s.svid.renew_at())
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Err(e) = self.svid(&id) {
                tracing::warn!(spiffe_id = %id, error = %e, "SVID renewal failed");
            }
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
