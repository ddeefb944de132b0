//! The `spire` provider: SVIDs and trust bundles from SPIRE Agent's Delegated
//! Identity API (admin socket). SPIRE matches the workload's selectors against
//! its registration entries; the agent only relays what it attested.
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

use super::IssuedSvid;

/// Placeholder until the SPIRE client lands: never yields an identity.
pub struct SpireSource {
    pub provider: Arc<CryptoProvider>,
}

impl SpireSource {
    pub async fn svid_for(&self, _selectors: &[String]) -> Option<Arc<IssuedSvid>> {
        None
    }
}
