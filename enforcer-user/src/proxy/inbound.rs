//! Inbound HBONE (DESIGN §1 step 5): accepts mutual TLS on port 15008,
//! presents the destination workload's SVID (chosen by the port in the server
//! name), verifies the client SVID, then serves HTTP/2 CONNECT streams to the
//! local workload.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::server::SendResponse;
use spiffe::SpiffeId;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};
use tracing::{Instrument as _, info, info_span, warn};

use super::{Outcome, next_conn_id};
use crate::record::{ConnRecord, Kind};
use crate::{
    admin::AdminState,
    attest::{Attestor, local::LocalAttestor},
    identity::{IdentityManager, IssuedSvid},
    metrics::RejectLabels,
    tls,
    tunnel::{self, CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pub identity: Arc<IdentityManager>,
    pub policy: Arc<crate::policy::Policy>,
    pub attestor: Arc<Attestor>,
    pub local: Arc<LocalAttestor>,
    pub admin: Arc<AdminState>,
    /// Work done for clients before they are authenticated, per address.
    pub preauth: PreAuthBudget,
    pub limits: H2Limits,
    /// Destinations whose requests are decided one by one.
    pub l7: Arc<crate::l7::L7>,
    /// The netns of the listener (the node's, or a pod's): the local
    /// workloads are connected to in it.
    pub net: crate::netns::Net,
}

/// HTTP/2 limits of one HBONE connection (`[mesh]` keys of the same names).
#[derive(Debug, Clone, Copy)]
pub struct H2Limits {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_streams_per_connection: u64,
}

impl H2Limits {
    /// The HTTP/2 server of an HBONE connection.
    fn server(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME);
        b
    }
}

/// The destination of a CONNECT stream: `ip:port` in its authority, and
/// the workload this connection was opened for (its address, the port the
/// server name named). Else the status to refuse it with.
fn connect_target<B>(
    req: &http::Request<B>,
    sni_port: Option<u16>,
    dst_ip: std::net::IpAddr,
) -> Result<SocketAddr, http::StatusCode> {
    let dst = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let dst = match dst {
        Some(d) if req.method() == http::Method::CONNECT => d,
        _ => {
            warn!(method = %req.method(), uri = %req.uri(), "not a CONNECT to ip:port");
            return Err(http::StatusCode::BAD_REQUEST);
        }
    };
    // The stream must go to the workload whose SVID this connection
    // presented: at the address the connection arrived on, and at the
    // port its server name named (none named: any port of that address,
    // whose workload is checked against the presented identity).
    if sni_port.is_some_and(|p| dst.port() != p) || dst.ip().to_canonical() != dst_ip {
        warn!(%dst, sni_port, local_ip = %dst_ip, "CONNECT target differs from the workload this connection was opened for");
        return Err(http::StatusCode::FORBIDDEN);
    }
    Ok(dst)
}

/// Before a client has authenticated, the agent looks up which workload its
/// server name names. Answers already known are free; each lookup that needs
/// the kernel's tables costs a token from the client address's bucket.
pub struct PreAuthBudget {
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, Instant)>>,
    burst: f64,
    per_sec: f64,
}

impl Default for PreAuthBudget {
    fn default() -> Self {
        Self {
            buckets: Default::default(),
            burst: 64.0,
            per_sec: 32.0,
        }
    }
}

impl PreAuthBudget {
    /// Whether `peer` may have a lookup done; `charge` takes the token when
    /// the lookup failed (a client cycling through server names), so a
    /// node whose lookups succeed is never slowed by this.
    pub fn allows(&self, peer: std::net::IpAddr, charge: bool) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > 16_384 {
            let full = self.burst / self.per_sec;
            b.retain(|_, (_, at)| at.elapsed().as_secs_f64() < full);
        }
        let now = Instant::now();
        let (tokens, at) = b.entry(peer).or_insert((self.burst, now));
        *tokens = (*tokens + at.elapsed().as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        if charge {
            *tokens -= 1.0;
        }
        true
    }
}

impl Inbound {
    /// The handler of a pod's HBONE listener: this one's shared parts, with
    /// the pod's netns (its workloads are attested and connected to there).
    pub fn for_pod(&self, net: crate::netns::Net, local: Arc<LocalAttestor>) -> Self {
        Self {
            identity: self.identity.clone(),
            policy: self.policy.clone(),
            attestor: self.attestor.clone(),
            local,
            admin: self.admin.clone(),
            preauth: PreAuthBudget::default(),
            limits: self.limits,
            l7: self.l7.clone(),
            net,
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_loop(listener, "hbone", |stream, peer| {
            self.net.unless_gone(self.clone().connection(stream, peer))
        })
        .await
    }

    /// The SVID to present for `dst`: with a port, the owner of the
    /// listener the kernel would choose for that exact address; with port 0
    /// (a client that named no port, on a pod's listener), the workload
    /// that owns the address (all its listeners agree on one identity).
    async fn destination_svid(&self, dst: SocketAddr) -> Result<Arc<IssuedSvid>, String> {
        let att = self
            .local
            .attest(&self.attestor, dst)
            .await
            .map_err(|e| e.to_string())?;
        let at = || {
            if dst.port() == 0 {
                dst.ip().to_string()
            } else {
                dst.to_string()
            }
        };
        match self.identity.identify(&att).await {
            Ok(Some(svid)) => Ok(svid),
            Ok(None) => Err(format!(
                "the workload on {} (pid {}) has no identity; selectors {:?}",
                at(),
                att.facts.pid,
                att.selectors
            )),
            Err(e) => Err(format!("the workload on {}: {e}", at())),
        }
    }

    fn rejected(&self, peer: SocketAddr, reason: &'static str, detail: &str) {
        warn!(%peer, reason, detail, "HBONE connection rejected");
        self.admin
            .metrics
            .hbone_rejected
            .get_or_create(&RejectLabels { reason })
            .inc();
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => return self.rejected(peer, "io_error", &e.to_string()),
        };
        let _ = tcp.set_nodelay(true);
        // Read the ClientHello first: its server name says which local
        // workload the client wants, and so which SVID to present.
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let start = match tokio::time::timeout_at(deadline, acceptor).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.rejected(peer, tls::handshake_failure_code(&e), &e.to_string());
            }
            Err(_) => {
                return self.rejected(peer, "handshake_timeout", "no TLS handshake within 10 s");
            }
        };
        let server_name = start.client_hello().server_name().map(str::to_owned);
        let port = server_name
            .as_deref()
            .and_then(tunnel::port_from_server_name);
        // With no server name (ztunnel's client), a listener in a pod
        // serves the pod: the workload that owns the address the
        // connection arrived on, whatever the port; every stream must then
        // reach a workload of that identity. On the node's listener, and
        // for a name that is not ours, the name must say the port.
        let by_address = port.is_none() && server_name.is_none() && self.net.pod().is_some();
        if port.is_none() && !by_address {
            return self.rejected(
                peer,
                "no_destination",
                "the server name names no destination port",
            );
        }
        // The workload behind exactly this address (the client connected to it).
        let dst = SocketAddr::new(local.ip().to_canonical(), port.unwrap_or(0));
        if self.local.recent(dst).is_none() && !self.preauth.allows(peer.ip(), false) {
            return self.rejected(
                peer,
                "rate_limited",
                "too many failed lookups before authentication from this address",
            );
        }
        let presented = match self.destination_svid(dst).await {
            Ok(c) => c,
            Err(detail) => {
                self.preauth.allows(peer.ip(), true);
                self.rejected(peer, "no_server_identity", &detail);
                // No certificate to present: tell the client the name it
                // sent is not served here (RFC 6066), then close cleanly.
                if let Ok(cfg) = tls::no_certificate_config(self.identity.provider().clone()) {
                    let mut accept = start.into_stream(Arc::new(cfg));
                    if let Some(tcp) = accept.get_mut() {
                        let _ = tcp.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
                        linger_close(tcp).await;
                    }
                }
                return;
            }
        };
        let certified = presented.certified.clone();
        let presented_id = presented.svid.spiffe_id.clone();
        let config = match tls::server_config(
            self.identity.trust().clone(),
            self.identity.provider().clone(),
            certified,
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => return self.rejected(peer, "tls_config", &e.to_string()),
        };
        let accept = start.into_stream(config).into_fallible();
        let tls = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err((e, mut tcp))) => {
                self.rejected(peer, tls::handshake_failure_code(&e), &e.to_string());
                // rustls has sent its alert (certificate_unknown, unknown_ca,
                // certificate_expired…); close without a reset so the client
                // reads it.
                linger_close(&mut tcp).await;
                return;
            }
            Err(_) => {
                return self.rejected(peer, "handshake_timeout", "no TLS handshake within 10 s");
            }
        };
        let (_, conn) = tls.get_ref();
        // The verifier already checked chain and URI SAN; read the ID again.
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        let src_id = match leaf.map(tls::spiffe_id_of) {
            Some(Ok(id)) => id,
            Some(Err(r)) => return self.rejected(peer, r.code(), &r.to_string()),
            None => return self.rejected(peer, "no_client_certificate", "no client certificate"),
        };
        let Some(peer_not_after) = leaf.and_then(tls::not_after_of) else {
            return self.rejected(peer, "bad_certificate", "unreadable notAfter");
        };
        let limits = self.limits;
        let mut h2 = match limits.server().handshake::<_, Bytes>(tls).await {
            Ok(h) => h,
            Err(e) => return self.rejected(peer, "h2_error", &e.to_string()),
        };
        let dst_ip = local.ip().to_canonical();
        // At the client certificate's notAfter the connection is told to go
        // away (GOAWAY); a stream that arrives after it is refused.
        let expiry = tokio::time::sleep(
            peer_not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        );
        tokio::pin!(expiry);
        let (draining, forced) = (crate::drain::draining(), crate::drain::forced());
        tokio::pin!(draining, forced);
        let (mut opened, mut closing) = (0u64, false);
        loop {
            let next = tokio::select! {
                next = h2.accept() => next,
                () = &mut draining, if !closing => {
                    tracing::debug!(%peer, "draining: GOAWAY to the HBONE client");
                    h2.graceful_shutdown();
                    closing = true;
                    continue;
                }
                () = &mut forced => break,
                () = &mut expiry, if !closing => {
                    info!(%peer, src_spiffe_id = %src_id, "client certificate expired; closing the HBONE connection (GOAWAY)");
                    h2.graceful_shutdown();
                    closing = true;
                    continue;
                }
            };
            let (req, mut respond) = match next {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HBONE connection ended");
                    break;
                }
                None => break,
            };
            let refusal = if SystemTime::now() >= peer_not_after {
                Some("peer_certificate_expired")
            } else if opened >= limits.max_streams_per_connection {
                Some("stream_budget")
            } else {
                None
            };
            if let Some(reason) = refusal {
                warn!(%peer, src_spiffe_id = %src_id, reason, "CONNECT stream refused");
                self.admin
                    .metrics
                    .hbone_streams_refused
                    .get_or_create(&RejectLabels { reason })
                    .inc();
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                if !closing {
                    h2.graceful_shutdown();
                    closing = true;
                }
                continue;
            }
            opened += 1;
            let this = self.clone();
            let src_id = src_id.clone();
            let presented_id = presented_id.clone();
            let id = next_conn_id();
            let span = info_span!("conn", id, direction = "inbound", src = %peer, dst = tracing::field::Empty);
            let tracked = crate::drain::track();
            // No `async` block around it: it would hold the stream's
            // future twice.
            let stream = this.stream(id, peer, src_id, (dst_ip, port, presented_id), req, respond);
            use futures_util::FutureExt as _;
            tokio::spawn(stream.instrument(span).map(move |()| drop(tracked)));
        }
    }

    /// One CONNECT stream: its setup (identities, policy, the connect to
    /// the workload) in a future of its own, boxed and freed once done,
    /// then the relay; the stream's task holds only the relay's state for
    /// as long as the connection lives (see `Outbound::handle`).
    async fn stream(
        self: Arc<Self>,
        id: u64,
        peer: SocketAddr,
        src_id: SpiffeId,
        target: (std::net::IpAddr, Option<u16>, SpiffeId),
        req: http::Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        let Some((mut rec, relay)) =
            Box::pin(self.setup(id, peer, src_id, target, req, respond)).await
        else {
            return;
        };
        rec.relaying();
        match relay {
            Relay::Tcp {
                upstream,
                send,
                recv,
            } => {
                // Sent to the HBONE peer, received from it.
                let (outcome, bytes) = crate::copy::tcp_to_stream(upstream, send, recv).await;
                rec.end(outcome, bytes);
            }
            Relay::L7(l7) => {
                let L7Relay {
                    route,
                    conn,
                    send,
                    recv,
                    upstream,
                    dst,
                } = *l7;
                let client = crate::l7::io::H2Stream::new(send, recv);
                // `serve` boxes the session itself.
                let served = crate::l7::http::serve(
                    self.l7.clone(),
                    route,
                    conn,
                    client,
                    Some(upstream),
                    super::dial_local(&self.net, dst),
                )
                .await;
                // Sent to the HBONE peer, received from it.
                rec.end(served.outcome(), (served.to_client, served.from_client));
            }
        }
    }

    /// Everything before the relay; `None` when the stream was refused (its
    /// record written, the stream answered or reset).
    async fn setup(
        &self,
        id: u64,
        peer: SocketAddr,
        src_id: SpiffeId,
        (dst_ip, sni_port, presented_id): (std::net::IpAddr, Option<u16>, SpiffeId),
        req: http::Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<(ConnRecord, Relay)> {
        let mut rec = ConnRecord::open(self.admin.metrics.clone(), Kind::Inbound, id);
        rec.trace_from(req.headers());
        rec.src = Some(peer);
        rec.src_id = Some(src_id.to_string());

        let dst = match connect_target(&req, sni_port, dst_ip) {
            Ok(d) => d,
            Err(status) => {
                refuse(&mut respond, status);
                rec.refused(Outcome::BadRequest);
                return None;
            }
        };
        rec.dst = Some(dst);
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let (dst_svid, dst_selectors) =
            super::local_destination(&self.local, &self.attestor, &self.identity, dst).await;
        let dst_id = dst_svid.as_ref().map(|s| s.svid.spiffe_id.clone());
        // The identity decided must be the one this connection presented.
        if dst_id.as_ref().is_some_and(|d| *d != presented_id) {
            warn!(presented = %presented_id, now = ?dst_id, "the workload behind the destination is not the one this connection presented (it changed since the handshake, or another workload of the address)");
            refuse(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
            rec.refused(Outcome::NoIdentity);
            return None;
        }
        rec.set_dst_svid(dst_svid.as_ref());
        // Authoritative decision: verified source identity, attested destination.
        let route = self
            .l7
            .routes
            .find(dst.port(), dst_id.as_ref(), &dst_selectors);
        let input = crate::policy::Input {
            direction: "inbound",
            source: crate::policy::Peer {
                authenticated: Some(true),
                address: Some(peer.ip().to_canonical().to_string()),
                ..Default::default()
            }
            .with_id(Some(&src_id)),
            destination: super::peer(dst_svid.as_deref(), &dst_selectors, Some(dst)),
            protocol: route.as_ref().map_or("tcp", |r| r.protocol.as_str()),
            request: None,
        };
        let verdict = self.policy.decide(&input, id).await;
        rec.decision_ids.push(verdict.decision_id.clone());
        rec.policy_reason = verdict.decision.reason.clone();
        if !verdict.allowed {
            warn!(reason = ?verdict.decision.reason, "denied by policy");
            refuse(&mut respond, http::StatusCode::FORBIDDEN);
            rec.refused(Outcome::Denied);
            return None;
        }
        if dst_id.is_none() {
            refuse(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
            rec.refused(Outcome::NoIdentity);
            return None;
        }
        let upstream = match super::connect_within(super::connect_local(&self.net, dst)).await {
            Ok(s) => s,
            Err(error) => {
                warn!(%dst, %error, "connecting to the local workload failed");
                refuse(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
                rec.refused(Outcome::ConnectFailed);
                return None;
            }
        };
        let send = match respond.send_response(http::Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "answering CONNECT failed");
                rec.refused(Outcome::Error);
                return None;
            }
        };
        let recv = req.into_body();
        let relay = match route {
            Some(route) => Relay::L7(Box::new(L7Relay {
                route,
                conn: crate::l7::Conn::of(id, &input, peer, dst).traced(rec.trace_context()),
                send,
                recv,
                upstream,
                dst,
            })),
            None => Relay::Tcp {
                upstream,
                send,
                recv,
            },
        };
        Some((rec, relay))
    }
}

/// What a set-up CONNECT stream relays to: the workload, bytes as they
/// come or each request decided (boxed: rarer, larger).
enum Relay {
    Tcp {
        upstream: TcpStream,
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
    },
    L7(Box<L7Relay>),
}

struct L7Relay {
    route: Arc<crate::l7::Route>,
    conn: crate::l7::Conn,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    upstream: TcpStream,
    dst: SocketAddr,
}

/// Closes a rejected connection so the client reads what was sent (a TLS
/// alert) instead of a reset: no more writes, unread input drained for up to
/// a second, then closed.
async fn linger_close(tcp: &mut TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0usize;
        while total < 256 * 1024 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

fn refuse(respond: &mut SendResponse<Bytes>, status: http::StatusCode) {
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzz {
    use super::*;

    /// The bytes an HBONE client sends after the TLS handshake (the HTTP/2
    /// client preface is prepended), served with the agent's HTTP/2 limits:
    /// each stream's CONNECT target is checked as for a connection opened
    /// for 10.0.0.2:8080 and refused or answered.
    pub async fn hbone(raw: &[u8]) -> Vec<u8> {
        let limits = H2Limits {
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            max_streams_per_connection: 1000,
        };
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        crate::fuzzing::exchange(&[PREFACE, raw], |server| async move {
            let Ok(mut h2) = limits.server().handshake::<_, Bytes>(server).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = h2.accept().await {
                match connect_target(&req, Some(8080), std::net::IpAddr::from([10, 0, 0, 2])) {
                    Ok(_) => {
                        if let Ok(mut send) = respond.send_response(http::Response::new(()), false)
                        {
                            let _ = send.send_data(Bytes::from_static(b"ok"), true);
                        }
                    }
                    Err(status) => refuse(&mut respond, status),
                }
            }
        })
        .await
    }
}
