//! The agent's own sockets. The kernel programs never capture a connect that
//! carries the agent's socket mark *and* comes from the agent's cgroup, and
//! redirect captured connects only to a loopback listener that carries the
//! mark. Setting `SO_MARK` needs CAP_NET_ADMIN or CAP_NET_RAW in the node's
//! network namespace, so an unprivileged workload can neither leave capture
//! by imitating the agent nor stand in for the agent's listener when it is
//! down. (A pid would not do: a workload can fork until it is given a dead
//! agent's pid.)
//!
//! Every socket the agent connects from is made here.
use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::atomic::{AtomicU32, Ordering},
};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

static MARK: AtomicU32 = AtomicU32::new(0);

/// Sets the mark this process puts on its sockets (once, at startup, before
/// any socket is made). 0 leaves sockets unmarked (unit tests).
pub fn set(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// The mark in force.
pub fn get() -> u32 {
    MARK.load(Ordering::Relaxed)
}

/// Marks a socket with the agent's mark.
pub fn apply(socket: impl AsFd) -> std::io::Result<()> {
    match get() {
        0 => Ok(()),
        mark => SockRef::from(&socket).set_mark(mark),
    }
}

/// Connects to `dst` from a marked socket, optionally from the address of
/// `src` (its port is picked at `connect()`, see [`bind_address_no_port`]).
pub async fn connect(dst: SocketAddr, src: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    connect_in(&crate::netns::Net::Host, dst, src).await
}

/// Like [`connect`], from a socket made in `net` (a pod's netns: the
/// connection leaves from the pod, with its address).
pub async fn connect_in(
    net: &crate::netns::Net,
    dst: SocketAddr,
    src: Option<SocketAddr>,
) -> std::io::Result<TcpStream> {
    let socket = net.tcp_socket(dst.is_ipv6()).await?;
    apply(&socket)?;
    if let Some(src) = src {
        bind_address_no_port(&socket)?;
        socket.bind(src)?;
    }
    let stream = socket.connect(dst).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike): a bind to
/// port 0 then takes only the address, and the port is chosen at `connect()`
/// by the whole 4-tuple. Without it each bind reserves a port of its own
/// against every socket on it, TIME_WAIT ones included, so once a few
/// thousand forwards have closed every bind scans the port range (the
/// connection rate fell from thousands to ~100 a second) and at the end
/// fails with EADDRINUSE.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a pointer to an int that outlives the
    // call with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A marked, non-blocking listener on `addr` (IPv6 sockets are v6-only).
///
/// `SO_REUSEADDR`, as std sets it for its listeners: the connections an
/// agent accepted and closed first wait in TIME_WAIT on this address for a
/// minute, and without it an agent restarted meanwhile (after a crash,
/// `systemctl restart`) could not bind its port; systemd then gave up
/// after five tries and captured connects stayed refused. (It does not let
/// a second listener bind while one listens.)
pub fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    apply(&s)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A hyper connector for the agent's own HTTP requests (bundles, decision
/// logs, the Kubernetes API, traces): sockets that carry the agent's mark,
/// like every other socket of the agent (so they are never captured).
#[derive(Clone, Copy)]
pub struct MarkedConnector;

impl tower_service::Service<http::Uri> for MarkedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            };
            let port = uri.port_u16().unwrap_or(default_port);
            let mut last = std::io::Error::other(format!("{host}: no address"));
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match connect(addr, None).await {
                    Ok(s) => return Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
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
