//! HBONE (DESIGN §1 step 4): HTTP/2 CONNECT over TLS 1.3 mutual TLS to the
//! destination node's port 15008. The client presents the source workload's
//! SVID; connections are pooled per (source identity, destination node,
//! destination port) and multiplexed, and a renewed SVID opens new connections
//! while streams on the old ones run to completion.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use rustls_pki_types::ServerName;
use spiffe::SpiffeId;
use tracing::debug;

use crate::{
    identity::{IdentityError, IdentityManager, IssuedSvid},
    tls,
};

/// How long each step of opening a tunnel may take: the TCP connect to the
/// peer agent, the TLS handshake, the HTTP/2 handshake, the CONNECT answer.
/// A peer that accepts and then says nothing fails the workload's
/// connection in seconds instead of holding it forever.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/2 PING every `KEEPALIVE_INTERVAL` on each pooled connection; no
/// PONG within `KEEPALIVE_TIMEOUT` and the connection is closed, failing its
/// streams (their workloads' connections are reset): a peer node that
/// vanished (power, network) is noticed in seconds, not after TCP's ~15
/// minutes of retransmissions.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection with no stream for this long leaves the pool and
/// closes.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A pooled connection that once carried this many streams at the same
/// time leaves the pool as soon as it is idle instead of after
/// [`IDLE_TIMEOUT`], as does an idle one beside an older one of its key:
/// HTTP/2 keeps a connection's stream table at its largest size until the
/// connection closes (a heap profile after 10 000 held connections closed:
/// 10 of the 14.5 MB still live, bench/README.md "Memory after load"). The
/// price is a new handshake after such a burst.
pub const RETIRE_AFTER_PEAK_STREAMS: usize = 1024;
/// Streams one pooled connection carries in its life before it leaves the
/// pool for a fresh one (below the default server budget of
/// `mesh.max_streams_per_connection`, 100 000).
pub const STREAMS_PER_CONNECTION: u64 = 10_000;
/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link (the 64 KiB default caps throughput at window/RTT).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept: fewer frames (and wakeups) per MiB.
pub const MAX_FRAME: u32 = 256 * 1024;

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
    #[error("peer agent {addr}: no {step} within {STEP_TIMEOUT:?}")]
    Timeout {
        addr: SocketAddr,
        step: &'static str,
    },
    #[error("peer agent {addr} now presents {now} for {dst}, not {decided}")]
    PeerChanged {
        addr: SocketAddr,
        dst: SocketAddr,
        decided: SpiffeId,
        now: SpiffeId,
    },
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
            TunnelError::Timeout {
                step: "TLS handshake",
                ..
            } => "tls_handshake_timeout",
            TunnelError::Timeout {
                step: "HTTP/2 handshake",
                ..
            } => "h2_handshake_timeout",
            TunnelError::Timeout { .. } => "connect_answer_timeout",
            TunnelError::PeerChanged { .. } => "peer_changed",
            TunnelError::Refused { status: 403, .. } => "peer_denied",
            TunnelError::Refused { status: 503, .. } => "destination_unreachable",
            TunnelError::Refused { .. } => "peer_refused",
            TunnelError::Config(_) => "tls_config",
            TunnelError::Request { .. } => "bad_destination",
        }
    }

    /// The peer never processed the stream ([`unprocessed`]): the request
    /// may be sent again on another connection.
    fn unprocessed(&self) -> bool {
        match self {
            TunnelError::H2 { source, .. } => unprocessed(source),
            _ => false,
        }
    }
}

/// HTTP/2 says the peer never processed the stream: it reset it with
/// `REFUSED_STREAM`, or the stream was above its GOAWAY's last stream id
/// (RFC 9113 §8.7, §6.8).
pub fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// Waits at most [`STEP_TIMEOUT`] for one step of opening a tunnel.
async fn step<T>(
    addr: SocketAddr,
    step: &'static str,
    f: impl std::future::Future<Output = Result<T, TunnelError>>,
) -> Result<T, TunnelError> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .unwrap_or(Err(TunnelError::Timeout { addr, step }))
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
    key: PoolKey,
    dial_id: u64,
    /// The connection's trace context, sent with CONNECT as W3C
    /// `traceparent` so the peer agent's span joins the trace.
    pub trace: Option<opentelemetry::trace::SpanContext>,
    /// The netns the connection leaves from.
    net: crate::netns::Net,
}

impl Prepared {
    /// Sends `CONNECT dst` and waits (at most [`STEP_TIMEOUT`]) for the peer
    /// agent's answer.
    async fn open(self) -> Result<Tunnel, TunnelError> {
        let node = self.node;
        step(node, "CONNECT answer", self.connect()).await
    }

    async fn connect(self) -> Result<Tunnel, TunnelError> {
        let Prepared {
            sender,
            node,
            dst,
            failure,
            slot,
            trace,
            ..
        } = self;
        let mut sender = sender
            .ready()
            .await
            .map_err(|source| failure.explain(node, source))?;
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(dst.to_string())
            .body(())
            .map_err(|e| TunnelError::Request {
                dst,
                message: e.to_string(),
            })?;
        if let Some(sc) = &trace {
            crate::otel::inject(sc, req.headers_mut());
        }
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
    /// The slot, and the streams open with it.
    fn take(streams: &Arc<std::sync::atomic::AtomicUsize>) -> (Self, usize) {
        let open = streams.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        (Self(streams.clone()), open)
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
    /// The cookie of the pod netns the connection leaves from; 0: the
    /// node's netns. Two pods of one identity have connections of their own.
    netns: u64,
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
    /// Streams it was given in its life.
    given: Arc<std::sync::atomic::AtomicU64>,
    /// The most streams it had open at once.
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pooled {
    /// Whether another stream fits under the server's advertised limit.
    fn has_room(&self) -> bool {
        self.streams.load(std::sync::atomic::Ordering::Acquire)
            < self.sender.current_max_send_streams()
    }

    /// Takes a stream's slot on this connection.
    fn take(&self) -> StreamSlot {
        use std::sync::atomic::Ordering::AcqRel;
        self.given.fetch_add(1, AcqRel);
        let (slot, open) = StreamSlot::take(&self.streams);
        self.peak.fetch_max(open, AcqRel);
        slot
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
    /// One dial at a time per key: callers that find no room wait for the
    /// dial under way and share its connection instead of each dialing.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl HboneClient {
    pub fn new(identity: Arc<IdentityManager>, hbone_port: u16) -> Self {
        Self {
            identity,
            hbone_port,
            pool: Pool::default(),
            dialing: Mutex::default(),
        }
    }

    /// The pooled HBONE connections now, for `/status`: per source
    /// identity, peer node and port, each connection's peer identity, its
    /// SVID generation and its streams (open now, given in its life).
    pub fn pooled(&self) -> Vec<serde_json::Value> {
        use std::sync::atomic::Ordering::Acquire;
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<serde_json::Value> = pool
            .iter()
            .flat_map(|(key, conns)| {
                conns.iter().map(move |c| {
                    serde_json::json!({
                        "source": key.src,
                        "peer": std::net::SocketAddr::new(key.node, self.hbone_port).to_string(),
                        "port": key.port,
                        "peer_spiffe_id": c.peer_id.to_string(),
                        "svid_generation": c.generation,
                        "dial_id": c.dial_id,
                        "open_streams": c.streams.load(Acquire),
                        "streams_given": c.given.load(Acquire),
                    })
                })
            })
            .collect();
        drop(pool);
        out.sort_by_key(|v| v["dial_id"].as_u64());
        out
    }

    /// Opens the stream `prepared` is for. A stream the peer refused
    /// before processing it (its stream budget spent, or going away) is
    /// sent again, once, on another connection — to the same verified
    /// identity that policy decided on, or not at all.
    ///
    /// Boxed, as [`HboneClient::prepare`]'s dial: a caller's task is as
    /// large as its largest state for as long as its connection lives.
    pub fn open<'a>(
        &'a self,
        svid: &'a Arc<IssuedSvid>,
        prepared: Prepared,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Tunnel, TunnelError>> + Send + 'a>>
    {
        Box::pin(async move {
            let (key, dial_id, dst) = (prepared.key.clone(), prepared.dial_id, prepared.dst);
            let net = prepared.net.clone();
            let trace = prepared.trace.clone();
            let decided = prepared.peer_id.clone();
            match prepared.open().await {
                Err(e) if e.unprocessed() => {
                    debug!(error = %e, "HBONE stream refused before processing; once more on another connection");
                    self.forget(&key, dial_id);
                    let mut again = self.prepare(svid, dst, &net).await?;
                    again.trace = trace;
                    if again.peer_id != decided {
                        return Err(TunnelError::PeerChanged {
                            addr: again.node,
                            dst,
                            decided,
                            now: again.peer_id,
                        });
                    }
                    again.open().await
                }
                r => r,
            }
        })
    }

    /// A connection for `key` with room for one more stream, its slot taken
    /// under the pool's lock (so concurrent callers never overshoot).
    fn reserve(&self, key: &PoolKey, generation: u64) -> Option<(Pooled, StreamSlot)> {
        let now = std::time::SystemTime::now();
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(key)?;
        // Spent connections (another SVID generation, the server's
        // certificate expired, the life budget used) leave the pool; HTTP/2
        // closes each once its last stream ends.
        conns.retain(|p| {
            p.generation == generation
                && now < p.peer_not_after
                && p.given.load(std::sync::atomic::Ordering::Acquire) < STREAMS_PER_CONNECTION
        });
        let found = conns
            .iter()
            .find(|p| p.has_room())
            .map(|p| (p.clone(), p.take()));
        if conns.is_empty() {
            pool.remove(key);
        }
        found
    }

    /// Gets a (pooled or new) mutual-TLS connection from the source workload
    /// to the node serving `dst`, with the destination's verified identity.
    /// No request is sent yet: the caller decides policy first.
    pub async fn prepare(
        &self,
        svid: &Arc<IssuedSvid>,
        dst: SocketAddr,
        net: &crate::netns::Net,
    ) -> Result<Prepared, TunnelError> {
        let key = PoolKey {
            src: svid.svid.spiffe_id.to_string(),
            node: dst.ip(),
            port: dst.port(),
            netns: net.pod().map_or(0, |p| p.cookie),
        };
        let node = SocketAddr::new(dst.ip(), self.hbone_port);
        if let Some((p, slot)) = self.live(&key, svid.generation).await {
            return Ok(p.prepared(node, dst, slot, key, true, net));
        }
        // One dial per key at a time; whoever waited looks again first.
        let lock = self
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let dialed = {
            let _one = lock.lock().await;
            match self.live(&key, svid.generation).await {
                Some((p, slot)) => Ok(p.prepared(node, dst, slot, key.clone(), true, net)),
                // Boxed: the TLS and HTTP/2 handshakes are a large future,
                // and a connection's task is as large as its largest state
                // for as long as the connection lives.
                None => Box::pin(self.dial(svid, node, dst, &key, net))
                    .await
                    .map(|p| {
                        let slot = p.take();
                        p.prepared(node, dst, slot, key.clone(), false, net)
                    }),
            }
        };
        {
            let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
            // Nobody else holds or waits for this key's lock: drop it.
            if Arc::strong_count(&lock) == 2 {
                dialing.remove(&key);
            }
        }
        dialed
    }

    /// A pooled connection of this SVID generation, before its server
    /// certificate's notAfter, with room for one more stream (its slot
    /// taken), and still alive; a dead one leaves the pool.
    async fn live(&self, key: &PoolKey, generation: u64) -> Option<(Pooled, StreamSlot)> {
        let (p, slot) = self.reserve(key, generation)?;
        match p.sender.clone().ready().await {
            Ok(_) => Some((p, slot)),
            Err(e) => {
                debug!(error = %e, "pooled HBONE connection is gone; dialing a new one");
                self.forget(key, p.dial_id);
                None
            }
        }
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
        net: &crate::netns::Net,
    ) -> Result<Pooled, TunnelError> {
        debug!(peer = %node, %dst, "dialing an HBONE connection");
        let cfg = tls::client_config(
            self.identity.trust().clone(),
            self.identity.provider().clone(),
            &svid.svid,
        )?;
        let tcp = match tokio::time::timeout(STEP_TIMEOUT, crate::mark::connect_in(net, node, None))
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
        let handshake = async {
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| TunnelError::Tls {
                    addr: node,
                    code: tls::handshake_failure_code(&e),
                    message: e.to_string(),
                })
        };
        let tls = step(node, "TLS handshake", handshake).await?;
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
        let h2_handshake = async {
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|source| failure.explain(node, source))
        };
        let (sender, mut conn) = step(node, "HTTP/2 handshake", h2_handshake).await?;
        // Until the server's SETTINGS are in, HTTP/2 assumes no limit on
        // concurrent streams: a burst of connects would all be put on this
        // connection, and those over the server's limit would wait for a
        // stream to end (the CONNECT answer timeout). The server sends its
        // SETTINGS before it answers anything, so once a PING is answered
        // (the connection driven meanwhile) the limit is known.
        let mut pings = conn.ping_pong();
        if let Some(p) = pings.as_mut() {
            let settled = async {
                tokio::select! {
                    pong = p.ping(h2::Ping::opaque()) => pong.map_err(|source| failure.explain(node, source)),
                    ended = &mut conn => Err(match ended {
                        Err(source) => failure.explain(node, source),
                        Ok(()) => TunnelError::Connect {
                            addr: node,
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        },
                    }),
                }
            };
            step(node, "HTTP/2 handshake", settled).await?;
        }
        let dial_id = NEXT_DIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pooled = Pooled {
            sender,
            generation: svid.generation,
            peer_id,
            peer_not_after,
            dial_id,
            failure,
            streams: Default::default(),
            given: Default::default(),
            peak: Default::default(),
        };
        let driven = drive(
            conn,
            pings,
            node,
            peer_not_after,
            (
                pooled.streams.clone(),
                pooled.given.clone(),
                pooled.peak.clone(),
            ),
            (self.pool.clone(), key.clone(), dial_id),
        );
        // A connection from a pod ends when the pod is no longer served.
        let (net, pool, pool_key) = (net.clone(), self.pool.clone(), key.clone());
        // Counted by the drain until it has ended: the last frames of a
        // relay that just finished (its END_STREAM, its last DATA) are only
        // queued when the relay ends, and an agent that exited at once
        // would lose them — the peer agent then saw the connection drop and
        // reset a finished stream's server side.
        let tracked = crate::drain::track();
        tokio::spawn(futures_util::FutureExt::map(
            net.unless_gone(driven),
            move |()| {
                forget(&pool, &pool_key, dial_id);
                drop(tracked);
            },
        ));
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }
}

impl Pooled {
    fn prepared(
        self,
        node: SocketAddr,
        dst: SocketAddr,
        slot: StreamSlot,
        key: PoolKey,
        reused: bool,
        net: &crate::netns::Net,
    ) -> Prepared {
        Prepared {
            sender: self.sender,
            peer_id: self.peer_id,
            reused,
            node,
            dst,
            failure: self.failure,
            slot,
            key,
            dial_id: self.dial_id,
            trace: None,
            net: net.clone(),
        }
    }
}

/// Runs one HBONE client connection until it ends. It leaves the pool at
/// the server certificate's notAfter and after [`IDLE_TIMEOUT`] without a
/// stream (HTTP/2 then closes it once its last stream and handle are gone);
/// a PING unanswered within [`KEEPALIVE_TIMEOUT`] closes it at once, which
/// fails its streams.
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    mut pings: Option<h2::PingPong>,
    node: SocketAddr,
    peer_not_after: std::time::SystemTime,
    (streams, given, peak): (
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
    (pool, key, dial_id): (Pool, PoolKey, u64),
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::pin!(conn);
    let expiry = tokio::time::sleep(
        peer_not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    );
    tokio::pin!(expiry);
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let draining = crate::drain::draining();
    tokio::pin!(draining);
    let (mut pooled, mut idle) = (true, Duration::ZERO);
    let mut given_before = 0;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(peer = %node, error = %e, "HBONE connection ended");
                }
                break;
            }
            () = &mut expiry, if pooled => {
                debug!(peer = %node, "server certificate expired; HBONE connection leaves the pool");
                forget(&pool, &key, dial_id);
                pooled = false;
            }
            // No new stream while draining: out of the pool, HTTP/2 closes
            // it (GOAWAY, its frames written) once its last stream ends.
            () = &mut draining, if pooled => {
                debug!(peer = %node, "draining: the HBONE connection closes once its streams end");
                forget(&pool, &key, dial_id);
                pooled = false;
            }
            _ = tick.tick() => {
                if let Some(p) = pings.as_mut() {
                    let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, p.ping(h2::Ping::opaque()));
                    let answered = tokio::select! {
                        r = &mut conn => {
                            if let Err(e) = r {
                                debug!(peer = %node, error = %e, "HBONE connection ended");
                            }
                            break;
                        }
                        r = pong => matches!(r, Ok(Ok(_))),
                    };
                    if !answered {
                        tracing::warn!(peer = %node, timeout = ?KEEPALIVE_TIMEOUT,
                            "peer agent did not answer PING; closing the HBONE connection and its streams");
                        break;
                    }
                }
                let given_now = given.load(std::sync::atomic::Ordering::Acquire);
                let unused = given_now == given_before
                    && streams.load(std::sync::atomic::Ordering::Acquire) == 0;
                given_before = given_now;
                if unused {
                    idle += KEEPALIVE_INTERVAL;
                    let peak = peak.load(std::sync::atomic::Ordering::Acquire);
                    if pooled && (peak >= RETIRE_AFTER_PEAK_STREAMS || surplus(&pool, &key, dial_id)) {
                        debug!(peer = %node, peak, "idle HBONE connection beyond the pool's need leaves it");
                        forget(&pool, &key, dial_id);
                        pooled = false;
                    } else if pooled && idle >= IDLE_TIMEOUT {
                        debug!(peer = %node, "idle HBONE connection leaves the pool");
                        forget(&pool, &key, dial_id);
                        pooled = false;
                    }
                } else {
                    idle = Duration::ZERO;
                }
            }
        }
    }
    // Dropping the connection ends whatever streams it still had with an
    // error (never as complete).
    forget(&pool, &key, dial_id);
}

/// Whether an older connection of `key` is pooled too: an idle connection
/// beside it is surplus (a burst over the server's concurrent-stream limit
/// opened it) and leaves at once, the oldest waits for [`IDLE_TIMEOUT`].
fn surplus(pool: &Pool, key: &PoolKey, dial_id: u64) -> bool {
    let pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    pool.get(key)
        .is_some_and(|conns| conns.iter().any(|p| p.dial_id < dial_id))
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
