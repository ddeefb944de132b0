//! Hitless upgrade: a new agent takes over the listening sockets of the one
//! running, over a unix socket in `state_dir`, and the old one drains.
//!
//! The exchange, one JSON message each way per step on a `SOCK_SEQPACKET`
//! socket (`<state_dir>/handover.sock`; both ends check that the peer runs as
//! the same user, `SO_PEERCRED`):
//!
//! 1. new → old: `hello` (protocol, node name, pid, cgroup id);
//! 2. old → new: `offer` (its pid, cgroup id and the name and address of each
//!    listener), the listening sockets attached (`SCM_RIGHTS`) in that order —
//!    or `refused` with the reason;
//! 3. the new agent attaches its kernel programs (which reuse the old one's
//!    connection records, see `capture`), accepts on the sockets it was given,
//!    then says `serving`;
//! 4. the old agent stops accepting — it closes its copies; the sockets live
//!    on in the new agent, so a connection waiting in a backlog is accepted
//!    there, not refused —, drains as at SIGTERM, and exits. The new agent
//!    sees the handover socket close.
//!
//! Until step 4 both agents accept from the same sockets; either can serve
//! any connection (the connection records are in shared maps).
use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, getsockopt, listen, recvmsg, sendmsg, setsockopt, socket,
    sockopt,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The handover socket's file name in `state_dir`.
pub const SOCKET: &str = "handover.sock";
const PROTOCOL: &str = "enforcer-handover/1";
/// How long each side waits for the other's next message, except the new
/// agent's `serving`, which comes after its kernel programs and identity are
/// up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const SERVING_TIMEOUT: Duration = Duration::from_secs(120);
/// Listeners a handover carries at most.
const MAX_LISTENERS: usize = 16;
const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {message}")]
    Socket { path: PathBuf, message: String },
    #[error("handover with the running agent{pid}: {message}", pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Exchange { pid: Option<u32>, message: String },
    #[error("the running agent (pid {pid}) refused the handover: {reason}")]
    Refused { pid: u32, reason: String },
}

fn exchange_err(pid: Option<u32>) -> impl Fn(String) -> HandoverError {
    move |message| HandoverError::Exchange { pid, message }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        protocol: String,
        node: String,
        pid: u32,
        cgroup_id: u64,
        /// The new agent takes pods' listeners too (an agent that does not
        /// know the field offers none: both directions stay compatible).
        #[serde(default)]
        pods: bool,
    },
    Offer {
        pid: u32,
        cgroup_id: u64,
        listeners: Vec<Offered>,
        /// How many pods' listeners follow, in [`Message::Pods`] messages.
        #[serde(default)]
        pods: usize,
    },
    /// Listeners in pods' network namespaces, at most [`MAX_LISTENERS`] a
    /// message (a message's descriptors are bounded).
    Pods {
        listeners: Vec<Offered>,
    },
    Refused {
        pid: u32,
        reason: String,
    },
    Serving {
        pid: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offered {
    name: String,
    addr: SocketAddr,
    /// A pod's listener: the cookie of its netns.
    #[serde(default, skip_serializing_if = "is_zero")]
    netns: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Whether this agent has handed its listeners to a new one (it drains).
static HANDED_OVER: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Set while a new agent this one accepted the hello of takes over: it
/// attaches its programs and retires this one's pins (all of them when its
/// release has another pin layout) before it says it serves.
static HANDING_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a new agent is taking over from this one, or has (the flag is
/// cleared only when a handover fails): this agent's pins may then be gone
/// for good without the capture being (the pin watch, `agent::watch_pins`,
/// must not take it for a detach).
pub fn handing_over() -> bool {
    HANDING_OVER.load(std::sync::atomic::Ordering::Acquire)
}

/// Resolves once this agent has handed its listeners over.
pub async fn handed_over() {
    let mut rx = HANDED_OVER.subscribe();
    // The sender lives in a static: the channel never closes.
    let _ = rx.wait_for(|h| *h).await;
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<(), String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    let iov = [IoSlice::new(&body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| format!("send: {e}"))?;
    Ok(())
}

/// `SO_RCVTIMEO`; zero waits without end.
fn set_timeout(fd: &OwnedFd, within: Duration) -> Result<(), String> {
    use nix::sys::time::TimeValLike as _;
    let tv = nix::sys::time::TimeVal::milliseconds(
        i64::try_from(within.as_millis()).unwrap_or(i64::MAX),
    );
    setsockopt(fd, sockopt::ReceiveTimeout, &tv).map_err(|e| e.to_string())
}

/// One message and the descriptors that came with it; `None` at end of file.
fn recv(fd: &OwnedFd, within: Duration) -> Result<Option<(Message, Vec<OwnedFd>)>, String> {
    set_timeout(fd, within)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = match recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(format!("no answer within {} s", within.as_secs()));
        }
        Err(e) => return Err(format!("receive: {e}")),
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this
            // process for us; nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err("message too long".into());
    }
    if n == 0 {
        return Ok(None);
    }
    let body = buf.get(..n).ok_or("message length out of range")?;
    let message = serde_json::from_slice(body).map_err(|e| format!("malformed message: {e}"))?;
    Ok(Some((message, fds)))
}

/// The peer runs as this process's user (root for an agent): another user
/// that reached the socket gets nothing.
fn check_peer(fd: &OwnedFd) -> Result<u32, String> {
    let cred = getsockopt(fd, sockopt::PeerCredentials).map_err(|e| e.to_string())?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me {
        return Err(format!(
            "the peer (pid {}) runs as uid {}, not {me}",
            cred.pid(),
            cred.uid()
        ));
    }
    Ok(u32::try_from(cred.pid()).unwrap_or(0))
}

fn unix_addr(path: &Path) -> Result<UnixAddr, HandoverError> {
    UnixAddr::new(path).map_err(|e| HandoverError::Socket {
        path: path.to_owned(),
        message: format!(
            "{e} (a unix socket path has at most 107 bytes; choose a shorter identity.state_dir)"
        ),
    })
}

fn seqpacket(path: &Path) -> Result<OwnedFd, HandoverError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| HandoverError::Socket {
        path: path.to_owned(),
        message: format!("socket: {e}"),
    })
}

// ---------------------------------------------------------------- new agent

/// A connection to the handover socket in `state_dir`; `None` when no
/// agent runs (no socket, or nobody listening on it).
fn dial(state_dir: &Path) -> Result<Option<OwnedFd>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let addr = unix_addr(&path)?;
    let conn = seqpacket(&path)?;
    match connect(conn.as_raw_fd(), &addr) {
        Ok(()) => Ok(Some(conn)),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(None),
        Err(e) => Err(HandoverError::Socket {
            path,
            message: format!("connect: {e}"),
        }),
    }
}

/// Whether an agent serves `state_dir`'s handover socket: the pid it runs
/// as, or `None` when nobody listens there. Connects and closes without a
/// hello, which the agent logs at info and otherwise ignores.
pub fn agent_running(state_dir: &Path) -> Result<Option<u32>, HandoverError> {
    dial(state_dir)?
        .map(|conn| check_peer(&conn).map_err(exchange_err(None)))
        .transpose()
}

/// The listeners a running agent handed over, until this agent says it
/// serves.
pub struct Inherited {
    pid: u32,
    cgroup_id: u64,
    listeners: Vec<(Offered, Option<OwnedFd>)>,
    pods: Vec<(Offered, Option<OwnedFd>)>,
    conn: OwnedFd,
}

/// Listeners in pods handed over by the previous agent, taken by the pods
/// this agent finds running.
#[derive(Default)]
pub struct PodListeners {
    pid: u32,
    listeners: Vec<(Offered, Option<OwnedFd>)>,
}

impl PodListeners {
    /// The listener handed over for pod `uid` as `kind` when it listens on
    /// `want` in the netns `cookie`, marked as this agent marks (checked
    /// on the socket itself); `None` otherwise (the pod's listener is then
    /// bound anew).
    pub fn take(
        &mut self,
        uid: &str,
        kind: &str,
        want: SocketAddr,
        cookie: u64,
    ) -> Option<std::net::TcpListener> {
        let name = pod_listener_name(uid, kind);
        let (offered, slot) = self
            .listeners
            .iter_mut()
            .find(|(o, _)| o.name == name && o.netns == cookie)?;
        if offered.addr != want {
            return None;
        }
        let fd = slot.take()?;
        let in_pod = crate::netns::netns_cookie(&fd).ok() == Some(cookie);
        let checked = in_pod
            .then(|| check_listener(fd, &name, want, true, self.pid).ok())
            .flatten();
        if checked.is_none() {
            warn!(listener = %name, "a pod's listener handed over is not what it claims; binding anew");
        }
        checked
    }
}

/// The handover name of a pod's listener.
pub fn pod_listener_name(uid: &str, kind: &str) -> String {
    format!("pod/{uid}/{kind}")
}

/// Asks the agent running with this `state_dir` for its listeners. `None`
/// when no agent runs (no socket, or nobody listening on it).
pub fn take_over(
    state_dir: &Path,
    node: &str,
    cgroup_id: u64,
) -> Result<Option<Inherited>, HandoverError> {
    let Some(conn) = dial(state_dir)? else {
        return Ok(None);
    };
    let peer = check_peer(&conn).map_err(exchange_err(None))?;
    let hello = Message::Hello {
        protocol: PROTOCOL.into(),
        node: node.into(),
        pid: std::process::id(),
        cgroup_id,
        pods: true,
    };
    send(&conn, &hello, &[]).map_err(exchange_err(Some(peer)))?;
    let (msg, fds) = recv(&conn, STEP_TIMEOUT)
        .map_err(exchange_err(Some(peer)))?
        .ok_or_else(|| exchange_err(Some(peer))("it closed the handover socket".into()))?;
    match msg {
        Message::Offer {
            pid,
            cgroup_id,
            listeners,
            pods,
        } => {
            if listeners.len() != fds.len() {
                return Err(exchange_err(Some(pid))(format!(
                    "it offered {} listeners with {} sockets",
                    listeners.len(),
                    fds.len()
                )));
            }
            let mut pod_listeners = Vec::with_capacity(pods);
            while pod_listeners.len() < pods {
                let (msg, fds) = recv(&conn, STEP_TIMEOUT)
                    .map_err(exchange_err(Some(pid)))?
                    .ok_or_else(|| {
                        exchange_err(Some(pid))("it closed the handover socket".into())
                    })?;
                match msg {
                    Message::Pods { listeners } if listeners.len() == fds.len() => {
                        pod_listeners.extend(listeners.into_iter().zip(fds.into_iter().map(Some)));
                    }
                    other => {
                        return Err(exchange_err(Some(pid))(format!(
                            "expected pods' listeners, got {other:?} with {} sockets",
                            fds.len()
                        )));
                    }
                }
            }
            info!(
                pid,
                listeners = ?listeners.iter().map(|l| format!("{} {}", l.name, l.addr)).collect::<Vec<_>>(),
                "taking over the running agent's listeners"
            );
            if pods > 0 {
                info!(
                    pid,
                    listeners = pods,
                    "taking over the running agent's listeners in pods"
                );
            }
            Ok(Some(Inherited {
                pid,
                cgroup_id,
                listeners: listeners
                    .into_iter()
                    .zip(fds.into_iter().map(Some))
                    .collect(),
                pods: pod_listeners,
                conn,
            }))
        }
        Message::Refused { pid, reason } => Err(HandoverError::Refused { pid, reason }),
        other => Err(exchange_err(Some(peer))(format!(
            "unexpected message {other:?}"
        ))),
    }
}

impl Inherited {
    /// The pid of the agent that handed over.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its cgroup id (the kernel programs take its marked connects for the
    /// agent's while it drains).
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// The listening socket handed over as `name`, when it listens on `want`
    /// (a listener whose address changed in the configuration is bound anew
    /// instead, and the old one closes when its agent exits). It must be a
    /// listening TCP socket; `marked` ones must carry this agent's mark, or
    /// the kernel programs would refuse every captured connect.
    pub fn take(
        &mut self,
        name: &str,
        want: SocketAddr,
        marked: bool,
    ) -> Result<Option<std::net::TcpListener>, HandoverError> {
        let pid = self.pid;
        let Some((offered, slot)) = self.listeners.iter_mut().find(|(o, _)| o.name == name) else {
            return Ok(None);
        };
        if offered.addr != want {
            info!(
                listener = name,
                was = %offered.addr,
                now = %want,
                "the listener's address changed; it is bound anew"
            );
            return Ok(None);
        }
        let Some(fd) = slot.take() else {
            return Ok(None);
        };
        check_listener(fd, name, want, marked, pid).map(Some)
    }

    /// The pods' listeners handed over (taken out of this value).
    pub fn take_pods(&mut self) -> PodListeners {
        PodListeners {
            pid: self.pid,
            listeners: std::mem::take(&mut self.pods),
        }
    }

    /// Tells the old agent that this one serves: it stops accepting and
    /// drains. Listeners not taken are closed here.
    pub fn serving(self) -> Result<Previous, HandoverError> {
        let Self {
            pid,
            cgroup_id,
            conn,
            ..
        } = self;
        send(
            &conn,
            &Message::Serving {
                pid: std::process::id(),
            },
            &[],
        )
        .map_err(exchange_err(Some(pid)))?;
        info!(previous = pid, "serving; the previous agent drains");
        Ok(Previous {
            pid,
            cgroup_id,
            conn,
        })
    }
}

/// The agent that handed over, draining.
pub struct Previous {
    pub pid: u32,
    pub cgroup_id: u64,
    conn: OwnedFd,
}

impl Previous {
    /// Resolves when the previous agent has exited (its end of the handover
    /// socket closed). Waits on the runtime's reactor, holding no thread.
    pub async fn exited(self) {
        let Self { pid, conn, .. } = self;
        if let Err(e) = wait_closed(conn).await {
            warn!(previous = pid, error = %e, "waiting for the previous agent failed");
        }
    }
}

/// Resolves at end of file on `conn` (anything the peer sends is ignored).
/// The `SOCK_SEQPACKET` socket is read through tokio's unix stream type:
/// `read(2)` on it returns 0 at end of file all the same.
async fn wait_closed(conn: OwnedFd) -> std::io::Result<()> {
    let conn = std::os::unix::net::UnixStream::from(conn);
    conn.set_nonblocking(true)?;
    let conn = tokio::net::UnixStream::from_std(conn)?;
    let mut buf = [0u8; 256];
    loop {
        conn.readable().await?;
        match conn.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks a handed-over socket: a listening TCP socket on `want`, carrying
/// this agent's mark when `marked`.
fn check_listener(
    fd: OwnedFd,
    name: &str,
    want: SocketAddr,
    marked: bool,
    pid: u32,
) -> Result<std::net::TcpListener, HandoverError> {
    let err = |m: String| HandoverError::Exchange {
        pid: Some(pid),
        message: format!("listener {name} ({want}): {m}"),
    };
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(|e| err(e.to_string()))?;
    let kind = getsockopt(&fd, sockopt::SockType).map_err(|e| err(e.to_string()))?;
    if !listening || kind != SockType::Stream {
        return Err(err("not a listening TCP socket".into()));
    }
    let listener = std::net::TcpListener::from(fd);
    let local = listener.local_addr().map_err(|e| err(e.to_string()))?;
    if local != want {
        return Err(err(format!("it listens on {local}")));
    }
    if marked {
        let mark = socket2::SockRef::from(&listener)
            .mark()
            .map_err(|e| err(e.to_string()))?;
        if mark != crate::mark::get() {
            return Err(err(format!(
                "it carries mark {mark:#x}, this agent's capture.agent_mark is {:#x}; a hitless upgrade cannot change the mark — stop the running agent first",
                crate::mark::get()
            )));
        }
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

// ---------------------------------------------------------------- old agent

/// The listeners this agent offers to its successor (copies of the sockets
/// it accepts on).
pub struct Offer {
    node: String,
    cgroup_id: u64,
    listeners: Vec<(Offered, OwnedFd)>,
    /// The listeners in pods, which come and go while the agent runs.
    pods: PodOffer,
}

/// The pods' part of an [`Offer`], kept up to date by the pods' serving
/// (`inpod.rs`) while the offer waits for a successor.
#[derive(Clone, Default)]
pub struct PodOffer(Arc<Mutex<Vec<(Offered, OwnedFd)>>>);

impl PodOffer {
    /// Offers a copy of `listener`, pod `uid`'s `kind`, in netns `cookie`.
    pub fn add(
        &self,
        uid: &str,
        kind: &str,
        cookie: u64,
        listener: &impl AsFd,
    ) -> std::io::Result<()> {
        if crate::drain::is_draining() {
            return Ok(());
        }
        let (mut offered, fd) = offered(&pod_listener_name(uid, kind), listener)?;
        offered.netns = cookie;
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((offered, fd));
        Ok(())
    }

    /// Offers pod `uid`'s listeners no more.
    pub fn remove(&self, uid: &str) {
        let prefix = pod_listener_name(uid, "");
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(o, _)| !o.name.starts_with(&prefix));
    }

    /// Offers nothing more, and closes the copies (the agent drains: a
    /// listener nobody accepts on must not stay open).
    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// The pods' listeners now: their descriptions and (duplicated) sockets.
    fn snapshot(&self) -> std::io::Result<Vec<(Offered, OwnedFd)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(o, fd)| Ok((o.clone(), fd.try_clone()?)))
            .collect()
    }
}

/// A listener's description and a copy of its socket.
fn offered(name: &str, listener: &impl AsFd) -> std::io::Result<(Offered, OwnedFd)> {
    let fd = listener.as_fd().try_clone_to_owned()?;
    let addr = socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((
        Offered {
            name: name.into(),
            addr,
            netns: 0,
        },
        fd,
    ))
}

impl Offer {
    pub fn new(node: &str, cgroup_id: u64) -> Self {
        Self {
            node: node.into(),
            cgroup_id,
            listeners: Vec::new(),
            pods: PodOffer::default(),
        }
    }

    /// Adds a copy of `listener` under `name`.
    pub fn add(&mut self, name: &str, listener: &impl AsFd) -> std::io::Result<()> {
        self.listeners.push(offered(name, listener)?);
        Ok(())
    }

    /// The pods' part of this offer.
    pub fn pods(&self) -> PodOffer {
        self.pods.clone()
    }
}

/// A successor that serves: this agent drains. Holding it keeps the
/// handover socket open (the successor sees it close when this agent
/// exits).
pub struct HandedOver {
    pub pid: u32,
    _conn: OwnedFd,
}

/// Serves `<state_dir>/handover.sock` on a thread of its own: the first
/// agent that completes the exchange gets the listeners and is returned;
/// one that fails or goes away midway changes nothing here. The socket
/// replaces (atomically, by rename) whatever was at the path — the socket of
/// the agent this one took over from, or a stale one.
pub fn serve(
    state_dir: &Path,
    offer: Offer,
) -> Result<tokio::sync::oneshot::Receiver<HandedOver>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let tmp = state_dir.join(format!("{SOCKET}.{}", std::process::id()));
    let sock_err = |p: &Path, m: String| HandoverError::Socket {
        path: p.to_owned(),
        message: m,
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = seqpacket(&tmp)?;
    bind(listener.as_raw_fd(), &unix_addr(&tmp)?)
        .map_err(|e| sock_err(&tmp, format!("bind: {e}")))?;
    listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| sock_err(&tmp, format!("listen: {e}")))?;
    std::fs::rename(&tmp, &path).map_err(|e| sock_err(&path, format!("rename: {e}")))?;
    // accept() waits at most this long, so the thread sees a drain start
    // and closes its copies of the listeners: a draining agent refuses new
    // connections instead of leaving them in a backlog nobody accepts from.
    set_timeout(&listener, Duration::from_millis(200)).map_err(|m| sock_err(&path, m))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            loop {
                if crate::drain::is_draining() {
                    // The copies of the pods' listeners go too (the pods'
                    // serving holds the offer as well).
                    offer.pods.clear();
                    return;
                }
                let conn = match accept(listener.as_raw_fd()) {
                    // SAFETY: accept returned a new descriptor owned by nobody else.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                    Err(e) => {
                        warn!(error = %e, "handover socket: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&conn, &offer) {
                    Ok(pid) => {
                        offer.pods.clear();
                        HANDED_OVER.send_replace(true);
                        let _ = tx.send(HandedOver { pid, _conn: conn });
                        return;
                    }
                    Err(Declined::Probe(peer)) => info!(
                        peer,
                        "a process asked whether this agent runs (the handover socket, closed without a hello: `enforcer detach` checks so)"
                    ),
                    Err(Declined::Failed(e)) => {
                        warn!(error = %e, "handover failed; this agent keeps serving");
                    }
                }
            }
        })
        .map_err(|e| sock_err(&path, format!("thread: {e}")))?;
    Ok(rx)
}

/// Why a connection to the handover socket took nothing over.
enum Declined {
    /// It closed before its hello: a check that an agent runs (pid).
    Probe(u32),
    Failed(String),
}

impl From<String> for Declined {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

fn hand_over(conn: &OwnedFd, offer: &Offer) -> Result<u32, Declined> {
    let peer = check_peer(conn)?;
    let Some((hello, _)) = recv(conn, STEP_TIMEOUT)? else {
        return Err(Declined::Probe(peer));
    };
    let taken = exchange(conn, offer, peer, hello).map_err(Declined::Failed);
    if taken.is_err() {
        HANDING_OVER.store(false, std::sync::atomic::Ordering::Release);
    }
    taken
}

/// The handover after the new agent's first message.
fn exchange(conn: &OwnedFd, offer: &Offer, peer: u32, hello: Message) -> Result<u32, String> {
    let refuse = |reason: String| {
        let _ = send(
            conn,
            &Message::Refused {
                pid: std::process::id(),
                reason: reason.clone(),
            },
            &[],
        );
        reason
    };
    let Message::Hello {
        protocol,
        node,
        pid,
        pods: takes_pods,
        ..
    } = hello
    else {
        return Err(refuse(format!("pid {peer}: expected hello, got {hello:?}")));
    };
    if protocol != PROTOCOL {
        return Err(refuse(format!(
            "pid {pid} speaks {protocol}, this agent {PROTOCOL}"
        )));
    }
    if node != offer.node {
        return Err(refuse(format!(
            "pid {pid} is node {node:?}, this agent is {:?}: two agents sharing a state_dir need the same node_name",
            offer.node
        )));
    }
    // From here the new agent may attach and retire this one's pins.
    HANDING_OVER.store(true, std::sync::atomic::Ordering::Release);
    let listeners = offer.listeners.iter().map(|(o, _)| o.clone()).collect();
    let fds: Vec<RawFd> = offer
        .listeners
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .collect();
    // An agent that does not take pods' listeners binds its own once
    // these close.
    let pods = if takes_pods {
        offer
            .pods
            .snapshot()
            .map_err(|e| format!("pods' listeners: {e}"))?
    } else {
        Vec::new()
    };
    send(
        conn,
        &Message::Offer {
            pid: std::process::id(),
            cgroup_id: offer.cgroup_id,
            listeners,
            pods: pods.len(),
        },
        &fds,
    )?;
    for chunk in pods.chunks(MAX_LISTENERS) {
        let listeners = chunk.iter().map(|(o, _)| o.clone()).collect();
        let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(conn, &Message::Pods { listeners }, &fds)?;
    }
    info!(
        successor = pid,
        "listeners offered; waiting for the new agent to serve"
    );
    match recv(conn, SERVING_TIMEOUT)? {
        Some((Message::Serving { .. }, _)) => {
            info!(
                successor = pid,
                "the new agent serves; handing over and draining"
            );
            Ok(pid)
        }
        Some((other, _)) => Err(format!("pid {pid}: expected serving, got {other:?}")),
        None => Err(format!(
            "the new agent (pid {pid}) went away before it served"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More pods' listeners than one message carries: they come over in
    /// several, each taken by its name, address and netns; one that
    /// claims another netns is not taken.
    #[test]
    fn pods_listeners_are_handed_over_in_messages_of_at_most_sixteen() {
        let dir = std::env::temp_dir().join(format!("enforcer-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let offer = Offer::new("n", 1);
        let pods = offer.pods();
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let cookie = crate::netns::netns_cookie(&probe).expect("SO_NETNS_COOKIE");
        let mut kept = Vec::new();
        for i in 0..40 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
            // The last one claims a netns it is not in.
            let claimed = if i == 39 { cookie + 1 } else { cookie };
            pods.add(&format!("pod-{i}"), "outbound4", claimed, &l)
                .expect("offered");
            kept.push(l);
        }
        let handed = serve(&dir, offer).expect("serve");
        let mut inherited = take_over(&dir, "n", 2)
            .expect("exchange")
            .expect("an agent to take over from");
        let mut taken = inherited.take_pods();
        for (i, l) in kept.iter().enumerate().take(39) {
            let addr = l.local_addr().expect("addr");
            let got = taken
                .take(&format!("pod-{i}"), "outbound4", addr, cookie)
                .unwrap_or_else(|| panic!("pod-{i}'s listener"));
            assert_eq!(got.local_addr().expect("addr"), addr);
        }
        let last = kept[39].local_addr().expect("addr");
        assert!(
            taken
                .take("pod-39", "outbound4", last, cookie + 1)
                .is_none()
        );
        assert!(
            taken.take("pod-0", "outbound4", last, cookie).is_none(),
            "taken once"
        );
        let _previous = inherited.serving().expect("serving");
        assert!(
            handed.blocking_recv().is_ok(),
            "the old side saw the new one serve"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
