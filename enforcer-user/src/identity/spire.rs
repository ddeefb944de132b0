//! The `spire` provider: SVIDs and trust bundles from SPIRE Agent's Delegated
//! Identity API on its admin socket. SPIRE matches the selectors the agent
//! attested against its own registration entries; updates (rotations, new
//! bundles) are streamed and replace what is held.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt as _;
use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Svid;
use spire_api::{DelegateAttestationRequest, DelegatedIdentityClient, selectors::Selector};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Bundles, IdentityError, IssuedSvid, Svid, TrustStore};

/// How long a first answer for a workload may take before it counts as none.
const FIRST_ANSWER: Duration = Duration::from_secs(5);
/// How long SPIRE's "no identity" for a set of selectors is believed before
/// SPIRE is asked again (each connection of such a workload asked it).
const NO_IDENTITY_TTL: Duration = Duration::from_secs(30);
/// Selector sets followed at once; past it, the least recently used one is
/// dropped, and its stream ends once no connection holds it.
const MAX_FOLLOWED: usize = 4096;

#[derive(Clone)]
enum Sub {
    Pending,
    Svid(Arc<IssuedSvid>),
    /// SPIRE said so, at that time (kept [`NO_IDENTITY_TTL`]).
    NoIdentity(Instant),
    /// The stream failed (SPIRE restarting): asked again next time.
    Failed,
}

/// One selector set's subscription and when a connection last asked.
struct Followed {
    rx: watch::Receiver<Sub>,
    used: Instant,
}

pub struct SpireSource {
    client: DelegatedIdentityClient,
    provider: Arc<CryptoProvider>,
    subs: Arc<Mutex<HashMap<Vec<String>, Followed>>>,
    generation: std::sync::atomic::AtomicU64,
    socket: String,
}

fn spire_err(socket: &str, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Spire {
        socket: socket.to_owned(),
        message: e.to_string(),
    }
}

impl SpireSource {
    /// Connects to the SPIRE Agent admin socket.
    pub async fn connect(
        socket: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let s = socket.display().to_string();
        if !socket.exists() {
            return Err(spire_err(
                &s,
                "no such socket (is the SPIRE agent running with an admin socket, and is this agent in authorized_delegates?)",
            ));
        }
        let client = DelegatedIdentityClient::connect_to(format!("unix://{s}"))
            .await
            .map_err(|e| spire_err(&s, e))?;
        Ok(Self {
            client,
            provider,
            subs: Arc::default(),
            generation: 1.into(),
            socket: s,
        })
    }

    /// The first set of trust bundles (startup waits for it).
    pub async fn fetch_bundles(&self) -> Result<Bundles, IdentityError> {
        let set = tokio::time::timeout(Duration::from_secs(10), self.client.fetch_x509_bundles())
            .await
            .map_err(|_| spire_err(&self.socket, "no trust bundles within 10 s"))?
            .map_err(|e| spire_err(&self.socket, e))?;
        bundles_from(&set)
    }

    /// Follows the bundle stream, replacing the trust store (merged with the
    /// bundles in `extra`, from the config) on every update. Reconnects.
    pub async fn follow_bundles(self: Arc<Self>, trust: Arc<TrustStore>, extra: Bundles) {
        loop {
            match self.client.stream_x509_bundles().await {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        match item
                            .map_err(|e| spire_err(&self.socket, e))
                            .and_then(|s| bundles_from(&s))
                        {
                            Ok(mut b) => {
                                b.merge(&extra);
                                info!(trust_domains = ?b.trust_domains().collect::<Vec<_>>(), "trust bundles updated from SPIRE");
                                trust.replace(b);
                            }
                            Err(e) => {
                                warn!(error = %e, "SPIRE bundle update rejected; keeping the bundles in force");
                            }
                        }
                    }
                    warn!("SPIRE bundle stream ended; reconnecting");
                }
                Err(e) => {
                    warn!(error = %e, socket = %self.socket, "subscribing to SPIRE bundles failed; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The SVIDs SPIRE sent for the selector sets followed now.
    pub fn held(&self) -> Vec<Arc<IssuedSvid>> {
        let subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.values()
            .filter_map(|f| match &*f.rx.borrow() {
                Sub::Svid(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The SVID SPIRE issues for a workload with these selectors, following
    /// its updates; `None` when SPIRE has no identity for it.
    pub async fn svid_for(&self, selectors: &[String]) -> Option<Arc<IssuedSvid>> {
        let mut key: Vec<String> = selectors.to_vec();
        key.sort();
        let now = Instant::now();
        let mut rx = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            let current = subs.get_mut(&key).filter(|f| match &*f.rx.borrow() {
                Sub::NoIdentity(at) => at.elapsed() < NO_IDENTITY_TTL,
                Sub::Failed => false,
                _ => true,
            });
            match current {
                Some(f) => {
                    f.used = now;
                    f.rx.clone()
                }
                None => {
                    if !subs.contains_key(&key) && subs.len() >= MAX_FOLLOWED {
                        let oldest = subs
                            .iter()
                            .min_by_key(|(_, f)| f.used)
                            .map(|(k, _)| k.clone());
                        if let Some(k) = oldest {
                            subs.remove(&k);
                        }
                    }
                    let rx = self.subscribe(key.clone());
                    let used = now;
                    subs.insert(
                        key.clone(),
                        Followed {
                            rx: rx.clone(),
                            used,
                        },
                    );
                    rx
                }
            }
        };
        let answer =
            tokio::time::timeout(FIRST_ANSWER, rx.wait_for(|s| !matches!(s, Sub::Pending)))
                .await
                .ok()
                .and_then(|r| r.ok().map(|s| s.clone()));
        match answer {
            Some(Sub::Svid(s)) => Some(s),
            _ => None,
        }
    }

    fn subscribe(&self, key: Vec<String>) -> watch::Receiver<Sub> {
        let (tx, rx) = watch::channel(Sub::Pending);
        let client = self.client.clone();
        let provider = self.provider.clone();
        let socket = self.socket.clone();
        let generation = self.next_generation_base();
        tokio::spawn(async move {
            let selectors: Vec<Selector> = key
                .iter()
                .filter_map(|s| s.split_once(':'))
                .map(|(t, v)| Selector::Generic((t.to_owned(), v.to_owned())))
                .collect();
            let result = match DelegateAttestationRequest::for_selectors(selectors) {
                Ok(req) => client.stream_x509_svids(req).await,
                Err(e) => Err(e.into()),
            };
            let mut end = Sub::Failed;
            match result {
                Ok(mut stream) => {
                    let mut n = 0u64;
                    loop {
                        // Ends when no connection and no map entry holds
                        // the subscription any more.
                        let item = tokio::select! {
                            item = stream.next() => item,
                            () = tx.closed() => break,
                        };
                        let Some(item) = item else { break };
                        let svid = match item {
                            Ok(s) => s,
                            Err(e) if n == 0 && no_identity(&e) => {
                                info!(selectors = ?key, error = %e, socket, "SPIRE issued no identity for this workload");
                                end = Sub::NoIdentity(Instant::now());
                                break;
                            }
                            Err(e) => {
                                warn!(selectors = ?key, error = %e, socket, "the SPIRE SVID stream failed");
                                break;
                            }
                        };
                        match issued(&svid, &provider, generation + n) {
                            Ok(issued) => {
                                n += 1;
                                info!(spiffe_id = %issued.svid.spiffe_id, generation = issued.generation, "SVID received from SPIRE");
                                if tx.send(Sub::Svid(Arc::new(issued))).is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                warn!(selectors = ?key, error = %e, socket, "SPIRE sent an SVID that cannot be used");
                                break;
                            }
                        }
                    }
                }
                Err(e) if no_identity(&e) => {
                    info!(selectors = ?key, error = %e, socket, "SPIRE issued no identity for this workload");
                    end = Sub::NoIdentity(Instant::now());
                }
                Err(e) => {
                    warn!(selectors = ?key, error = %e, socket, "subscribing to SPIRE SVIDs failed")
                }
            }
            let _ = tx.send(end);
        });
        rx
    }

    /// Generation numbers for SPIRE SVIDs: a block per subscription.
    fn next_generation_base(&self) -> u64 {
        self.generation
            .fetch_add(1 << 32, std::sync::atomic::Ordering::Relaxed)
    }
}

/// SPIRE's answer for selectors no registration entry matches: the
/// subscription refused with `PERMISSION_DENIED` (not a transport failure).
fn no_identity(e: &spire_api::DelegatedIdentityError) -> bool {
    use spiffe::transport::{GrpcStatusCode, TransportError};
    matches!(
        e,
        spire_api::DelegatedIdentityError::Transport(TransportError::Status(s))
            if s.code() == GrpcStatusCode::PermissionDenied
    )
}

fn issued(
    svid: &X509Svid,
    provider: &CryptoProvider,
    generation: u64,
) -> Result<IssuedSvid, String> {
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
        .map_err(|e| format!("SVID leaf: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let not_before = at(leaf.validity().not_before.timestamp());
    let not_after = at(leaf.validity().not_after.timestamp());
    let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), provider)
        .map_err(|e| format!("SVID key: {e}"))?;
    Ok(IssuedSvid {
        used: false.into(),
        svid: Svid {
            spiffe_id: svid.spiffe_id().clone(),
            chain,
            key,
            not_before,
            not_after,
            received_at: std::time::SystemTime::now(),
        },
        certified: Arc::new(certified),
        generation,
    })
}

fn bundles_from(set: &spiffe::X509BundleSet) -> Result<Bundles, IdentityError> {
    let mut out = Bundles::default();
    for (td, bundle) in set.iter() {
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        out.insert(td, certs)?;
    }
    Ok(out)
}
