//! Workload identity (DESIGN §1 step 3): X.509-SVIDs per SPIFFE ID from the
//! configured provider, renewed at half-life, and trust bundles per trust domain.
pub mod ca;
pub mod spire;

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
    /// When this node obtained it. A backdated `not_before` (clock-skew
    /// allowance) is no part of the lifetime left to use.
    pub received_at: SystemTime,
}

impl Svid {
    /// Half-way through the validity that was left when the SVID arrived:
    /// when a new SVID is due. Backdating never makes an SVID renew early.
    pub fn renew_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received_at);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life / 2
    }
}

/// An SVID ready for rustls, with a generation number that changes on renewal.
pub struct IssuedSvid {
    pub svid: Svid,
    pub certified: Arc<CertifiedKey>,
    pub generation: u64,
    /// Asked for since it was issued (embedded CA): an SVID nobody asked
    /// for in its first half-life, and that no open connection holds, is
    /// dropped at renewal time instead of renewed.
    pub(crate) used: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("SVID for {id}: {message}")]
    Key { id: String, message: String },
    #[error("trust bundle {path}: {message}")]
    Bundle { path: String, message: String },
    #[error("SPIRE agent admin socket {socket}: {message}")]
    Spire { socket: String, message: String },
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

    /// Adds the bundles of `other` (other wins on a clash).
    pub fn merge(&mut self, other: &Bundles) {
        for (td, roots) in &other.roots {
            self.roots.insert(td.clone(), roots.clone());
        }
    }

    pub fn roots(&self, trust_domain: &str) -> Option<Arc<RootCertStore>> {
        self.roots.get(trust_domain).cloned()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.roots.keys().map(String::as_str)
    }
}

/// The trust bundles in force; replaced as a whole when they change (SPIRE
/// streams them), read per handshake.
#[derive(Default)]
pub struct TrustStore(std::sync::RwLock<Arc<Bundles>>);

impl TrustStore {
    pub fn new(bundles: Bundles) -> Self {
        Self(std::sync::RwLock::new(Arc::new(bundles)))
    }

    pub fn current(&self) -> Arc<Bundles> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, bundles: Bundles) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundles);
    }
}

/// An SVID held for a SPIFFE ID, as the admin endpoints show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldSvid {
    pub spiffe_id: String,
    pub renew_at: SystemTime,
    pub not_after: SystemTime,
    pub generation: u64,
}

/// Where SVIDs come from.
pub enum Source {
    /// The embedded CA; identities come from the registration entries.
    Embedded(Box<Ca>),
    /// SPIRE Agent's Delegated Identity API; SPIRE matches the selectors.
    Spire(Arc<spire::SpireSource>),
}

/// Issues and caches SVIDs for the workloads of this node.
pub struct IdentityManager {
    source: Source,
    trust_domain: TrustDomain,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
    svids: Mutex<HashMap<SpiffeId, Arc<IssuedSvid>>>,
    next_generation: std::sync::atomic::AtomicU64,
    trust: Arc<TrustStore>,
}

impl IdentityManager {
    pub fn new(
        source: Source,
        trust_domain: TrustDomain,
        ttl: Duration,
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            source,
            trust_domain,
            ttl,
            provider,
            svids: Mutex::default(),
            next_generation: 1.into(),
            trust,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn trust(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// The SVID a workload is entitled to, `None` when it has no identity.
    /// Embedded: the registration entries decided (`att.spiffe_id`); SPIRE:
    /// SPIRE decides from the workload's selectors.
    pub async fn identify(
        self: &Arc<Self>,
        att: &crate::attest::Attestation,
    ) -> Result<Option<Arc<IssuedSvid>>, IdentityError> {
        match &self.source {
            Source::Embedded(_) => {
                let Some(id) = &att.spiffe_id else {
                    return Ok(None);
                };
                if let Some(s) = self.cached(id) {
                    return Ok(Some(s));
                }
                // Issuing signs (and makes a key): on the blocking pool, not
                // a data-plane thread.
                let (this, id) = (self.clone(), id.clone());
                let name = id.to_string();
                tokio::task::spawn_blocking(move || this.svid(&id))
                    .await
                    .map_err(|e| IdentityError::Key {
                        id: name,
                        message: format!("the issuing task failed: {e}"),
                    })?
                    .map(Some)
            }
            Source::Spire(spire) => Ok(spire.svid_for(&att.selectors).await),
        }
    }

    /// A new generation number for a freshly obtained SVID.
    pub fn next_generation(&self) -> u64 {
        self.next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The SVID of `id` held and not yet due for renewal (marked used).
    fn cached(&self, id: &SpiffeId) -> Option<Arc<IssuedSvid>> {
        let svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
        let s = svids.get(id)?;
        if SystemTime::now() >= s.svid.renew_at() {
            return None;
        }
        s.used.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(s.clone())
    }

    /// The current SVID of `id`, issuing or renewing it when due (signs:
    /// call it off the data-plane threads).
    pub fn svid(&self, id: &SpiffeId) -> Result<Arc<IssuedSvid>, IdentityError> {
        let Source::Embedded(ca) = &self.source else {
            return Err(IdentityError::Key {
                id: id.to_string(),
                message: "SVIDs come from SPIRE; none is held for this ID".into(),
            });
        };
        let now = SystemTime::now();
        let previous = {
            let svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
            match svids.get(id) {
                Some(s) if now < s.svid.renew_at() => {
                    s.used.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(s.clone());
                }
                other => other.map(|s| s.generation),
            }
        };
        let svid = ca.issue(id, self.ttl)?;
        let certified =
            CertifiedKey::from_der(svid.chain.clone(), svid.key.clone_key(), &self.provider)
                .map_err(|e| IdentityError::Key {
                    id: id.to_string(),
                    message: e.to_string(),
                })?;
        let mut svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
        // Concurrent first connections of one workload each issue one: the
        // first stored wins, so that they all hold the same SVID (and share
        // the HBONE connections of its generation).
        if let Some(s) = svids.get(id)
            && now < s.svid.renew_at()
        {
            return Ok(s.clone());
        }
        let generation = self.next_generation();
        let issued = Arc::new(IssuedSvid {
            svid,
            certified: Arc::new(certified),
            generation,
            used: false.into(),
        });
        svids.insert(id.clone(), issued.clone());
        drop(svids);
        info!(
            spiffe_id = %id,
            generation,
            renewed_from = previous,
            ttl_secs = self.ttl.as_secs(),
            "{}",
            if previous.is_some() { "SVID renewed" } else { "SVID issued" }
        );
        Ok(issued)
    }

    /// Renews every held SVID that reached half-life and is in use (asked
    /// for since it was issued, or held by an open connection); run
    /// periodically so an identity in use always holds a fresh SVID. One
    /// not in use is dropped (issued again on demand): the map holds the
    /// identities in use, not every one ever seen.
    pub fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = {
            let mut svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
            svids.retain(|id, s| {
                // In use: asked for since issued, or held by an open
                // connection (a clone besides this map's).
                let keep = now < s.svid.renew_at()
                    || s.used.swap(false, std::sync::atomic::Ordering::Relaxed)
                    || Arc::strong_count(s) > 1;
                if !keep {
                    tracing::debug!(spiffe_id = %id, "SVID unused for half its life; dropped, not renewed");
                }
                keep
            });
            svids
                .iter()
                .filter(|(_, s)| now >= s.svid.renew_at())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in due {
            if let Err(e) = self.svid(&id) {
                tracing::warn!(spiffe_id = %id, error = %e, "SVID renewal failed");
            }
        }
    }

    /// The SVIDs held now, one per SPIFFE ID (the earliest to expire when
    /// SPIRE sent one ID for several selector sets), sorted by ID.
    pub fn held(&self) -> Vec<HeldSvid> {
        let all: Vec<Arc<IssuedSvid>> = match &self.source {
            Source::Embedded(_) => {
                let svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
                svids.values().cloned().collect()
            }
            Source::Spire(spire) => spire.held(),
        };
        let mut by_id: std::collections::BTreeMap<String, HeldSvid> = Default::default();
        for s in all {
            let held = HeldSvid {
                spiffe_id: s.svid.spiffe_id.to_string(),
                renew_at: s.svid.renew_at(),
                not_after: s.svid.not_after,
                generation: s.generation,
            };
            match by_id.get(&held.spiffe_id) {
                Some(h) if h.not_after <= held.not_after => {}
                _ => {
                    by_id.insert(held.spiffe_id.clone(), held);
                }
            }
        }
        by_id.into_values().collect()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svids_nobody_asks_for_are_dropped_not_renewed() {
        let td = TrustDomain::new("ai.example.org").expect("td");
        let ca = Ca::generate(&td).expect("ca");
        let mgr = IdentityManager::new(
            Source::Embedded(Box::new(ca)),
            td,
            Duration::from_secs(2),
            Arc::new(TrustStore::new(Bundles::default())),
            crate::tls::provider(),
        );
        let used = SpiffeId::new("spiffe://ai.example.org/used").expect("id");
        let idle = SpiffeId::new("spiffe://ai.example.org/idle").expect("id");
        let open = SpiffeId::new("spiffe://ai.example.org/open").expect("id");
        // Held by an open connection, never asked for again.
        let held_open = mgr.svid(&open).expect("svid");
        let first = mgr.svid(&used).expect("svid");
        let first_generation = first.generation;
        mgr.svid(&idle).expect("svid");
        // Asked for again during its first half-life: in use.
        mgr.svid(&used).expect("svid");
        let due = first.svid.renew_at();
        drop(first);
        while SystemTime::now() < due + Duration::from_millis(50) {
            std::thread::sleep(Duration::from_millis(50));
        }
        mgr.renew_due();
        let held = mgr.svids.lock().expect("lock");
        assert!(
            !held.contains_key(&idle),
            "an SVID nobody asked for is dropped"
        );
        let renewed = held.get(&used).expect("the used SVID is held");
        assert_ne!(renewed.generation, first_generation, "and renewed");
        let renewed = held
            .get(&open)
            .expect("the SVID of an open connection is held");
        assert_ne!(renewed.generation, held_open.generation, "and renewed");
    }

    #[test]
    fn short_lived_svid_renews_at_half_its_real_validity_not_now() {
        let td = TrustDomain::new("ai.example.org").expect("td");
        let ca = Ca::generate(&td).expect("ca");
        let id = SpiffeId::new("spiffe://ai.example.org/w").expect("id");
        // 4 s of validity, backdated by 4 s (the allowance is capped at the TTL).
        let svid = ca.issue(&id, Duration::from_secs(4)).expect("svid");
        let now = SystemTime::now();
        let due = svid.renew_at();
        assert!(
            due > now + Duration::from_millis(1500),
            "due {:?} after issue; the backdating was counted into the lifetime",
            due.duration_since(now)
        );
        assert!(due <= svid.not_after - Duration::from_millis(1900));
    }
}
