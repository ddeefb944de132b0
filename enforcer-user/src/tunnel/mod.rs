//! HBONE (DESIGN §1 step 4): HTTP/2 CONNECT over TLS 1.3 mutual TLS to the
//! destination node's port 15008. The client presents the source workload's
//! SVID; connections are pooled per (source identity, destination node,
//! destination port) and multiplexed, and a renewed SVID opens new connections
//! while streams on the old ones run to completion.
use std::{
    collections::HashMap,
    future::poll_fn,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use rustls_pki_types::ServerName;
use spiffe::SpiffeId;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    identity::{IdentityError, IdentityManager, IssuedSvid},
    tls,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link (the 64 KiB default caps throughput at window/RTT).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept: fewer frames (and wakeups) per MiB.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Read size of the TCP side of a tunnel.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("connecting to peer agent {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with peer agent {addr} failed ({code}): {message}")]
    Tls {
        addr: SocketAddr,
        code: &'static str,
        message: String,
    },
    #[error("HTTP/2 with peer agent {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("peer agent {addr} refused CONNECT {dst}: HTTP {status}")]
    Refused {
        addr: SocketAddr,
        dst: SocketAddr,
        status: u16,
    },
    #[error("building CONNECT for {dst}: {message}")]
    Request { dst: SocketAddr, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TunnelError {
    /// Short reason code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TunnelError::Identity(_) => "svid_unavailable",
            TunnelError::Connect { .. } => "peer_unreachable",
            TunnelError::Tls { code, .. } => code,
            TunnelError::H2 { .. } => "h2_error",
            TunnelError::Refused { status: 403, .. } => "peer_denied",
            TunnelError::Refused { status: 503, .. } => "destination_unreachable",
            TunnelError::Refused { .. } => "peer_refused",
            TunnelError::Config(_) => "tls_config",
            TunnelError::Request { .. } => "bad_destination",
        }
    }
}

/// The first TLS-level error a connection's reads met: the peer's alert
/// (it refused our certificate after the handshake, as TLS 1.3 allows) is
/// then reported as such rather than as the HTTP/2 or socket error it causes.
#[derive(Clone, Default)]
struct TlsFailure(Arc<Mutex<Option<(&'static str, String)>>>);

impl TlsFailure {
    fn record(&self, e: &std::io::Error) {
        let tls = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some();
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tls && slot.is_none() {
            *slot = Some((tls::handshake_failure_code(e), e.to_string()));
        }
    }

    /// The error to report for an HTTP/2 failure on this connection.
    fn explain(&self, addr: SocketAddr, source: h2::Error) -> TunnelError {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some((code, message)) => TunnelError::Tls {
                addr,
                code,
                message,
            },
            None => TunnelError::H2 { addr, source },
        }
    }
}

/// A TLS stream whose read errors are remembered in a [`TlsFailure`].
struct Watched<T> {
    inner: T,
    failure: TlsFailure,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(e)) = &r {
            self.failure.record(e);
        }
        r
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Err(_)) = &r {
            // The peer may have sent an alert before it closed: read it.
            let mut scratch = [0u8; 64];
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            if let std::task::Poll::Ready(Err(e)) =
                std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut buf)
            {
                self.failure.record(&e);
            }
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection ready to carry a stream to `dst`, whose serving workload's
/// identity is verified.
pub struct Prepared {
    sender: SendRequest<Bytes>,
    pub peer_id: SpiffeId,
    pub reused: bool,
    node: SocketAddr,
    dst: SocketAddr,
    failure: TlsFailure,
    slot: StreamSlot,
}

impl Prepared {
    /// Sends `CONNECT dst` and waits for the peer agent's answer.
    pub async fn open(self) -> Result<Tunnel, TunnelError> {
        let Prepared {
            sender,
            node,
            dst,
            failure,
            slot,
            ..
        } = self;
        let mut sender = sender
            .ready()
            .await
            .map_err(|source| failure.explain(node, source))?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(dst.to_string())
            .body(())
            .map_err(|e| TunnelError::Request {
                dst,
                message: e.to_string(),
            })?;
        let (resp, send) = sender
            .send_request(req, false)
            .map_err(|source| failure.explain(node, source))?;
        let resp = resp.await.map_err(|source| failure.explain(node, source))?;
        if resp.status() != http::StatusCode::OK {
            return Err(TunnelError::Refused {
                addr: node,
                dst,
                status: resp.status().as_u16(),
            });
        }
        Ok(Tunnel {
            send,
            recv: resp.into_body(),
            slot,
        })
    }
}

/// One open HBONE stream to `dst` (the peer's identity is on [`Prepared`]).
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// This stream's place on its pooled connection, freed when dropped.
    pub slot: StreamSlot,
}

/// One stream's place on a pooled HBONE connection: taken when a stream is
/// prepared, given back when it is dropped (the tunnel ended, or policy
/// refused before CONNECT).
pub struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        streams.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: String,
    node: IpAddr,
    port: u16,
}

#[derive(Clone)]
struct Pooled {
    sender: SendRequest<Bytes>,
    generation: u64,
    peer_id: SpiffeId,
    /// The server certificate's notAfter: never reused from then on.
    peer_not_after: std::time::SystemTime,
    dial_id: u64,
    failure: TlsFailure,
    /// Streams prepared or open on it (see [`StreamSlot`]).
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pooled {
    /// Whether another stream fits under the server's advertised limit.
    fn has_room(&self) -> bool {
        self.streams.load(std::sync::atomic::Ordering::Acquire)
            < self.sender.current_max_send_streams()
    }
}

static NEXT_DIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Per key, the connections in use: more than one when the streams of one
/// key exceed what the server allows on a connection.
type Pool = Arc<Mutex<HashMap<PoolKey, Vec<Pooled>>>>;

/// The server name that tells the peer agent which local workload (by port)
/// the connection is for, so it can present that workload's SVID.
pub fn server_name_for_port(port: u16) -> String {
    format!("{port}.port.enforcer")
}

/// The destination port encoded in an HBONE server name.
pub fn port_from_server_name(name: &str) -> Option<u16> {
    name.strip_suffix(".port.enforcer")?.parse().ok()
}

pub struct HboneClient {
    identity: Arc<IdentityManager>,
    hbone_port: u16,
    pool: Pool,
}

impl HboneClient {
    pub fn new(identity: Arc<IdentityManager>, hbone_port: u16) -> Self {
        Self {
            identity,
            hbone_port,
            pool: Pool::default(),
        }
    }

    /// Gets a (pooled or new) mutual-TLS connection from the source workload
    /// to the node serving `dst`, with the destination's verified identity.
    /// No request is sent yet: the caller decides policy first.
    pub async fn prepare(
        &self,
        svid: &Arc<IssuedSvid>,
        dst: SocketAddr,
    ) -> Result<Prepared, TunnelError> {
        let key = PoolKey {
            src: svid.svid.spiffe_id.to_string(),
            node: dst.ip(),
            port: dst.port(),
        };
        let node = SocketAddr::new(dst.ip(), self.hbone_port);
        let now = std::time::SystemTime::now();
        // A connection of this SVID generation, before its server
        // certificate's notAfter, with room for one more stream: its slot is
        // taken under the lock, so concurrent callers never overshoot.
        let reserved = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let found = pool.get_mut(&key).map(|conns| {
                conns.retain(|p| p.generation == svid.generation && now < p.peer_not_after);
                conns
                    .iter()
                    .find(|p| p.has_room())
                    .map(|p| (p.clone(), StreamSlot::take(&p.streams)))
            });
            if pool.get(&key).is_some_and(Vec::is_empty) {
                pool.remove(&key);
            }
            found.flatten()
        };
        let (p, slot, reused) = match reserved {
            Some((p, slot)) => match p.sender.clone().ready().await {
                Ok(_) => (p, slot, true),
                Err(e) => {
                    debug!(error = %e, "pooled HBONE connection is gone; dialing a new one");
                    self.forget(&key, p.dial_id);
                    let p = self.dial(svid, node, dst, &key).await?;
                    let slot = StreamSlot::take(&p.streams);
                    (p, slot, false)
                }
            },
            None => {
                let p = self.dial(svid, node, dst, &key).await?;
                let slot = StreamSlot::take(&p.streams);
                (p, slot, false)
            }
        };
        Ok(Prepared {
            sender: p.sender,
            peer_id: p.peer_id,
            reused,
            node,
            dst,
            failure: p.failure,
            slot,
        })
    }

    /// Takes one connection out of the pool.
    fn forget(&self, key: &PoolKey, dial_id: u64) {
        forget(&self.pool, key, dial_id);
    }

    async fn dial(
        &self,
        svid: &IssuedSvid,
        node: SocketAddr,
        dst: SocketAddr,
        key: &PoolKey,
    ) -> Result<Pooled, TunnelError> {
        let cfg = tls::client_config(
            self.identity.trust().clone(),
            self.identity.provider().clone(),
            &svid.svid,
        )?;
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, crate::capture::mark::connect(node, None))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(TunnelError::Connect { addr: node, source }),
                Err(_) => {
                    return Err(TunnelError::Connect {
                        addr: node,
                        source: std::io::ErrorKind::TimedOut.into(),
                    });
                }
            };
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(server_name_for_port(dst.port())).map_err(|e| {
            TunnelError::Tls {
                addr: node,
                code: "tls_config",
                message: e.to_string(),
            }
        })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| TunnelError::Tls {
                addr: node,
                code: tls::handshake_failure_code(&e),
                message: e.to_string(),
            })?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| TunnelError::Tls {
                addr: node,
                code: "no_server_identity",
                message: "peer presented no certificate".into(),
            })?;
        let peer_id = tls::spiffe_id_of(leaf).map_err(|r| TunnelError::Tls {
            addr: node,
            code: r.code(),
            message: r.to_string(),
        })?;
        let peer_not_after = tls::not_after_of(leaf).ok_or_else(|| TunnelError::Tls {
            addr: node,
            code: "bad_certificate",
            message: "unreadable notAfter".into(),
        })?;
        let failure = TlsFailure::default();
        let io = Watched {
            inner: tls,
            failure: failure.clone(),
        };
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| failure.explain(node, source))?;
        let dial_id = NEXT_DIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // At the server certificate's notAfter the connection leaves the
        // pool; once its last stream ends, HTTP/2 closes it (GOAWAY).
        let (pool, pool_key) = (self.pool.clone(), key.clone());
        tokio::spawn(async move {
            tokio::pin!(conn);
            let expiry = tokio::time::sleep(
                peer_not_after
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default(),
            );
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        debug!(peer = %node, error = %e, "HBONE connection ended");
                    }
                    return;
                }
                () = expiry => {
                    debug!(peer = %node, "server certificate expired; HBONE connection leaves the pool");
                    forget(&pool, &pool_key, dial_id);
                }
            }
            if let Err(e) = conn.await {
                debug!(peer = %node, error = %e, "HBONE connection ended");
            }
        });
        let pooled = Pooled {
            sender,
            generation: svid.generation,
            peer_id,
            peer_not_after,
            dial_id,
            failure,
            streams: Default::default(),
        };
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }
}

/// Removes connection `dial_id` from the pool's entry for `key`.
fn forget(pool: &Pool, key: &PoolKey, dial_id: u64) {
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(conns) = pool.get_mut(key) {
        conns.retain(|p| p.dial_id != dial_id);
        if conns.is_empty() {
            pool.remove(key);
        }
    }
}

/// Copies a TCP read half into an HTTP/2 stream, honouring flow control, and
/// ends the stream at EOF. `total` counts the bytes handed to HTTP/2.
pub async fn tcp_to_h2(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: SendStream<Bytes>,
    total: &mut u64,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        // Refill only when little room is left: reserving a full chunk on
        // every read would allocate 256 KiB (an mmap) per small message once
        // the previous chunk is handed to HTTP/2.
        if buf.capacity() < READ_CHUNK / 16 {
            buf.reserve(READ_CHUNK);
        }
        let n = match from.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                to.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            return to
                .send_data(Bytes::new(), true)
                .map_err(std::io::Error::other);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            to.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by peer",
                    ));
                }
            };
            let part = chunk.split_to(cap.min(chunk.len()));
            let len = part.len() as u64;
            to.send_data(part, false).map_err(std::io::Error::other)?;
            *total += len;
        }
    }
}

/// Copies an HTTP/2 stream into a TCP write half, releasing flow-control
/// capacity as data is written, and half-closes the socket at end of stream.
/// `total` counts the bytes written.
pub async fn h2_to_tcp(
    mut from: RecvStream,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    total: &mut u64,
) -> std::io::Result<()> {
    while let Some(data) = from.data().await {
        let data = data.map_err(std::io::Error::other)?;
        to.write_all(&data).await?;
        *total += data.len() as u64;
        let _ = from.flow_control().release_capacity(data.len());
    }
    to.shutdown().await
}

/// Both directions between a TCP connection and an HBONE stream. Returns
/// (TCP → stream bytes, stream → TCP bytes) and whether both ended cleanly.
/// When either side fails, the TCP connection is reset and the stream is
/// cancelled: neither end sees a clean close of a relay that broke.
pub async fn splice(
    mut tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> ((u64, u64), Result<(), String>) {
    let (mut up, mut down) = (0, 0);
    let result = {
        let (r, w) = tcp.split();
        crate::proxy::both_directions(tcp_to_h2(r, send, &mut up), h2_to_tcp(recv, w, &mut down))
            .await
    };
    if result.is_err() {
        crate::proxy::reset(tcp);
    }
    ((up, down), result.map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_round_trips_the_port() {
        assert_eq!(
            port_from_server_name(&server_name_for_port(8080)),
            Some(8080)
        );
        assert_eq!(port_from_server_name("8080.example.org"), None);
        assert_eq!(port_from_server_name("99999.port.enforcer"), None);
        assert!(ServerName::try_from(server_name_for_port(1)).is_ok());
    }
}
