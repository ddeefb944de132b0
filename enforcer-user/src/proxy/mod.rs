//! The data plane: listeners and per-connection forwarding.
pub mod inbound;
pub mod outbound;

use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique connection id, present in every log line of a connection.
pub fn next_conn_id() -> u64 {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// How a proxied connection ended (the `outcome` label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished cleanly.
    Ok,
    /// The kernel had no record for the accepted socket: not a captured
    /// connection (or its record was lost). Refused.
    NoOriginalDestination,
    /// The original destination could not be reached.
    ConnectFailed,
    /// The connection broke while proxying.
    Error,
    /// The workload has no SPIFFE identity (no registration entry matches).
    NoIdentity,
    /// The HBONE tunnel to the peer agent could not be opened.
    TunnelFailed,
    /// The request on the tunnel was malformed or named another destination.
    BadRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoOriginalDestination => "no_original_destination",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Error => "error",
            Outcome::NoIdentity => "no_identity",
            Outcome::TunnelFailed => "tunnel_failed",
            Outcome::BadRequest => "bad_request",
        }
    }
}
