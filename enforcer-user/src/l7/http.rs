//! One L7 session: hyper serves the client side (HTTP/1.1 with keep-alive,
//! pipelining and upgrades, or h2c with prior knowledge), each request is
//! read (its body up to the destination's bound), decided, and forwarded on
//! the session's own connection to the server, with the same HTTP version.
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header,
    request::Parts,
};
use http_body_util::{BodyExt as _, BodyStream, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::KeyValue;
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Conn, Dial, L7, Protocol, Route, io::Counted, io::Totals, llm, mcp, vectordb};
use crate::policy::{Input, Verdict};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An answer's body that holds its request's span until it has been sent.
struct TracedBody {
    inner: Body,
    _span: crate::otel::RequestSpan,
}

impl http_body::Body for TracedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Largest request head (request line and headers) of HTTP/1.1; a larger
/// one is answered 431 and the connection closed.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Headers whose values never reach policy input or the audit log.
const REDACTED: [&str; 4] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
];
const REDACTED_VALUE: &str = "[redacted]";
/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// How a session went.
#[derive(Debug)]
pub struct Served {
    /// Bytes read from the client (its requests) and written back to it.
    pub from_client: u64,
    pub to_client: u64,
    pub requests: u64,
    /// `Err`: the session broke (malformed framing, a reset, an upstream
    /// answer that failed half-way); the client connection is then reset.
    pub result: Result<(), String>,
}

impl Served {
    /// The connection's outcome for its summary line and metrics.
    pub fn outcome(&self) -> crate::record::Outcome {
        match self.result {
            Ok(()) => crate::record::Outcome::Ok,
            Err(_) => crate::record::Outcome::broken(),
        }
    }
}

/// Serves one client TCP connection; resets it when the session breaks.
pub async fn serve_tcp(
    l7: Arc<L7>,
    route: Arc<Route>,
    conn: Conn,
    client: TcpStream,
    first: Option<TcpStream>,
    dial: Dial,
) -> Served {
    let _ = client.set_nodelay(true);
    // A second handle on the socket, which closes last: with the reset
    // armed (as the client's socket was accepted), disarmed only if the
    // session ended cleanly. Hyper's own close does not close the socket.
    crate::copy::arm_reset(&client);
    let dup = socket2::SockRef::from(&client).try_clone().ok();
    let served = serve(l7, route, conn, client, first, dial).await;
    if let Some(dup) = dup
        && served.result.is_ok()
    {
        let _ = dup.set_linger(None);
    }
    served
}

/// Serves the requests arriving on `client` until it closes. Boxed: a
/// session (hyper's server connection, the upstream client) is a large
/// future, and unboxed it would size the task of every connection whose
/// path can serve L7, L4 relays included, for their whole life.
pub fn serve<IO>(
    l7: Arc<L7>,
    route: Arc<Route>,
    conn: Conn,
    client: IO,
    first: Option<TcpStream>,
    dial: Dial,
) -> std::pin::Pin<Box<dyn Future<Output = Served> + Send>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(session(l7, route, conn, client, first, dial))
}

/// The HTTP/1.1 and h2c server of a session: its limits on heads.
fn server_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(128);
    builder
}

async fn session<IO>(
    l7: Arc<L7>,
    route: Arc<Route>,
    conn: Conn,
    client: IO,
    first: Option<TcpStream>,
    dial: Dial,
) -> Served
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let totals = Arc::new(Totals::default());
    let session = Arc::new(Session {
        l7,
        route,
        conn,
        seq: AtomicU64::new(0),
        upstream: tokio::sync::Mutex::new(None),
        first: std::sync::Mutex::new(first.map(|t| (t, std::time::Instant::now()))),
        server_socket: std::sync::Mutex::new(None),
        tunnels: std::sync::Mutex::new(Vec::new()),
        dial,
    });
    let io = TokioIo::new(Counted {
        inner: client,
        totals: totals.clone(),
    });
    let builder = server_builder();
    let service = {
        let session = session.clone();
        hyper::service::service_fn(move |req| session.clone().handle(req))
    };
    // Draining: the request in hand is finished, then the connection
    // closes (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY); past the drain
    // time it is cut, and so reset.
    let conn = builder.serve_connection_with_upgrades(io, service);
    let (draining, forced) = (crate::drain::draining(), crate::drain::forced());
    tokio::pin!(conn, draining, forced);
    let mut asked = false;
    let mut result = loop {
        tokio::select! {
            r = conn.as_mut() => break r.map_err(|e| e.to_string()),
            () = &mut draining, if !asked => {
                conn.as_mut().graceful_shutdown();
                asked = true;
            }
            () = &mut forced => break Err("the agent's drain time is over".to_owned()),
        }
    };
    // An upgraded connection (WebSocket, CONNECT) is the session's until its
    // tunnel ends: its bytes are counted, and a tunnel that breaks fails
    // the session, so both sides are reset rather than closed as complete.
    let tunnels = std::mem::take(&mut *session.tunnels.lock().unwrap_or_else(|p| p.into_inner()));
    for t in tunnels {
        let ended = t.await.unwrap_or_else(|e| Err(format!("tunnel task: {e}")));
        if let (Err(e), Ok(())) = (ended, &result) {
            result = Err(e);
        }
    }
    match &result {
        // The server's connection ends as the client's did: cleanly here,
        // else (below) with the reset armed when it was opened.
        Ok(()) => session.server_closes_cleanly(),
        Err(e) => debug!(conn_id = session.conn.id, error = %e, "L7 session ended with an error"),
    }
    Served {
        from_client: totals.read.load(Ordering::Relaxed),
        to_client: totals.written.load(Ordering::Relaxed),
        requests: session.seq.load(Ordering::Relaxed),
        result,
    }
}

/// The request-level state of one client connection.
pub struct Session {
    pub(super) l7: Arc<L7>,
    pub(super) route: Arc<Route>,
    pub(super) conn: Conn,
    seq: AtomicU64,
    upstream: tokio::sync::Mutex<Option<Sender>>,
    /// The connection the connection-level code opened, used first, with
    /// when the session took it.
    first: std::sync::Mutex<Option<(TcpStream, std::time::Instant)>>,
    /// A second handle on the current connection to the server. The socket
    /// closes with a reset (linger 0) unless the session ended cleanly: a
    /// client that failed half-way through a request is never passed on to
    /// the server as a complete one.
    server_socket: std::sync::Mutex<Option<socket2::Socket>>,
    /// The tunnels of upgraded requests, awaited before the session ends.
    tunnels: std::sync::Mutex<Vec<tokio::task::JoinHandle<Result<(), String>>>>,
    dial: Dial,
}

enum Sender {
    /// With when it stops being used: `server_idle_ms` after its last
    /// answer, or sooner when the server's `Keep-Alive: timeout=N` hint says
    /// it may close the connection then (see [`kept_until`]).
    H1(
        hyper::client::conn::http1::SendRequest<Body>,
        Option<std::time::Instant>,
    ),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

/// Sends of one request at most (see `Session::send`).
const MAX_SENDS: u32 = 3;

/// A body as far as it was read: a request's as policy sees it, an LLM
/// answer's as it is metered.
pub(super) struct ReadBody<B = Incoming> {
    /// The frames read (data, and trailers if the body ended).
    frames: Vec<Frame<Bytes>>,
    /// The data read, up to the bound.
    pub(super) seen: Bytes,
    /// Data bytes read in all.
    read: usize,
    /// The rest, when the body is larger than the bound.
    rest: Option<B>,
}

impl<B> ReadBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub(super) fn truncated(&self) -> bool {
        self.rest.is_some()
    }

    /// A body read whole as `data` (a request body once decoded).
    fn whole(data: Bytes) -> Self {
        Self {
            frames: vec![Frame::data(data.clone())],
            read: data.len(),
            seen: data,
            rest: None,
        }
    }

    /// The body, when it can be sent again: read whole, data only.
    pub(super) fn again(&self) -> Option<Bytes> {
        (self.rest.is_none() && self.frames.iter().all(Frame::is_data)).then(|| self.seen.clone())
    }

    /// The body to forward: what was read, then the rest as it arrives.
    pub(super) fn into_body(self) -> Body {
        match self.rest {
            None if self.frames.iter().all(|f| f.is_data()) => full(self.seen),
            rest => {
                let head = futures_util::stream::iter(self.frames.into_iter().map(Ok));
                let tail = rest
                    .map(|b| BodyStream::new(b).map(|r| r.map_err(Into::into)).boxed())
                    .unwrap_or_else(|| futures_util::stream::empty().boxed());
                UnsyncBoxBody::new(StreamBody::new(head.chain(tail)))
            }
        }
    }
}

/// Reads a body until it ends or passes `limit` bytes.
pub(super) async fn read_bounded<B>(mut body: B, limit: usize) -> Result<ReadBody<B>, B::Error>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut frames = Vec::new();
    let mut seen = BytesMut::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            read += data.len();
            let room = limit.saturating_sub(seen.len());
            seen.extend_from_slice(&data[..data.len().min(room)]);
        }
        frames.push(frame);
        if read > limit {
            return Ok(ReadBody {
                frames,
                seen: seen.freeze(),
                read,
                rest: Some(body),
            });
        }
    }
    Ok(ReadBody {
        frames,
        seen: seen.freeze(),
        read,
        rest: None,
    })
}

/// Why a request's body was not read.
pub(super) enum BodyRefusal {
    /// Compressed, and over the bound as sent or decoded (413).
    TooLarge(super::decode::RequestBodyError),
    /// Malformed framing, or compressed and not decodable (400, closed).
    Malformed(String),
}

/// Reads a request's body for policy: when it comes in `codings`, decoded
/// whole, and the request then says what the server will get
/// (`Content-Encoding` and the client's framing removed, `Content-Length`
/// the decoded length); else as it came, up to `limit` bytes.
pub(super) async fn read_request_body(
    headers: &mut HeaderMap,
    body: Incoming,
    codings: &[super::decode::Coding],
    limit: usize,
) -> Result<ReadBody, BodyRefusal> {
    if codings.is_empty() {
        return read_bounded(body, limit)
            .await
            .map_err(|e| BodyRefusal::Malformed(format!("malformed body: {e}")));
    }
    match super::decode::request_body(body, codings, limit).await {
        Ok(plain) => {
            headers.remove(header::CONTENT_ENCODING);
            headers.remove(header::TRANSFER_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(plain.len()));
            Ok(ReadBody::whole(plain))
        }
        Err(e @ super::decode::RequestBodyError::TooLarge(_)) => Err(BodyRefusal::TooLarge(e)),
        Err(e) => Err(BodyRefusal::Malformed(e.to_string())),
    }
}

/// A body of `bytes`, whole.
pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The request body as JSON whatever its header says — as OpenAI and
/// Chroma read theirs: `parsed_body` when the header said JSON (parsed
/// already), else the body parsed here, into `parsed`. A JSON body sent as
/// a form is read as the JSON it is, never as the form `parsed_body` made
/// of it. `None` when the body is empty, larger than the bound or not JSON.
pub(super) fn body_json<'a>(
    fields: &'a Map<String, Value>,
    headers: &HeaderMap,
    body: &ReadBody,
    parsed: &'a mut Option<Value>,
) -> Option<&'a Value> {
    if is_json(&content_type(headers)) {
        return fields.get("parsed_body");
    }
    if body.truncated() || body.seen.is_empty() {
        return None;
    }
    *parsed = serde_json::from_slice(&body.seen).ok();
    parsed.as_ref()
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A malformed request: answered 400 and the connection closed, nothing
/// forwarded.
fn bad_request(why: &str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "reason": why}),
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn header_text(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

/// The request's path and query, as OPA-Envoy's `path` and `:path` give
/// them.
fn target(parts: &Parts) -> &str {
    parts.uri.path_and_query().map_or("/", |p| p.as_str())
}

/// OPA-Envoy's `headers`: lower-case names, repeated values joined with
/// `,`, the pseudo-headers, and secrets redacted.
fn headers_input(parts: &Parts, authority: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(":method".into(), parts.method.as_str().into());
    m.insert(":path".into(), target(parts).into());
    m.insert(":authority".into(), authority.into());
    m.insert(":scheme".into(), "http".into());
    for name in parts.headers.keys() {
        let value = if REDACTED.contains(&name.as_str()) {
            REDACTED_VALUE.to_owned()
        } else {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(header_text)
                .collect::<Vec<_>>()
                .join(",")
        };
        m.insert(name.as_str().to_owned(), value.into());
    }
    m
}

fn address(addr: std::net::SocketAddr, principal: Option<&str>) -> Value {
    let socket = Map::from_iter([
        (
            "address".into(),
            addr.ip().to_canonical().to_string().into(),
        ),
        ("portValue".into(), addr.port().into()),
    ]);
    let address = Map::from_iter([("socketAddress".into(), Value::Object(socket))]);
    let mut v = Map::from_iter([("address".into(), Value::Object(address))]);
    if let Some(p) = principal {
        v.insert("principal".into(), p.into());
    }
    Value::Object(v)
}

/// `parsed_path`: the path's segments, percent-decoded, as OPA-Envoy gives
/// them (`/` is `[""]`).
fn parsed_path(path: &str) -> Value {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| Value::from(percent_encoding::percent_decode_str(s).decode_utf8_lossy()))
        .collect::<Vec<_>>()
        .into()
}

/// `parsed_query` (and an url-encoded form body): each key's values.
fn parsed_form(query: &[u8]) -> Value {
    let mut m: Map<String, Value> = Map::new();
    for (k, v) in form_urlencoded::parse(query) {
        if let Value::Array(a) = m
            .entry(k.into_owned())
            .or_insert_with(|| Value::Array(vec![]))
        {
            a.push(v.into_owned().into());
        }
    }
    Value::Object(m)
}

pub(super) fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub(super) fn is_json(ct: &str) -> bool {
    ct == "application/json" || ct.ends_with("+json")
}

/// Takes every upgrade but those `allowed` (`l7.upgrades`: WebSocket) off a
/// request. After an upgrade the connection is tunnelled, undecided; that
/// is right for WebSocket (not HTTP), and a way past policy for `h2c`,
/// which is HTTP again: a client that upgraded an allowed request spoke
/// HTTP/2 to the server through the tunnel ("h2c smuggling"). The request
/// is then answered as itself.
fn only_allowed_upgrades(headers: &mut HeaderMap, allowed: &[String], request_id: &str) {
    if !headers.contains_key(header::UPGRADE) {
        return;
    }
    let offered = list_header(headers, header::UPGRADE);
    let kept: Vec<&String> = offered
        .iter()
        .filter(|t| {
            t.split('/')
                .next()
                .is_some_and(|p| allowed.iter().any(|a| p.eq_ignore_ascii_case(a)))
        })
        .collect();
    if kept.len() == offered.len() {
        return;
    }
    debug!(request_id, upgrade = ?offered, "upgrade not in l7.upgrades taken off the request");
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    if !kept.is_empty() {
        let joined = kept
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(header::UPGRADE, v);
        }
    }
}

/// The request's authority, as its server will read it: the target's
/// (absolute-form, or HTTP/2's `:authority`), else its one `Host`, else the
/// server's address. `Err` for what servers read differently: several
/// `Host` headers or an invalid one (RFC 9112 §3.2: 400), an HTTP/2
/// `host` that differs from `:authority` (RFC 9113 §8.3.1).
fn request_authority(parts: &Parts, server: std::net::SocketAddr) -> Result<String, String> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header".into());
    }
    let host = match host {
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|s| s.parse::<http::uri::Authority>().ok())
                .filter(|a| !a.as_str().contains('@'))
                .ok_or_else(|| format!("invalid Host header {:?}", header_text(h)))?,
        ),
        None => None,
    };
    match (parts.uri.authority(), host) {
        (Some(target), Some(host))
            if parts.version == Version::HTTP_2
                && !target.as_str().eq_ignore_ascii_case(host.as_str()) =>
        {
            Err(format!(
                "the host header ({host}) differs from :authority ({target})"
            ))
        }
        // Without userinfo, which a Host never carries.
        (Some(target), _) => Ok(match target.port() {
            Some(p) => format!("{}:{p}", target.host()),
            None => target.host().to_owned(),
        }),
        (None, Some(host)) => Ok(host.as_str().to_owned()),
        (None, None) => Ok(server.to_string()),
    }
}

/// `uri` with its path replaced (its query kept).
fn set_path(uri: &mut http::Uri, path: String) -> Result<(), String> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut up = std::mem::take(uri).into_parts();
    up.path_and_query =
        Some(http::uri::PathAndQuery::try_from(pq).map_err(|e| format!("normalized path: {e}"))?);
    *uri = http::Uri::from_parts(up).map_err(|e| format!("normalized path: {e}"))?;
    Ok(())
}

/// The content codings a body's `Content-Encoding` headers name, in the
/// order applied, lower-cased, `identity` left out.
pub(super) fn content_codings(headers: &HeaderMap) -> Vec<String> {
    if !headers.contains_key(header::CONTENT_ENCODING) {
        return Vec::new();
    }
    list_header(headers, header::CONTENT_ENCODING)
        .into_iter()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c != "identity")
        .collect()
}

/// The elements of a comma-separated list header, over all its lines,
/// trimmed, empty ones left out (RFC 9110 §5.6.1).
fn list_header(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A request's hop-by-hop headers removed; `Expect` too (the body was read
/// already, or streams now).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = list_header(headers, header::CONNECTION)
        .iter()
        .filter_map(|t| HeaderName::try_from(t.as_str()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        if keep_upgrade && (n == header::UPGRADE || n == header::CONNECTION) {
            continue;
        }
        headers.remove(n);
    }
    headers.remove(header::EXPECT);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The request fields of the policy input (DESIGN §3) of a request on
/// `conn`.
fn request_fields(
    conn: &Conn,
    parts: &Parts,
    body: &ReadBody,
    request_id: &str,
    authority: &str,
) -> Map<String, Value> {
    let protocol = match parts.version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    // Built by moving each part in: `json!` would copy every value it is
    // given (the headers twice), on each request.
    let mut http = Map::new();
    http.insert("id".into(), request_id.into());
    http.insert("method".into(), parts.method.as_str().into());
    http.insert("path".into(), target(parts).into());
    http.insert("host".into(), authority.into());
    http.insert("scheme".into(), "http".into());
    http.insert("protocol".into(), protocol.into());
    http.insert(
        "headers".into(),
        Value::Object(headers_input(parts, authority)),
    );
    let size = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or((!body.truncated()).then_some(body.read as u64));
    if let Some(size) = size {
        http.insert("size".into(), size.into());
    }
    if !body.seen.is_empty()
        && let Ok(text) = std::str::from_utf8(&body.seen)
    {
        http.insert("body".into(), text.into());
    }
    let mut request = Map::new();
    request.insert("http".into(), Value::Object(http));
    let mut attributes = Map::new();
    attributes.insert(
        "source".into(),
        address(conn.client, conn.source.spiffe_id.as_deref()),
    );
    attributes.insert(
        "destination".into(),
        address(conn.server, conn.destination.spiffe_id.as_deref()),
    );
    attributes.insert("request".into(), Value::Object(request));
    let mut m = Map::new();
    m.insert("attributes".into(), Value::Object(attributes));
    m.insert("parsed_path".into(), parsed_path(parts.uri.path()));
    m.insert(
        "parsed_query".into(),
        parsed_form(parts.uri.query().unwrap_or("").as_bytes()),
    );
    if !body.truncated() && !body.seen.is_empty() {
        let ct = content_type(&parts.headers);
        let parsed = if is_json(&ct) {
            serde_json::from_slice::<Value>(&body.seen).ok()
        } else if ct == "application/x-www-form-urlencoded" {
            Some(parsed_form(&body.seen))
        } else {
            None
        };
        if let Some(p) = parsed {
            m.insert("parsed_body".into(), p);
        }
    }
    m.insert("truncated_body".into(), body.truncated().into());
    m
}

impl Session {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let request_id = format!("{}.{n}", self.conn.id);
        let span = info_span!("request", id = %request_id, method = %req.method(), path = %req.uri().path());
        let Some(trace) = crate::otel::RequestSpan::start(req.headers(), self.conn.trace.as_ref())
        else {
            return Ok(self.request(req, request_id).instrument(span).await);
        };
        trace.rename(req.method().to_string());
        trace.set(self.request_attributes(&req, &request_id));
        let resp = trace
            .clone()
            .scope(self.request(req, request_id))
            .instrument(span)
            .await;
        trace.set([KeyValue::new(
            "http.response.status_code",
            i64::from(resp.status().as_u16()),
        )]);
        if resp.status().is_server_error() {
            trace.error(resp.status().to_string());
        }
        // The span ends when the answer has been sent (or dropped).
        Ok(resp.map(|b| {
            TracedBody {
                inner: b,
                _span: trace,
            }
            .boxed_unsync()
        }))
    }

    /// What a request's span says of it from the start.
    fn request_attributes(&self, req: &Request<Incoming>, request_id: &str) -> Vec<KeyValue> {
        let mut a = vec![
            KeyValue::new("enforcer.request_id", request_id.to_owned()),
            KeyValue::new("enforcer.conn_id", self.conn.id as i64),
            KeyValue::new("enforcer.protocol", self.route.protocol.as_str()),
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", req.uri().path().to_owned()),
            KeyValue::new(
                "network.protocol.version",
                match req.version() {
                    Version::HTTP_2 => "2",
                    Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
            ),
            KeyValue::new(
                "server.address",
                self.conn.server.ip().to_canonical().to_string(),
            ),
            KeyValue::new("server.port", i64::from(self.conn.server.port())),
        ];
        for (key, peer) in [
            ("enforcer.source.spiffe_id", &self.conn.source),
            ("enforcer.destination.spiffe_id", &self.conn.destination),
        ] {
            if let Some(id) = &peer.spiffe_id {
                a.push(KeyValue::new(key, id.clone()));
            }
        }
        a
    }

    /// The connection-level input with a request's fields beside it.
    pub(super) fn input(&self, fields: Map<String, Value>) -> Input {
        self.conn.input(self.route.protocol.as_str(), fields)
    }

    pub(super) async fn decide_input(&self, input: &Input, request_id: &str) -> Verdict {
        let verdict = self
            .l7
            .policy
            .decide_request(input, self.conn.id, request_id)
            .await;
        crate::otel::on_request(|span| span.decided(input, &verdict));
        verdict
    }

    /// A request whose body policy cannot read, refused without a decision
    /// (counted `bad_request`) in the destination's error shape: a
    /// JSON-RPC error (id null: no message was read) at an `mcp` one,
    /// OpenAI's at an `llm` one, `{"error", "reason", "request_id"}`
    /// otherwise. The connection serves the next request when the body was
    /// read whole (hyper closes it after a body left unread).
    fn refuse_unread(
        &self,
        status: StatusCode,
        reason: String,
        request_id: &str,
    ) -> Response<Body> {
        self.count("bad_request");
        let error = match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            _ => "bad_request",
        };
        match self.route.protocol {
            Protocol::Mcp => json_response(
                status,
                &mcp::rpc_error(
                    Value::Null,
                    mcp::INVALID_REQUEST,
                    &reason,
                    Some(json!({"request_id": request_id})),
                ),
            ),
            Protocol::Llm => llm::openai_error(
                status,
                &reason,
                "invalid_request_error",
                error,
                &[("request_id", request_id)],
            ),
            Protocol::Http | Protocol::Vectordb => json_response(
                status,
                &json!({"error": error, "reason": reason, "request_id": request_id}),
            ),
        }
    }

    pub(super) fn count(&self, result: &'static str) {
        self.l7.metrics.http_request(
            self.route.protocol.as_str(),
            result,
            self.conn.source.spiffe_id.as_deref(),
            self.conn.destination.spiffe_id.as_deref(),
        );
    }

    async fn request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        request_id: String,
    ) -> Response<Body> {
        // Request smuggling: hyper refuses (400, closed) malformed heads,
        // obs-fold, bad or conflicting Content-Length values, bad chunk
        // sizes and a Transfer-Encoding that does not end in chunked. A
        // request with both Content-Length and Transfer-Encoding is framed by
        // Transfer-Encoding, its Content-Length dropped, and the connection
        // closed after the answer (RFC 9112 §6.3), so nothing that follows it
        // on the connection is ever read, let alone forwarded.
        if req.version() <= Version::HTTP_11 {
            only_allowed_upgrades(req.headers_mut(), &self.route.upgrades, &request_id);
        }
        let upgrade = req.method() == Method::CONNECT
            || (req.version() <= Version::HTTP_11 && req.headers().contains_key(header::UPGRADE));
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // The bodies policy reads: every body of an `mcp`, `llm` or
        // `vectordb` destination, a JSON or form body of an `http` one.
        let ct = content_type(&parts.headers);
        let body_read = self.route.protocol != Protocol::Http
            || is_json(&ct)
            || ct == "application/x-www-form-urlencoded";
        let codings = if body_read {
            super::decode::codings(&parts.headers)
        } else {
            Ok(Vec::new())
        };
        let decode = codings.as_deref().unwrap_or_default();
        let body = match read_request_body(
            &mut parts.headers,
            body,
            decode,
            self.route.max_body_bytes,
        )
        .await
        {
            Ok(b) => {
                if !decode.is_empty() {
                    debug!(request_id, codings = ?decode, bytes = b.seen.len(), "request body decoded");
                }
                b
            }
            Err(BodyRefusal::TooLarge(e)) => {
                warn!(request_id, error = %e, "compressed request body over the bound; refused (413) without a decision");
                return self.refuse_unread(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{e}: a compressed body is decided only whole"),
                    &request_id,
                );
            }
            Err(BodyRefusal::Malformed(why)) => {
                warn!(request_id, error = %why, "request body unreadable; refused (400) and closed");
                self.count("bad_request");
                return bad_request(&why);
            }
        };
        // The authority policy reads is the one the server gets.
        let authority = match request_authority(&parts, self.conn.server) {
            Ok(a) => a,
            Err(why) => {
                warn!(
                    request_id,
                    why, "request authority ambiguous; refused (400) without a decision"
                );
                return self.refuse_unread(StatusCode::BAD_REQUEST, why, &request_id);
            }
        };
        if parts.version == Version::HTTP_2 {
            // Carried by :authority alone (set from `authority` when sent).
            parts.headers.remove(header::HOST);
        } else if parts.headers.get(header::HOST).map(HeaderValue::as_bytes)
            != Some(authority.as_bytes())
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            // One Host, the decided one (an absolute-form target's
            // authority wins over a differing Host, RFC 9112 §3.2.2).
            parts.headers.insert(header::HOST, v);
        }
        // The path policy reads is the path the server gets.
        match super::path::normalize(parts.uri.path(), self.route.path_normalization) {
            Ok(None) => {}
            Ok(Some(p)) => {
                if let Err(e) = set_path(&mut parts.uri, p) {
                    return self.refuse_unread(StatusCode::BAD_REQUEST, e, &request_id);
                }
            }
            Err(e) => {
                warn!(request_id, path = parts.uri.path(), error = %e, "request path not normalizable; refused (400) without a decision");
                return self.refuse_unread(StatusCode::BAD_REQUEST, e.to_string(), &request_id);
            }
        }
        // A body policy reads in a coding not decoded here: what policy
        // would read is not what the server decodes, so never decided.
        if let Err(coding) = &codings
            && !body.seen.is_empty()
        {
            warn!(
                request_id,
                coding, "request body in a coding not decoded; refused (415) without a decision"
            );
            return self.refuse_unread(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "request body with content-encoding {coding}: enforcer decides on the body it reads and decodes only {} (at most {} stacked); send it in one of those or uncompressed",
                    super::decode::DECODED,
                    super::decode::MAX_LAYERS
                ),
                &request_id,
            );
        }
        let fields = request_fields(&self.conn, &parts, &body, &request_id, &authority);

        // The list answers of an `mcp` destination are filtered with the
        // request's fields; nothing else needs them after the decision.
        let lists;
        let mut metered = None;
        let mut rewritten = None;
        let mut renames = false;
        let mcp_post = self.route.protocol == Protocol::Mcp && parts.method == Method::POST;
        let mcp_pass = self.route.protocol == Protocol::Mcp
            && (parts.method == Method::GET || parts.method == Method::DELETE);
        if mcp_post {
            match mcp::decide_post(
                &self,
                &parts,
                &body.seen,
                body.truncated(),
                fields,
                &request_id,
            )
            .await
            {
                mcp::Plan::Respond(resp) => return resp,
                mcp::Plan::Forward(l) => lists = l,
            }
        } else if self.route.protocol == Protocol::Llm {
            match llm::decide(&self, &parts, &body, fields, &request_id).await {
                llm::Plan::Respond(resp) => return resp,
                llm::Plan::Forward { call, body } => {
                    metered = call;
                    rewritten = body;
                }
            }
            lists = mcp::Lists::none(Map::new());
        } else if self.route.protocol == Protocol::Vectordb {
            match vectordb::decide(&self, &parts, &body, fields, &request_id, &authority).await {
                vectordb::Plan::Respond(resp) => return resp,
                vectordb::Plan::Forward { renames: r } => renames = r,
            }
            lists = mcp::Lists::none(Map::new());
        } else if mcp_pass {
            // The SSE stream of server messages and the session's end.
            self.count("pass");
            lists = mcp::Lists::none(fields);
        } else {
            // Another method at an `mcp` destination: its answer is still
            // filtered if it streams a list.
            // As OPA-Envoy, which fails the check: a JSON body that does not
            // parse is not decided as if it had none (a server's parser may
            // read what enforcer's refuses, `NaN` for one).
            if is_json(&ct)
                && !body.truncated()
                && !body.seen.is_empty()
                && !fields.contains_key("parsed_body")
            {
                let e = serde_json::from_slice::<serde::de::IgnoredAny>(&body.seen)
                    .err()
                    .map_or_else(|| "not JSON".to_owned(), |e| e.to_string());
                warn!(request_id, error = %e, "JSON request body that does not parse; refused (400) without a decision");
                return self.refuse_unread(
                    StatusCode::BAD_REQUEST,
                    format!("the JSON body does not parse ({e}): it cannot be decided"),
                    &request_id,
                );
            }
            let keep = (self.route.protocol == Protocol::Mcp).then(|| fields.clone());
            lists = mcp::Lists::none(keep.unwrap_or_default());
            let verdict = self.decide_input(&self.input(fields), &request_id).await;
            self.count(verdict.result);
            if !verdict.allowed {
                info!(request_id, method = %parts.method, path = parts.uri.path(),
                    reason = ?verdict.decision.reason, decision_id = verdict.decision_id, "request denied");
                return json_response(
                    StatusCode::FORBIDDEN,
                    &json!({
                        "error": "forbidden",
                        "reason": verdict.decision.reason.as_deref().unwrap_or("denied by policy"),
                        "decision_id": verdict.decision_id,
                        "request_id": request_id,
                    }),
                );
            }
        }

        let method = parts.method.clone();
        if self.route.protocol == Protocol::Mcp || metered.is_some() {
            // Answers read here (lists filtered, tokens metered) are asked
            // for plain; one that comes compressed anyway is refused.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // Sent again if the server's connection closes on it unanswered
        // (see `send`): its body read whole; an idempotent one (RFC 9110
        // §9.2.2), or any on HTTP/2, whose refusals say "not processed".
        let again = (!upgrade
            && rewritten.is_none()
            && (method.is_idempotent() || parts.version == Version::HTTP_2))
            .then(|| body.again())
            .flatten();
        let body = match rewritten {
            // The client's request, changed (an LLM stream's usage asked for).
            Some(b) => {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                full(b)
            }
            None => body.into_body(),
        };
        let upstream_req = self.upstream_request(parts, body, upgrade, &authority);
        let sent = self.send(upstream_req, again).await;
        if renames {
            // Sent (answered or not): what ids name may have changed.
            self.l7.collections.forget();
        }
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                warn!(request_id, server = %self.conn.server, error = %e, "forwarding the request failed");
                self.count("upstream_error");
                return json_response(
                    StatusCode::BAD_GATEWAY,
                    &json!({"error": "bad_gateway", "reason": e, "request_id": request_id}),
                );
            }
        };
        debug!(request_id, status = resp.status().as_u16(), "answered");
        if let Some(client_up) = on_upgrade {
            let accepted = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (method == Method::CONNECT && resp.status().is_success());
            if accepted {
                let server_up = hyper::upgrade::on(&mut resp);
                let conn_id = self.conn.id;
                let tunnel = tokio::spawn(async move {
                    let (c, s) = tokio::try_join!(client_up, server_up).map_err(|e| {
                        debug!(conn_id, error = %e, "upgrade failed");
                        format!("upgrade failed: {e}")
                    })?;
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    match tokio::io::copy_bidirectional(&mut c, &mut s).await {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            debug!(conn_id, error = %e, "upgraded connection ended with an error");
                            Err(format!("upgraded connection: {e}"))
                        }
                    }
                });
                self.tunnels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(tunnel);
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, full(Bytes::new()));
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if self.route.protocol == Protocol::Mcp {
            return mcp::filter_response(self.clone(), parts, body, lists, &request_id).await;
        }
        if let Some(call) = metered {
            return llm::account(self.clone(), parts, body, call).await;
        }
        Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
    }

    /// The request as sent to the server: hop-by-hop headers removed, the
    /// URI in the form the HTTP version wants.
    pub(super) fn upstream_request(
        &self,
        mut parts: Parts,
        body: Body,
        upgrade: bool,
        authority: &str,
    ) -> Request<Body> {
        strip_hop_by_hop(
            &mut parts.headers,
            upgrade && parts.method != Method::CONNECT,
        );
        if parts.version == Version::HTTP_2 {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("http://{authority}{pq}").parse() {
                parts.uri = uri;
            }
        } else if parts.method != Method::CONNECT
            && let Some(pq) = parts.uri.path_and_query().cloned()
        {
            // origin-form
            parts.uri = pq.as_str().parse().unwrap_or(parts.uri);
        }
        Request::from_parts(parts, body)
    }

    /// Sends one request to the server, opening (or reopening, when the
    /// server closed the last one) the session's connection to it.
    ///
    /// A connection the session did not dial for this request has waited
    /// idle, and a server's idle timeout may close it as the request goes
    /// out (uvicorn's is 5 s): the request is then unanswered, and the
    /// client, whose own connection is still open, would get a 502 where a
    /// direct client reconnects. Such a request is sent again on a new
    /// connection (three sends at most) when that cannot repeat anything:
    /// hyper gave it back unwritten; HTTP/2 says the server did not process
    /// it (a refused stream, one above its GOAWAY's last stream id); or the
    /// method is idempotent (RFC 9110 §9.2.2) and the connection had
    /// waited. `again` holds the body for the last two (read whole:
    /// [`ReadBody::again`]).
    pub(super) async fn send(
        &self,
        mut req: Request<Body>,
        again: Option<Bytes>,
    ) -> Result<Response<Incoming>, String> {
        let h2 = req.version() == Version::HTTP_2;
        let idempotent = req.method().is_idempotent();
        let mut sends = 0;
        loop {
            sends += 1;
            let mut slot = self.upstream.lock().await;
            let usable = match slot.as_mut() {
                // Idle past `server_idle_ms` or the server's keep-alive
                // hint: a new connection now, before the server's timer can
                // cross the request.
                Some(Sender::H1(_, Some(until))) if std::time::Instant::now() >= *until => {
                    self.replaced("retired");
                    false
                }
                Some(Sender::H1(s, _)) => {
                    let ready = s.ready().await.is_ok();
                    if !ready {
                        // Closed by the server before its time was up.
                        self.replaced("closed");
                    }
                    ready
                }
                Some(Sender::H2(s)) => s.ready().await.is_ok(),
                None => false,
            };
            if !usable {
                // Closed now (it is not used again), and counted once.
                *slot = None;
            }
            let waited = usable || {
                let (sender, dialed) = self.connect(h2).await?;
                *slot = Some(sender);
                !dialed
            };
            // Kept only where a failure could let it go again (below).
            let copy = again
                .as_ref()
                .filter(|_| waited || h2)
                .map(|body| Again::of(&req, body.clone()));
            let sent = match slot.as_mut() {
                Some(Sender::H1(s, until)) => {
                    let sent = s.try_send_request(req).await;
                    match &sent {
                        Ok(resp) => {
                            let now = std::time::Instant::now();
                            // An answer that says the server closes the
                            // connection retires it now.
                            *until = if has_token(resp.headers(), "close") {
                                Some(now)
                            } else {
                                kept_until(
                                    now,
                                    self.route.server_idle,
                                    keep_alive_timeout(resp.headers()),
                                )
                            };
                        }
                        Err(_) => *slot = None,
                    }
                    sent
                }
                Some(Sender::H2(s)) => {
                    let mut s = s.clone();
                    drop(slot);
                    let sent = s.try_send_request(req).await;
                    if sent.is_err() {
                        // Not sent on it again (a concurrent request may
                        // have replaced it already: that one is forgotten
                        // too, and the next request dials).
                        *self.upstream.lock().await = None;
                    }
                    sent
                }
                None => return Err("no connection to the server".into()),
            };
            let mut failed = match sent {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let chain = crate::policy::source::chain;
            let unanswered = unanswered(failed.error());
            if sends >= MAX_SENDS || unanswered == Unanswered::No {
                return Err(chain(failed.error()));
            }
            let retried = |why| {
                self.l7
                    .metrics
                    .l7_upstream_retry(self.conn.destination.spiffe_id.as_deref(), why);
            };
            if let Some(unsent) = failed.take_message() {
                debug!(conn_id = self.conn.id, error = %chain(failed.error()),
                    "the server's connection closed before the request was written; sending it on a new connection");
                retried("unwritten");
                req = unsent;
                continue;
            }
            // Written and unanswered: sent again only if that repeats nothing.
            let why_not = match unanswered {
                Unanswered::Unprocessed => None,
                _ if !idempotent => Some(
                    "the server may have read it, and its method may not be repeated (RFC 9110 §9.2.2)",
                ),
                _ if !waited => Some("the connection was new"),
                _ => None,
            };
            let copy = match (why_not, copy) {
                (None, Some(copy)) => copy,
                (why, _) => {
                    return Err(format!(
                        "{}; not sent again: {}",
                        chain(failed.error()),
                        why.unwrap_or("its body was not read whole")
                    ));
                }
            };
            warn!(conn_id = self.conn.id, method = %copy.method, path = copy.uri.path(), error = %chain(failed.error()),
                "the server's connection failed the request unanswered (its idle timeout, as the request went out?) or refused it unprocessed; the request is sent again on a new connection");
            retried(if unanswered == Unanswered::Unprocessed {
                "unprocessed"
            } else {
                "closed"
            });
            req = copy.request();
        }
    }

    /// Counts a kept HTTP/1.1 connection to the server replaced for the
    /// next request: `retired` by the session, or `closed` by the server.
    fn replaced(&self, why: &'static str) {
        self.l7
            .metrics
            .l7_server_connection_replaced(self.conn.destination.spiffe_id.as_deref(), why);
    }

    /// Closes the connection to the server now (an answer cut short): the
    /// next request opens a new one.
    pub(super) fn abort_server(&self) {
        if let Some(d) = self.take_server_socket() {
            let _ = d.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Disarms the reset of the server connection: the session ended cleanly.
    fn server_closes_cleanly(&self) {
        if let Some(d) = self.take_server_socket() {
            let _ = d.set_linger(None);
        }
    }

    fn take_server_socket(&self) -> Option<socket2::Socket> {
        self.server_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// A connection to the server; `true` when dialed now (not the one the
    /// connection-level code opened when the client connected).
    async fn connect(&self, h2: bool) -> Result<(Sender, bool), String> {
        // The connection opened when the client connected has waited for
        // this first request: not used if the server has closed it since
        // (its header or idle timeout), or, on HTTP/1.1, sent on it unasked
        // (a 408; an HTTP/2 server sends its SETTINGS first), or if it
        // waited past `server_idle_ms` (the server's timer may cross the
        // request).
        let first = self
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(_, since)| h2 || since.elapsed() < self.route.server_idle)
            .map(|(t, _)| t)
            .filter(|t| still_usable(t, h2));
        let dialed = first.is_none();
        let tcp = match first {
            Some(t) => t,
            None => crate::mark::connect_within((self.dial)()).await?,
        };
        let _ = tcp.set_nodelay(true);
        let dup = socket2::SockRef::from(&tcp).try_clone().ok();
        if let Some(d) = &dup {
            let _ = d.set_linger(Some(std::time::Duration::ZERO));
        }
        *self.server_socket.lock().unwrap_or_else(|p| p.into_inner()) = dup;
        let io = TokioIo::new(tcp);
        let conn_id = self.conn.id;
        if h2 {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| format!("HTTP/2 with the server: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(conn_id, error = %e, "server connection ended");
                }
            });
            Ok((Sender::H2(send), dialed))
        } else {
            let (send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 with the server: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(conn_id, error = %e, "server connection ended");
                }
            });
            Ok((Sender::H1(send, None), dialed))
        }
    }
}

/// Whether the `Connection` header has `token` (`close`: the server closes
/// the connection after this answer).
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    list_header(headers, header::CONNECTION)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// The `timeout` of a `Keep-Alive` header (`timeout=5, max=1000`), in
/// seconds; none when absent, unreadable or 0.
fn keep_alive_timeout(headers: &HeaderMap) -> Option<u64> {
    list_header(headers, HeaderName::from_static("keep-alive"))
        .iter()
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("timeout")
                .then(|| v.trim().parse::<u64>().ok())
                .flatten()
        })
        .filter(|&n| n > 0)
}

/// Until when a kept HTTP/1.1 connection is used after an answer read at
/// `now`: `idle` (`server_idle_ms`), or less when the answer's `Keep-Alive:
/// timeout=N` hint (RFC 2068 §19.7.1, sent by Node.js's server, Apache and
/// others) says the server closes it after N s idle: then N s less a margin
/// (1 s, or half of N when shorter). Counted from the answer's head, so
/// before the server's count, which starts when the answer has been sent.
/// A request then goes to a new connection instead of crossing the close.
/// A hint past what an `Instant` holds (a server's garbage) is ignored.
fn kept_until(
    now: std::time::Instant,
    idle: std::time::Duration,
    hint_secs: Option<u64>,
) -> Option<std::time::Instant> {
    let hinted = hint_secs.map(|n| {
        let t = std::time::Duration::from_secs(n);
        t - (t / 2).min(std::time::Duration::from_secs(1))
    });
    now.checked_add(hinted.map_or(idle, |h| h.min(idle)))
}

/// Whether a connection that waited unused can carry a request: its end
/// has not arrived (a non-blocking peek), nor, for HTTP/1.1, anything else.
fn still_usable(tcp: &TcpStream, h2: bool) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(tcp).peek(&mut byte) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(0) => false,
        Ok(_) => h2,
    }
}

/// What sends a request again: its head, and its body read whole.
struct Again {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Again {
    fn of(req: &Request<Body>, body: Bytes) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    }

    fn request(self) -> Request<Body> {
        let mut req = Request::new(full(self.body));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether a request the server's connection failed was answered at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// It was (an answer that is not HTTP, say), or nothing says.
    No,
    /// The connection closed or reset before an answer began: the server
    /// may or may not have read it.
    Maybe,
    /// HTTP/2 says the server did not process it: its stream refused, or
    /// above the last stream id of the server's GOAWAY (RFC 9113 §8.7,
    /// §6.8).
    Unprocessed,
}

fn unanswered(e: &hyper::Error) -> Unanswered {
    let closed = |io: &std::io::Error| {
        if matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ) {
            Unanswered::Maybe
        } else {
            Unanswered::No
        }
    };
    if e.is_incomplete_message() || e.is_canceled() {
        return Unanswered::Maybe;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return match h2.get_io() {
                Some(io) => closed(io),
                None if crate::tunnel::unprocessed(h2) => Unanswered::Unprocessed,
                None => Unanswered::No,
            };
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return closed(io);
        }
        source = s.source();
    }
    Unanswered::No
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timeouts_are_read_as_servers_write_them() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    HeaderName::from_static("keep-alive"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            keep_alive_timeout(&h)
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["timeout=5"]), Some(5), "Node.js");
        assert_eq!(of(&["timeout=5, max=100"]), Some(5), "Apache");
        assert_eq!(of(&["max=100, Timeout = 15"]), Some(15));
        assert_eq!(of(&["max=100", "timeout=3"]), Some(3), "two lines");
        assert_eq!(of(&["timeout=0"]), None, "no promise");
        assert_eq!(of(&["timeout=soon", "max=1"]), None);
        assert_eq!(of(&["timeout=-1"]), None);
        assert_eq!(of(&["timeout=18446744073709551615"]), Some(u64::MAX));
        // Used for `server_idle_ms` (4 s here), or until 1 s before the
        // server's timeout when that comes first (half of it when that is
        // shorter); a timeout past what an `Instant` holds is no hint.
        let now = std::time::Instant::now();
        let secs = std::time::Duration::from_secs;
        let idle = secs(4);
        assert_eq!(kept_until(now, idle, None), Some(now + secs(4)));
        assert_eq!(kept_until(now, idle, Some(60)), Some(now + secs(4)));
        assert_eq!(kept_until(now, idle, Some(5)), Some(now + secs(4)));
        assert_eq!(kept_until(now, idle, Some(2)), Some(now + secs(1)));
        assert_eq!(
            kept_until(now, idle, Some(1)),
            Some(now + std::time::Duration::from_millis(500))
        );
        assert_eq!(kept_until(now, idle, Some(u64::MAX)), Some(now + secs(4)));
        assert_eq!(
            kept_until(now, secs(1), Some(3)),
            Some(now + secs(1)),
            "a shorter server_idle_ms wins over the hint"
        );
    }

    #[test]
    fn connection_tokens_are_read_as_servers_write_them() {
        let of = |values: &[&str], token: &str| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONNECTION, HeaderValue::from_str(v).expect("value"));
            }
            has_token(&h, token)
        };
        assert!(of(&["close"], "close"));
        assert!(of(&["Keep-Alive, Close"], "close"));
        assert!(of(&["upgrade", " close "], "close"), "two lines");
        assert!(of(&["keep-alive"], "keep-alive"));
        assert!(!of(&["keep-alive"], "close"));
        assert!(!of(&["closed"], "close"));
        assert!(!of(&[], "close"));
    }

    /// A connection that waited for the first request is used only while
    /// nothing came on it: not after the server closed it, nor, on
    /// HTTP/1.1, after it sent something unasked (an HTTP/2 server's
    /// SETTINGS come first).
    #[tokio::test]
    async fn a_waiting_connection_is_used_only_while_nothing_came() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pair = || async {
            let ours = TcpStream::connect(addr).await.expect("connect");
            let (theirs, _) = listener.accept().await.expect("accept");
            (ours, theirs)
        };
        let (ours, _theirs) = pair().await;
        assert!(still_usable(&ours, false) && still_usable(&ours, true));
        let (ours, mut theirs) = pair().await;
        theirs.write_all(b"HTTP/1.1 408").await.expect("write");
        ours.readable().await.expect("the bytes arrive");
        assert!(!still_usable(&ours, false), "bytes unasked on HTTP/1.1");
        assert!(still_usable(&ours, true), "an HTTP/2 server speaks first");
        let (ours, theirs) = pair().await;
        drop(theirs);
        ours.readable().await.expect("the end arrives");
        assert!(!still_usable(&ours, false) && !still_usable(&ours, true));
    }

    #[test]
    fn only_allowed_upgrades_are_kept() {
        let allowed = ["websocket".to_owned()];
        let after = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::UPGRADE, HeaderValue::from_str(v).expect("value"));
            }
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAAQCAAAAAAIAAAAA"),
            );
            only_allowed_upgrades(&mut h, &allowed, "1.1");
            let upgrade: Vec<String> = h.get_all(header::UPGRADE).iter().map(header_text).collect();
            (upgrade, h.contains_key("http2-settings"))
        };
        assert_eq!(after(&["websocket"]), (vec!["websocket".to_owned()], true));
        assert_eq!(after(&["WebSocket/13"]).0, ["WebSocket/13"]);
        assert_eq!(after(&["h2c"]), (vec![], false));
        assert_eq!(after(&["HTTP/2.0, TLS/1.2"]).0, Vec::<String>::new());
        assert_eq!(after(&["h2c, websocket"]).0, ["websocket"]);
        assert_eq!(
            after(&["h2c", "websocket"]),
            (vec!["websocket".to_owned()], false)
        );
    }

    #[test]
    fn the_authority_is_the_one_the_server_reads() {
        let server: std::net::SocketAddr = "10.0.0.2:8004".parse().expect("addr");
        let of = |uri: &str, version: Version, hosts: &[&str]| {
            let mut req = Request::builder().uri(uri).version(version);
            for h in hosts {
                req = req.header(header::HOST, *h);
            }
            let (parts, ()) = req.body(()).expect("request").into_parts();
            request_authority(&parts, server)
        };
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        assert_eq!(of("/x", h1, &["api.example"]).as_deref(), Ok("api.example"));
        assert_eq!(of("/x", h1, &[]).as_deref(), Ok("10.0.0.2:8004"));
        // Absolute-form: the target's authority, whatever Host says;
        // userinfo dropped.
        assert_eq!(
            of("http://public.example/x", h1, &["admin.example"]).as_deref(),
            Ok("public.example")
        );
        assert_eq!(
            of("http://u:p@public.example:81/x", h1, &[]).as_deref(),
            Ok("public.example:81")
        );
        assert_eq!(of("http://[::1]:81/x", h1, &[]).as_deref(), Ok("[::1]:81"));
        // HTTP/2: :authority, and a host that agrees with it (any case).
        assert_eq!(
            of("http://Public.example/x", h2, &["public.EXAMPLE"]).as_deref(),
            Ok("Public.example")
        );
        assert_eq!(of("/x", h2, &["api.example"]).as_deref(), Ok("api.example"));
        // What servers would read differently.
        for (uri, version, hosts, says) in [
            (
                "/x",
                h1,
                &["a.example", "b.example"][..],
                "more than one Host",
            ),
            ("/x", h1, &["a b"][..], "invalid Host"),
            ("/x", h1, &["user@a.example"][..], "invalid Host"),
            (
                "http://a.example/x",
                h2,
                &["b.example"][..],
                "differs from :authority",
            ),
        ] {
            let err = of(uri, version, hosts).expect_err(uri);
            assert!(err.contains(says), "{uri} {hosts:?}: {err}");
        }
    }

    #[test]
    fn content_codings_other_than_identity_are_named() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    header::CONTENT_ENCODING,
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            let c = content_codings(&h);
            (!c.is_empty()).then(|| c.join(", "))
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["identity"]), None);
        assert_eq!(of(&[" Identity , "]), None);
        assert_eq!(of(&["gzip"]).as_deref(), Some("gzip"));
        assert_eq!(of(&["GZIP"]).as_deref(), Some("gzip"));
        assert_eq!(of(&["identity", "br"]).as_deref(), Some("br"));
        assert_eq!(of(&["deflate, gzip"]).as_deref(), Some("deflate, gzip"));
    }

    #[test]
    fn paths_and_queries_read_as_opa_envoy_reads_them() {
        assert_eq!(parsed_path("/"), json!([""]));
        assert_eq!(parsed_path("/people/a%20b"), json!(["people", "a b"]));
        assert_eq!(
            parsed_form(b"x=1&y=a+b&x=2&z"),
            json!({"x": ["1", "2"], "y": ["a b"], "z": [""]})
        );
    }

    #[test]
    fn secrets_are_redacted_and_values_joined() {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/x?q=1")
            .header("authorization", "Bearer s3cret")
            .header("x-api-key", "k")
            .header("cookie", "a=b")
            .header("proxy-authorization", "Basic x")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let h = headers_input(&parts, "h:1");
        for k in REDACTED {
            assert_eq!(h[k], REDACTED_VALUE, "{k}");
        }
        assert!(!Value::Object(h.clone()).to_string().contains("s3cret"));
        assert_eq!(h["accept"], "a,b");
        assert_eq!(h[":method"], "POST");
        assert_eq!(h[":path"], "/v1/x?q=1");
        assert_eq!(h[":authority"], "h:1");
    }

    /// The request's part of the input, whole: OPA-Envoy's shape (DESIGN
    /// §3), as a policy written for its plugin reads it.
    #[test]
    fn a_requests_input_has_opa_envoys_shape() {
        let conn = Conn {
            id: 7,
            direction: "inbound",
            source: crate::policy::Peer::default(),
            destination: crate::policy::Peer::default(),
            client: std::net::SocketAddr::from(([10, 0, 0, 1], 40000)),
            server: "[::ffff:10.0.0.2]:8080".parse().expect("address"),
            trace: None,
        };
        let (parts, ()) = Request::builder()
            .method("POST")
            .uri("/orders/a%20b?x=1&x=2")
            .header("content-type", "application/json")
            .header("content-length", "17")
            .header("authorization", "Bearer s3cret")
            .body(())
            .expect("request")
            .into_parts();
        let body = ReadBody::<Incoming>::whole(Bytes::from_static(br#"{"priority": "l"}"#));
        let got = request_fields(&conn, &parts, &body, "7.1", "shop:8080");
        let want = json!({
            "attributes": {
                "source": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 40000}}},
                "destination": {"address": {"socketAddress": {"address": "10.0.0.2", "portValue": 8080}}},
                "request": {"http": {
                    "id": "7.1",
                    "method": "POST",
                    "path": "/orders/a%20b?x=1&x=2",
                    "host": "shop:8080",
                    "scheme": "http",
                    "protocol": "HTTP/1.1",
                    "size": 17,
                    "body": "{\"priority\": \"l\"}",
                    "headers": {
                        ":method": "POST",
                        ":path": "/orders/a%20b?x=1&x=2",
                        ":authority": "shop:8080",
                        ":scheme": "http",
                        "content-type": "application/json",
                        "content-length": "17",
                        "authorization": REDACTED_VALUE,
                    },
                }},
            },
            "parsed_path": ["orders", "a b"],
            "parsed_query": {"x": ["1", "2"]},
            "parsed_body": {"priority": "l"},
            "truncated_body": false,
        });
        assert_eq!(Value::Object(got), want);
        // The principals, when the peers have verified identities.
        let conn = Conn {
            source: crate::policy::Peer {
                spiffe_id: Some("spiffe://td/a".into()),
                ..Default::default()
            },
            destination: crate::policy::Peer {
                spiffe_id: Some("spiffe://td/b".into()),
                ..Default::default()
            },
            ..conn
        };
        let got = request_fields(&conn, &parts, &body, "7.2", "shop:8080");
        assert_eq!(got["attributes"]["source"]["principal"], "spiffe://td/a");
        assert_eq!(
            got["attributes"]["destination"]["principal"],
            "spiffe://td/b"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("upgrade", "websocket"),
            ("content-type", "text/plain"),
        ] {
            h.append(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(
            plain.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["content-type"]
        );
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("upgrade") && h.contains_key("connection"));
        assert!(!h.contains_key("x-private") && !h.contains_key("expect"));
    }
}

/// Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzz {
    use super::*;

    /// Serves the bytes `raw` as a client's side of one connection, with the
    /// session's HTTP/1.1 and h2c limits: each request hyper accepts has its
    /// body read to a bound (decoded when compressed), its policy input
    /// built (and read into regorus values, as an evaluation takes it), and
    /// is classified as an LLM, vector-DB and MCP request would be.
    pub async fn request(raw: &[u8]) -> Vec<u8> {
        let conn = Arc::new(Conn {
            id: 1,
            direction: "inbound",
            source: crate::policy::Peer::default(),
            destination: crate::policy::Peer::default(),
            client: std::net::SocketAddr::from(([10, 0, 0, 1], 40000)),
            server: std::net::SocketAddr::from(([10, 0, 0, 2], 8080)),
            trace: None,
        });
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                // A compressed body decoded as a session decodes one.
                let codings = crate::l7::decode::codings(&parts.headers).unwrap_or_default();
                if let Ok(body) = read_request_body(&mut parts.headers, body, &codings, 4096).await
                {
                    let fields = request_fields(&conn, &parts, &body, "1.1", "fuzz:8080");
                    let mut parsed = None;
                    let json = body_json(&fields, &parts.headers, &body, &mut parsed).cloned();
                    let path = parts.uri.path();
                    let _ = crate::l7::llm::LlmRequest::read(path, json.as_ref());
                    let _ = crate::l7::vectordb::Op::read(&parts.method, path, json.as_ref());
                    if let Some(Value::Object(msg)) = &json {
                        let _ = crate::l7::mcp::mcp_input(msg, &parts.headers);
                    }
                    let _ = serde_json::to_vec(&fields);
                    // The policy's view of it, as a session builds it, read
                    // into regorus values.
                    let _ = conn.input("http", fields).to_value();
                }
                Ok::<_, Infallible>(Response::new(full(Bytes::new())))
            }
        });
        crate::fuzzing::exchange(&[raw], |server| async move {
            let _ = server_builder()
                .serve_connection_with_upgrades(TokioIo::new(server), service)
                .await;
        })
        .await
    }

    /// The requests whose answers [`answer`] feeds: the protocol of the
    /// destination, the request's head (without `Connection` and
    /// `Content-Length`, which [`asked`] adds) and its body.
    const ASKED: [(Protocol, &str, &str); 9] = [
        (
            Protocol::Llm,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json",
            "{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        ),
        (
            Protocol::Llm,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json",
            "{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        ),
        (
            Protocol::Llm,
            "POST /v1/responses HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json",
            "{\"model\":\"gpt-4o-mini\",\"input\":\"hi\",\"stream\":true}",
        ),
        (
            Protocol::Llm,
            "POST /v1/embeddings HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json",
            "{\"model\":\"text-embedding-3-small\",\"input\":\"hi\"}",
        ),
        (
            Protocol::Mcp,
            "POST /mcp HTTP/1.1\r\nHost: mcp\r\nAccept: application/json, text/event-stream\r\nContent-Type: application/json",
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}",
        ),
        (
            Protocol::Mcp,
            "POST /mcp HTTP/1.1\r\nHost: mcp\r\nAccept: application/json, text/event-stream\r\nContent-Type: application/json",
            "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"resources/list\"}",
        ),
        (
            Protocol::Mcp,
            "GET /mcp HTTP/1.1\r\nHost: mcp\r\nAccept: text/event-stream",
            "",
        ),
        (
            Protocol::Vectordb,
            "POST /api/v2/tenants/default_tenant/databases/default_database/collections/7c0a1e5e-0000-4000-8000-000000000001/query HTTP/1.1\r\nHost: chroma\r\nContent-Type: application/json",
            "{\"query_embeddings\":[[0.1,0.2]],\"n_results\":1}",
        ),
        (
            Protocol::Vectordb,
            "GET /api/v2/tenants/default_tenant/databases/default_database/collections HTTP/1.1\r\nHost: chroma",
            "",
        ),
    ];

    /// The client's bytes of `ASKED[pick]`, closing the connection after
    /// the answer.
    fn asked(pick: u8) -> (Protocol, Vec<u8>) {
        let (protocol, head, body) = ASKED[usize::from(pick) % ASKED.len()];
        let length = if body.is_empty() {
            String::new()
        } else {
            format!("\r\nContent-Length: {}", body.len())
        };
        let raw = format!("{head}\r\nConnection: close{length}\r\n\r\n{body}");
        (protocol, raw.into_bytes())
    }

    /// The shared state of the fuzzed sessions: a policy that allows
    /// everything (every answer is then read: metered, filtered,
    /// classified), counters in memory.
    fn fuzz_l7() -> Option<Arc<L7>> {
        static L7S: std::sync::OnceLock<Option<Arc<L7>>> = std::sync::OnceLock::new();
        L7S.get_or_init(|| {
            let metrics = Arc::new(crate::metrics::Metrics::new("fuzz"));
            let policy = crate::policy::Policy::new(
                Default::default(),
                crate::policy::EngineKind::Interpreter,
                crate::policy::audit::AuditLog::open(std::path::Path::new("/dev/null")).ok()?,
                metrics.clone(),
                crate::policy::DEFAULT_EVAL_TIMEOUT,
            )
            .ok()?;
            let allow = crate::policy::load::PolicyFile {
                path: "allow.rego".into(),
                contents: b"package enforcer.authz\nimport rego.v1\nallow := true\n".to_vec(),
            };
            policy.install(
                crate::policy::Loaded::compile(
                    "fuzz",
                    &[allow],
                    crate::policy::EngineKind::Interpreter,
                )
                .ok()?,
            );
            Some(Arc::new(L7 {
                policy: Arc::new(policy),
                metrics,
                routes: super::super::Routes::new(Vec::new()),
                tokens: Arc::new(super::super::tokens::Tokens::in_memory()),
                collections: Default::default(),
            }))
        })
        .clone()
    }

    thread_local! {
        /// One loopback listener per thread for every answer: a listener
        /// bound per answer made each `bind` scan the port range past the
        /// earlier answers' TIME_WAIT sockets, three quarters of the time
        /// of an answer (926 a second).
        static UPSTREAM: Option<std::net::TcpListener> =
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .ok();
    }

    /// The thread's loopback listener, registered with the running runtime,
    /// with no connection left from an earlier answer (a session may dial
    /// after its server stopped waiting): the next answer's server would
    /// take that one and leave the session's own unanswered.
    fn upstream() -> Option<tokio::net::TcpListener> {
        UPSTREAM.with(|l| {
            let l = l.as_ref()?;
            while l.accept().is_ok() {}
            tokio::net::TcpListener::from_std(l.try_clone().ok()?).ok()
        })
    }

    /// A server's answer: `raw[0]` picks the request (an LLM call, JSON or
    /// streamed; an MCP list or stream; a vector-DB query), the rest is
    /// what the server sends on its connection, which a listener on
    /// loopback serves to the session's dial; the client reads the
    /// session's answer to its end.
    pub async fn answer(raw: &[u8]) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Some((&pick, answer)) = raw.split_first() else {
            return;
        };
        let Some(l7) = fuzz_l7() else {
            return;
        };
        let (protocol, asked) = asked(pick);
        let Some(listener) = upstream() else {
            return;
        };
        let Ok(addr) = listener.local_addr() else {
            return;
        };
        let answer = answer.to_vec();
        // The server reads the request (its head and a `Content-Length`
        // body), then answers and closes its side.
        let server = async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = head_end {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + length {
                            break;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 && got.len() < 1 << 20 => got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        };
        let dial: Dial = Arc::new(move || Box::pin(TcpStream::connect(addr)));
        let route = Arc::new(Route {
            ports: Vec::new(),
            spiffe_id: None,
            selectors: Vec::new(),
            protocol,
            max_body_bytes: 1 << 20,
            path_normalization: Default::default(),
            upgrades: Arc::from(Vec::<String>::new()),
            server_idle: std::time::Duration::from_secs(4),
        });
        let peer = |id: &str| crate::policy::Peer {
            spiffe_id: Some(id.to_owned()),
            ..Default::default()
        };
        let conn = Conn {
            id: 1,
            direction: "inbound",
            source: peer("spiffe://fuzz.example/agent/a"),
            destination: peer("spiffe://fuzz.example/server"),
            client: std::net::SocketAddr::from(([10, 0, 0, 1], 40000)),
            server: addr,
            trace: None,
        };
        // The client keeps its side open until the session closes it
        // (`Connection: close`): a half-close would end the request early.
        let (mut client, ours) = tokio::io::duplex(64 * 1024);
        let ask = async move {
            let _ = client.write_all(&asked).await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let session = super::serve(l7, route, conn, ours, None, dial);
        let serving = async move {
            tokio::pin!(session, server);
            // The server may be done first (or never dialled): the session
            // decides when the exchange ends.
            tokio::select! {
                _ = &mut session => {}
                () = &mut server => { let _ = session.await; }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(serving, ask)
        })
        .await;
    }

    #[cfg(test)]
    mod tests {
        /// The harness reaches the metering: a JSON answer with `usage`,
        /// plain and gzip-compressed, is counted for the caller.
        #[tokio::test]
        async fn the_answer_harness_reaches_the_metering() {
            use std::io::Write as _;
            let chat = br#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(chat).expect("gzip");
            let gz = gz.finish().expect("gzip");
            for (body, coding) in [(chat.to_vec(), ""), (gz, "Content-Encoding: gzip\r\n")] {
                let mut raw = vec![0u8];
                raw.extend(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{coding}Content-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes(),
                );
                raw.extend(body);
                super::answer(&raw).await;
            }
            let l7 = super::fuzz_l7().expect("the fuzz state");
            let used = l7.tokens.used(
                "spiffe://fuzz.example/agent/a",
                Some("gpt-4o-mini"),
                3600,
                super::super::super::tokens::now(),
            );
            assert_eq!((used.total, used.model), (10, 10), "{used:?}");
        }
    }
}
