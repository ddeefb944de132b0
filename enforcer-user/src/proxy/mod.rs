//! The data plane: listeners and per-connection forwarding.
pub mod drain;
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
    let stop = drain::draining();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut stop => {
                tracing::info!(listener = what, "draining: the listener is closed");
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                // `map`, not an `async` block around the task: a block would
                // hold the task twice (as its capture and as the future it
                // awaits), and a connection task lives as long as its
                // connection.
                use futures_util::FutureExt as _;
                let tracked = drain::track();
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

/// How long the agent waits for a destination to accept.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits at most [`CONNECT_TIMEOUT`] for a connect; the error says why it failed.
pub async fn connect_within(
    connect: impl std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
) -> Result<tokio::net::TcpStream, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {CONNECT_TIMEOUT:?}")),
    }
}

/// The workload behind a local destination address — the owner of the
/// listener the kernel picks for it — as policy sees it: its SVID (`None`
/// when it has none or cannot be attested, which is logged) and selectors.
pub async fn local_destination(
    local: &std::sync::Arc<crate::attest::local::LocalAttestor>,
    attestor: &std::sync::Arc<crate::attest::Attestor>,
    identity: &crate::identity::IdentityManager,
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

/// Connects to a workload on this node from a loopback source address, so
/// the kernel's inbound steering recognises the agent's own forwards.
pub async fn connect_local(dst: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let src = if dst.is_ipv4() {
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let stream = crate::capture::mark::connect(dst, Some(src)).await?;
    arm_reset(&stream);
    Ok(stream)
}

/// A dialer for [`crate::l7`] sessions: reconnects to a local workload.
pub fn dial_local(dst: std::net::SocketAddr) -> crate::l7::Dial {
    std::sync::Arc::new(move || Box::pin(connect_local(dst)))
}

/// Relays an accepted TCP connection to `upstream`: spliced at L4, or, when
/// its destination is declared L7 (`session`: the route, the connection's
/// context, and how to reopen the server connection when the server closes
/// it), each request decided and then forwarded. Returns the outcome and
/// the bytes (from the client, to the client).
pub async fn relay(
    l7: &std::sync::Arc<crate::l7::L7>,
    session: Option<(
        std::sync::Arc<crate::l7::Route>,
        crate::l7::Conn,
        crate::l7::Dial,
    )>,
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
) -> (Outcome, (u64, u64)) {
    let Some((route, conn, dial)) = session else {
        return splice_tcp(client, upstream).await;
    };
    let served =
        crate::l7::http::serve_tcp(l7.clone(), route, conn, client, Some(upstream), dial).await;
    tracing::debug!(requests = served.requests, "L7 session ended");
    (served.outcome(), (served.from_client, served.to_client))
}

/// Runs both directions of a relay until both end, or until the first one
/// fails: the other is then abandoned and the error returned, so that the
/// caller resets what is left instead of closing it as if complete. The
/// directions must not close their sockets on drop (borrowed halves).
pub async fn both_directions(
    up: impl std::future::Future<Output = std::io::Result<()>>,
    down: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let forced = drain::forced();
    tokio::pin!(up, down, forced);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            () = &mut forced => {
                return Err(std::io::Error::other("the agent's drain time is over"));
            }
            r = &mut up, if !up_done => {
                r?;
                up_done = true;
            }
            r = &mut down, if !down_done => {
                r?;
                down_done = true;
            }
        }
    }
    Ok(())
}

/// Copies both ways until both sides are done. Returns the outcome and the
/// bytes (workload → destination, destination → workload), counted even when
/// one side breaks. When either side fails, both connections are reset: a
/// relay that broke never ends with a clean close.
pub async fn splice_tcp(
    mut client: tokio::net::TcpStream,
    mut upstream: tokio::net::TcpStream,
) -> (Outcome, (u64, u64)) {
    let (mut sent, mut received) = (0, 0);
    let result = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        both_directions(pump(cr, uw, &mut sent), pump(ur, cw, &mut received)).await
    };
    match result {
        Ok(()) => (Outcome::Ok, (sent, received)),
        Err(e) => {
            tracing::debug!(error = %e, "relay failed; resetting both connections");
            reset(client);
            reset(upstream);
            (Outcome::broken(), (sent, received))
        }
    }
}

/// One direction: copies until EOF, then half-closes the writer (its reset
/// disarmed first: this side of the relay has really ended).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    total: &mut u64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // Grows with traffic: 1 KiB, then 16 KiB, then 64 KiB, each time a read
    // fills the buffer (an idle connection holds 1 KiB per direction).
    let mut buf = vec![0u8; 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            disarm_reset(to.as_ref());
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *total += n as u64;
        if n == buf.len() && buf.len() < 64 * 1024 {
            buf.resize(buf.len() * if buf.len() < 16 * 1024 { 16 } else { 4 }, 0);
        }
    }
}

/// Closes with RST so the peer sees an error rather than a clean EOF.
pub fn reset(stream: tokio::net::TcpStream) {
    arm_reset(&stream);
    drop(stream);
}

/// Makes a workload-facing socket close with RST (linger 0) however it is
/// closed — by this process, or by the kernel when this process dies
/// (`kill -9`, OOM, panic=abort) — until [`disarm_reset`]: a relay cut
/// short by the agent's own death is never seen as a complete one. Armed
/// when the socket is accepted or connected.
pub fn arm_reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// The relay's other side ended cleanly: this socket may now end with a
/// FIN after its last byte (a close with linger 0 would discard unsent
/// data). Called just before the write side is shut down.
pub fn disarm_reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(None);
}

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
    /// Plaintext from outside the mesh to a `strict` port.
    PlaintextRefused,
    /// Policy denied the connection.
    Denied,
    /// Still open when the agent's drain time ran out: reset.
    Drained,
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
            Outcome::PlaintextRefused => "plaintext_refused",
            Outcome::Denied => "denied",
            Outcome::Drained => "drained",
        }
    }

    /// A relay that failed: `drained` when the drain cut it, else `error`.
    pub fn broken() -> Self {
        if drain::is_forced() {
            Outcome::Drained
        } else {
            Outcome::Error
        }
    }
}
