//! The data plane: listeners and per-connection forwarding.
pub use crate::{
    copy::{arm_reset, reset},
    mark::connect_within,
    record::Outcome,
};

pub mod inbound;
pub mod outbound;
pub mod plaintext;

/// Accepts on `listener` until the agent drains, running each connection's
/// task (`on_accept`'s future) as a task of its own that the drain waits
/// for. Accept errors (EMFILE and friends) back off instead of spinning.
pub async fn accept_loop<F>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    mut on_accept: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    // The drain waits for this loop to stop: a connection it accepts as
    // the drain begins is counted before the drain can find none open
    // (else the agent exited under it and it was reset:
    // upgrade::connects_spread_over_an_upgrade_all_succeed, 1 in 1 000).
    let _listening = crate::drain::listening();
    let stop = crate::drain::draining();
    tokio::pin!(stop);
    loop {
        // The drain first: once it began, no new connection is taken.
        let accepted = tokio::select! {
            biased;
            () = &mut stop => {
                tracing::info!(listener = what, "draining: the listener is closed");
                return;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // `map`, not an `async` block around the task: a block would
                // hold the task twice (as its capture and as the future it
                // awaits), and a connection task lives as long as its
                // connection.
                use futures_util::FutureExt as _;
                let tracked = crate::drain::track();
                tokio::spawn(on_accept(stream, peer).map(move |()| drop(tracked)));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The policy's view of a workload: its identity, selectors and address.
pub fn peer(
    svid: Option<&crate::identity::IssuedSvid>,
    selectors: &[String],
    addr: Option<std::net::SocketAddr>,
) -> crate::policy::Peer {
    crate::policy::Peer {
        authenticated: Some(svid.is_some()),
        selectors: selectors.to_vec(),
        address: addr.map(|a| a.ip().to_canonical().to_string()),
        port: addr.map(|a| a.port()),
        ..Default::default()
    }
    .with_id(svid.map(|s| &s.svid.spiffe_id))
}

/// The workload behind a local destination address — the owner of the
/// listener the kernel picks for it — as policy sees it: its SVID (`None`
/// when it has none or cannot be attested, which is logged) and selectors.
pub async fn local_destination(
    local: &std::sync::Arc<crate::attest::local::LocalAttestor>,
    attestor: &std::sync::Arc<crate::attest::Attestor>,
    identity: &std::sync::Arc<crate::identity::IdentityManager>,
    dst: std::net::SocketAddr,
) -> (
    Option<std::sync::Arc<crate::identity::IssuedSvid>>,
    Vec<String>,
) {
    match local.attest(attestor, dst).await {
        Ok(a) => (identity.identify(&a).await.ok().flatten(), a.selectors),
        Err(e) => {
            tracing::warn!(error = %e, "attesting the destination failed");
            (None, vec![])
        }
    }
}

/// Connects to a workload on this node (in `net`: the node's netns or a
/// pod's) from a loopback source address, so the kernel's inbound steering
/// recognises the agent's own forwards.
pub async fn connect_local(
    net: &crate::netns::Net,
    dst: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let src = if dst.is_ipv4() {
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let stream = crate::mark::connect_in(net, dst, Some(src)).await?;
    arm_reset(&stream);
    Ok(stream)
}

/// A dialer for [`crate::l7`] sessions: reconnects to a local workload.
pub fn dial_local(net: &crate::netns::Net, dst: std::net::SocketAddr) -> crate::l7::Dial {
    let net = net.clone();
    std::sync::Arc::new(move || {
        let net = net.clone();
        Box::pin(async move { connect_local(&net, dst).await })
    })
}

/// What a set-up connection relays to, and how. A connection's task sets
/// up (attestation, identity, policy, the upstream's connect or tunnel) in
/// a boxed future of its own, freed once it yields a `Relay`, then runs
/// the relay: an open connection costs only the relay's state for as long
/// as it lives, not the setup's too (the outbound task: 3.8 → 1.7 KB).
pub enum Relay {
    /// An HBONE stream to the destination's agent.
    Tunnel {
        client: tokio::net::TcpStream,
        tunnel: crate::tunnel::Tunnel,
    },
    /// The destination itself, bytes as they come.
    Tcp {
        client: tokio::net::TcpStream,
        upstream: tokio::net::TcpStream,
    },
    /// The destination itself, declared L7: each request decided, then
    /// forwarded (boxed: rarer, and its session larger).
    L7 {
        session: Box<L7Session>,
        client: tokio::net::TcpStream,
        upstream: tokio::net::TcpStream,
    },
}

/// The route, the connection's context, and how to reopen the server
/// connection when the server closes it.
pub type L7Session = (
    std::sync::Arc<crate::l7::Route>,
    crate::l7::Conn,
    crate::l7::Dial,
);

impl Relay {
    /// To `upstream`: spliced at L4, or per request with a `session`.
    pub fn direct(
        session: Option<L7Session>,
        client: tokio::net::TcpStream,
        upstream: tokio::net::TcpStream,
    ) -> Self {
        match session {
            Some(session) => Self::L7 {
                session: Box::new(session),
                client,
                upstream,
            },
            None => Self::Tcp { client, upstream },
        }
    }

    /// Relays until both sides end or one fails (then the workload's side
    /// is reset). The outcome and the bytes (from the client, to it).
    pub async fn run(self, l7: &std::sync::Arc<crate::l7::L7>) -> (Outcome, (u64, u64)) {
        match self {
            Self::Tunnel { client, tunnel } => {
                crate::copy::tcp_to_stream(client, tunnel.send, tunnel.recv).await
            }
            Self::Tcp { client, upstream } => crate::copy::tcp_to_tcp(client, upstream).await,
            Self::L7 {
                session,
                client,
                upstream,
            } => {
                let (route, conn, dial) = *session;
                let served = Box::pin(crate::l7::http::serve_tcp(
                    l7.clone(),
                    route,
                    conn,
                    client,
                    Some(upstream),
                    dial,
                ))
                .await;
                tracing::debug!(requests = served.requests, "L7 session ended");
                (served.outcome(), (served.from_client, served.to_client))
            }
        }
    }
}

/// Ends a connection that will not be relayed: the workload's socket is
/// reset (it sees an error, never a clean end) and its record written.
pub fn refuse<T>(
    client: tokio::net::TcpStream,
    mut rec: crate::record::ConnRecord,
    outcome: Outcome,
) -> Option<T> {
    reset(client);
    rec.refused(outcome);
    None
}

use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique connection id, present in every log line of a connection.
pub fn next_conn_id() -> u64 {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}
