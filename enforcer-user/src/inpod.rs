//! Pods in network namespaces of their own (DESIGN §1.9, `[kubernetes]
//! in_pod`): the agent opens its outbound (15001) and HBONE (15008)
//! listeners inside each pod's netns and adds the netns to the set the
//! kernel programs capture in. It learns of a pod from `enforcer-cni` (ADD
//! and DEL over `kubernetes.cni_socket`), finds the pods already running at
//! start (their cgroups under `kubernetes.pods_cgroup` → a process → its
//! netns), and lets a pod go when its netns file or its cgroup is gone.
//!
//! A pod in the node's own netns (hostNetwork) keeps the node-level path.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    capture::Capture,
    handover::{PodListeners, PodOffer},
    netns::{Net, PodNs},
    proxy::{inbound::Inbound, outbound::Outbound, plaintext::Plaintext},
};

/// Pods served at most (the kernel's netns set holds 1 024 entries, the
/// node's own among them); a pod over the cap is refused (its ADD fails).
pub const MAX_PODS: usize = 1000;

/// How often served pods are checked for having gone without a DEL.
const SWEEP: Duration = Duration::from_secs(2);

/// What the agent asks of a pod's netns.
#[derive(Debug, Clone)]
pub struct Ports {
    pub outbound: u16,
    /// `None`: the agent serves no HBONE (no `mesh.inbound_addr`).
    pub hbone: Option<u16>,
    /// `None`: no port is protected from plaintext (`mesh.inbound`).
    pub plaintext: Option<u16>,
}

/// How the agent came to serve a pod, and so how it sees it go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// `enforcer-cni` ADD with this netns file (the runtime's bind mount):
    /// gone when the file is, or names another netns.
    Cni(PathBuf),
    /// Found running at start: gone when its cgroup directory is.
    Cgroup(PathBuf),
}

impl Origin {
    fn gone(&self, inode: u64) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match self {
            Origin::Cni(p) => std::fs::metadata(p).map_or(true, |m| m.ino() != inode),
            Origin::Cgroup(p) => !p.is_dir(),
        }
    }
}

/// A pod's listeners, made in its netns but not yet accepting.
pub struct Prepared {
    uid: String,
    ns: Arc<PodNs>,
    origin: Origin,
    outbound: Vec<std::net::TcpListener>,
    hbone: Vec<std::net::TcpListener>,
    plaintext: Vec<std::net::TcpListener>,
    addrs: Vec<IpAddr>,
}

struct Served {
    ns: Arc<PodNs>,
    origin: Origin,
    tasks: Vec<tokio::task::AbortHandle>,
    steering: Option<crate::capture::PodSteering>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.ns.gone.cancel();
    }
}

/// Why a pod could not be served.
#[derive(Debug, thiserror::Error)]
pub enum InPodError {
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("pod {pod}: cannot listen on {addr} in its network namespace: {source}")]
    Listen {
        pod: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {pod}: {MAX_PODS} pods are served already")]
    Full { pod: String },
    #[error("pod {pod}: {message}")]
    Capture { pod: String, message: String },
}

impl InPodError {
    /// The listeners are still held (by the agent that handed over).
    fn in_use(&self) -> bool {
        matches!(self, InPodError::Listen { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// Makes a pod's listeners in its netns (blocking: netns thread).
fn prepare(
    uid: &str,
    path: &Path,
    origin: Origin,
    ports: &Ports,
    host_inode: u64,
    mut inherited: Option<&mut PodListeners>,
) -> Result<Option<Prepared>, InPodError> {
    let ns = PodNs::open(path, uid)?;
    if ns.inode == host_inode {
        // hostNetwork: the node-level listeners serve it.
        return Ok(None);
    }
    // The listener the previous agent handed over, else a new one.
    let mut listen =
        |kind: &str, addr: SocketAddr| -> Result<Option<std::net::TcpListener>, InPodError> {
            if let Some(l) = inherited
                .as_deref_mut()
                .and_then(|i| i.take(uid, kind, addr, ns.cookie))
            {
                return Ok(Some(l));
            }
            // A marked listener made inside the pod's netns.
            match ns.run(move || crate::mark::listener(addr))? {
                Ok(l) => Ok(Some(l)),
                Err(e)
                    if addr.is_ipv6()
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                        ) =>
                {
                    Ok(None)
                }
                Err(source) => Err(InPodError::Listen {
                    pod: uid.to_owned(),
                    addr,
                    source,
                }),
            }
        };
    // Outbound on loopback; HBONE and plaintext on the wildcards ([::] is
    // v6-only, see mark::listener, so 0.0.0.0 as well). A group whose port
    // is `None` is not served.
    let (mut outbound, mut hbone, mut plaintext) = (Vec::new(), Vec::new(), Vec::new());
    for (group, name, port, v4, v6) in [
        (
            &mut outbound,
            "outbound",
            Some(ports.outbound),
            Ipv4Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
        ),
        (
            &mut hbone,
            "hbone",
            ports.hbone,
            Ipv4Addr::UNSPECIFIED,
            Ipv6Addr::UNSPECIFIED,
        ),
        (
            &mut plaintext,
            "plaintext",
            ports.plaintext,
            Ipv4Addr::UNSPECIFIED,
            Ipv6Addr::UNSPECIFIED,
        ),
    ] {
        let Some(port) = port else { continue };
        group.extend(listen(&format!("{name}4"), SocketAddr::from((v4, port)))?);
        group.extend(listen(&format!("{name}6"), SocketAddr::from((v6, port)))?);
    }
    let addrs = ns.addresses()?;
    Ok(Some(Prepared {
        uid: uid.to_owned(),
        ns: Arc::new(ns),
        origin,
        outbound,
        hbone,
        plaintext,
        addrs,
    }))
}

/// The pods this agent serves.
pub struct InPod {
    pods: Mutex<HashMap<String, Served>>,
    capture: Arc<Capture>,
    outbound: Arc<Outbound>,
    inbound: Option<Arc<Inbound>>,
    plaintext: Option<Arc<Plaintext>>,
    ports: Ports,
    host_inode: u64,
    /// The pods' listeners, offered to the agent that takes over.
    offer: PodOffer,
}

/// The handlers a pod's listeners get (the node's, made the pod's).
pub struct Handlers {
    pub outbound: Arc<Outbound>,
    pub inbound: Option<Arc<Inbound>>,
    pub plaintext: Option<Arc<Plaintext>>,
}

impl InPod {
    pub fn new(
        capture: Arc<Capture>,
        handlers: Handlers,
        ports: Ports,
        offer: PodOffer,
    ) -> std::io::Result<Self> {
        Ok(Self {
            pods: Default::default(),
            capture,
            outbound: handlers.outbound,
            inbound: handlers.inbound,
            plaintext: handlers.plaintext,
            ports,
            host_inode: own_netns_inode()?,
            offer,
        })
    }

    /// Pods served now: UID → netns cookie.
    pub fn served(&self) -> Vec<(String, u64)> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = pods.iter().map(|(u, s)| (u.clone(), s.ns.cookie)).collect();
        out.sort();
        out
    }

    /// Starts accepting on a prepared pod's listeners, then captures in its
    /// netns (in this order: a captured connect always finds a listener).
    fn activate(&self, p: Prepared) -> Result<(), InPodError> {
        let net = Net::Pod(p.ns.clone());
        // Dropped on an error below: what was started stops.
        let mut served = Served {
            ns: p.ns.clone(),
            origin: p.origin,
            tasks: Vec::new(),
            steering: None,
        };
        // Offered to the agent that takes over (copies of the sockets).
        for (group, listeners) in [
            ("outbound", &p.outbound),
            ("hbone", &p.hbone),
            ("plaintext", &p.plaintext),
        ] {
            for l in listeners {
                let family = if l.local_addr().is_ok_and(|a| a.is_ipv6()) {
                    "6"
                } else {
                    "4"
                };
                if let Err(e) = self
                    .offer
                    .add(&p.uid, &format!("{group}{family}"), p.ns.cookie, l)
                {
                    warn!(pod = %p.uid, error = %e, "a pod's listener cannot be offered for a handover");
                }
            }
        }
        // One attestor of the pod's listeners for all its handlers; the
        // agent's own are known by their inodes.
        let own = p
            .outbound
            .iter()
            .chain(&p.hbone)
            .chain(&p.plaintext)
            .filter_map(|l| {
                use std::os::unix::fs::MetadataExt as _;
                let fd = std::os::fd::AsFd::as_fd(l).try_clone_to_owned().ok()?;
                std::fs::File::from(fd).metadata().ok().map(|m| m.ino())
            })
            .collect();
        let local = Arc::new(crate::attest::local::LocalAttestor::new(net.clone(), own));
        let outbound = Arc::new(
            self.outbound
                .for_pod(net.clone(), local.clone(), p.addrs.clone()),
        );
        for l in p.outbound {
            let l = TcpListener::from_std(l).map_err(|source| InPodError::Listen {
                pod: p.uid.clone(),
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.outbound)),
                source,
            })?;
            served
                .tasks
                .push(tokio::spawn(outbound.clone().serve(l)).abort_handle());
        }
        if let Some(inbound) = &self.inbound {
            let inbound = Arc::new(inbound.for_pod(net.clone(), local.clone()));
            for l in p.hbone {
                let l = TcpListener::from_std(l).map_err(|source| InPodError::Listen {
                    pod: p.uid.clone(),
                    addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.ports.hbone.unwrap_or(0))),
                    source,
                })?;
                served
                    .tasks
                    .push(tokio::spawn(inbound.clone().serve(l)).abort_handle());
            }
        }
        if let Some(handler) = &self.plaintext {
            use std::os::fd::AsRawFd as _;
            let (mut v4, mut v6) = (None, None);
            for l in &p.plaintext {
                match l.local_addr() {
                    Ok(a) if a.is_ipv4() => v4 = Some(l.as_raw_fd()),
                    Ok(_) => v6 = Some(l.as_raw_fd()),
                    Err(_) => {}
                }
            }
            // Each address of the pod, to the listener of its family.
            let by_address: Vec<(IpAddr, std::os::fd::RawFd)> = p
                .addrs
                .iter()
                .filter(|ip| !ip.is_loopback())
                .filter_map(|ip| Some((*ip, if ip.is_ipv4() { v4? } else { v6? })))
                .collect();
            served.steering = self
                .capture
                .steer_pod(p.ns.fd(), p.ns.cookie, &by_address)
                .map_err(|e| InPodError::Capture {
                    pod: p.uid.clone(),
                    message: e.to_string(),
                })?;
            let handler = Arc::new(handler.for_pod(net.clone(), local.clone()));
            for l in p.plaintext {
                let l = TcpListener::from_std(l).map_err(|source| InPodError::Listen {
                    pod: p.uid.clone(),
                    addr: SocketAddr::from((
                        Ipv4Addr::UNSPECIFIED,
                        self.ports.plaintext.unwrap_or(0),
                    )),
                    source,
                })?;
                served
                    .tasks
                    .push(tokio::spawn(handler.clone().serve(l)).abort_handle());
            }
        }
        self.capture
            .serve_netns(p.ns.cookie)
            .map_err(|e| InPodError::Capture {
                pod: p.uid.clone(),
                message: e.to_string(),
            })?;
        info!(pod = %p.uid, netns = p.ns.cookie, "serving the pod in its network namespace");
        let served_cookie = p.ns.cookie;
        let old = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(p.uid, served);
        if let Some(mut old) = old
            && old.ns.cookie != served_cookie
        {
            if let Some(steering) = old.steering.take() {
                self.capture.unsteer_pod(steering);
            }
            let _ = self.capture.forget_netns(old.ns.cookie);
        }
        Ok(())
    }

    /// [`InPod::activate`] on the blocking pool: the kernel work (map
    /// updates, the program's attachment, its pin on bpffs) stays off the
    /// runtime's threads.
    async fn activate_apart(self: &Arc<Self>, p: Prepared) -> Result<(), InPodError> {
        let (this, uid) = (self.clone(), p.uid.clone());
        tokio::task::spawn_blocking(move || this.activate(p))
            .await
            .map_err(|e| InPodError::Capture {
                pod: uid,
                message: e.to_string(),
            })?
    }

    /// Serves pod `uid` whose netns is at `netns` (a CNI ADD): returns once
    /// its listeners accept and its connects are captured. Again for a pod
    /// served already in the same netns: nothing to do.
    pub async fn add(self: &Arc<Self>, uid: &str, netns: &Path) -> Result<(), InPodError> {
        let inode = {
            use std::os::unix::fs::MetadataExt as _;
            let path = netns.to_owned();
            tokio::task::spawn_blocking(move || std::fs::metadata(path).map(|m| m.ino()).ok())
                .await
                .ok()
                .flatten()
        };
        {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = pods.get(uid)
                && Some(s.ns.inode) == inode
            {
                return Ok(());
            }
            if pods.len() >= MAX_PODS && !pods.contains_key(uid) {
                return Err(InPodError::Full {
                    pod: uid.to_owned(),
                });
            }
        }
        let (this, uid2, path) = (self.clone(), uid.to_owned(), netns.to_owned());
        let prepared = tokio::task::spawn_blocking(move || {
            prepare(
                &uid2,
                &path,
                Origin::Cni(path.clone()),
                &this.ports,
                this.host_inode,
                None,
            )
        })
        .await
        .map_err(|e| InPodError::Capture {
            pod: uid.to_owned(),
            message: e.to_string(),
        })??;
        match prepared {
            None => {
                info!(pod = %uid, "the pod shares the node's network namespace (hostNetwork); the node's listeners serve it");
                Ok(())
            }
            Some(p) => self.activate_apart(p).await,
        }
    }

    /// Stops serving pod `uid` (a CNI DEL, or its netns or cgroup gone).
    pub fn remove(&self, uid: &str) -> bool {
        let Some(mut s) = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid)
        else {
            return false;
        };
        self.offer.remove(uid);
        if let Some(steering) = s.steering.take() {
            self.capture.unsteer_pod(steering);
        }
        if let Err(e) = self.capture.forget_netns(s.ns.cookie) {
            warn!(pod = uid, error = %e, "removing the pod's netns from the capture set");
        }
        info!(pod = uid, netns = s.ns.cookie, "no longer serving the pod");
        true
    }

    /// Whether pod `uid` is served (a CNI CHECK).
    pub fn is_served(&self, uid: &str) -> bool {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(uid)
    }

    /// Lets go of pods whose netns file or cgroup is gone (a DEL missed
    /// while the agent was down, or a pod found at start that ended).
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tick.tick().await;
            // After a handover the new agent serves the pods (and owns
            // their pins); this one leaves them be.
            if crate::drain::is_draining() {
                return;
            }
            let this = self.clone();
            let gone = crate::chores::run(move || {
                let pods: Vec<_> = this
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(u, s)| (u.clone(), s.origin.clone(), s.ns.inode))
                    .collect();
                // Let go here too: unpinning and the map update stay off
                // the runtime's threads.
                for (uid, origin, inode) in pods {
                    if origin.gone(inode) {
                        info!(pod = %uid, "the pod's network namespace or cgroup is gone");
                        this.remove(&uid);
                    }
                }
            })
            .await;
            if let Err(e) = gone {
                warn!(error = %e, "the sweep of gone pods failed");
            }
        }
    }
}

/// The pods running at start (blocking): each pod cgroup under
/// `pods_cgroup` (on the cgroup2 mount `mount`) with a live process in a
/// netns other than the agent's, its listeners made. A pod whose listeners
/// are still held (the agent handing over to this one has them) is
/// returned apart, to be served once they are free.
pub fn reconcile(
    mount: &Path,
    pods_cgroup: &[String],
    ports: &Ports,
    mut inherited: PodListeners,
) -> Reconciled {
    let Ok(host_inode) = own_netns_inode() else {
        return Reconciled::default();
    };
    let mut ready = Vec::new();
    let mut waiting = Vec::new();
    let mut cookies = Vec::new();
    for (uid, dir) in pod_cgroups(mount, pods_cgroup) {
        let Some(pid) = a_process_under(&dir) else {
            continue;
        };
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        match prepare(
            &uid,
            &path,
            Origin::Cgroup(dir.clone()),
            ports,
            host_inode,
            Some(&mut inherited),
        ) {
            Ok(Some(p)) => {
                cookies.push(p.ns.cookie);
                ready.push(p);
            }
            Ok(None) => {}
            Err(e) if e.in_use() => {
                // Captured meanwhile, by the previous agent's listeners.
                if let Ok(ns) = PodNs::open(&path, &uid) {
                    cookies.push(ns.cookie);
                }
                waiting.push((uid, path, dir));
            }
            Err(e) => warn!(pod = %uid, error = %e, "a running pod cannot be served"),
        }
    }
    Reconciled {
        ready,
        waiting,
        cookies,
    }
}

/// What [`reconcile`] found.
#[derive(Default)]
pub struct Reconciled {
    ready: Vec<Prepared>,
    /// Pods whose listeners the previous agent still holds: UID, netns
    /// path, cgroup.
    waiting: Vec<(String, PathBuf, PathBuf)>,
    /// The netns cookies of all of them (the capture set at start).
    pub cookies: Vec<u64>,
}

impl InPod {
    /// Serves the pods [`reconcile`] found (their netns cookies are in the
    /// capture set already), and those whose listeners were still held by
    /// the previous agent as soon as they are free (retried every 100 ms
    /// for up to 60 s; captured connects in such a pod are refused
    /// meanwhile, never let through).
    pub fn serve_reconciled(self: &Arc<Self>, found: Reconciled) {
        let Reconciled {
            ready,
            waiting,
            cookies,
        } = found;
        // Pins of pods a previous agent served that no longer run.
        self.capture.retire_pod_pins(&cookies);
        for p in ready {
            let uid = p.uid.clone();
            if let Err(e) = self.activate(p) {
                warn!(pod = %uid, error = %e, "a running pod cannot be served");
            }
        }
        for (uid, path, dir) in waiting {
            let this = self.clone();
            tokio::spawn(async move {
                for _ in 0..600 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let (t, u, p, d) = (this.clone(), uid.clone(), path.clone(), dir.clone());
                    let r = tokio::task::spawn_blocking(move || {
                        prepare(&u, &p, Origin::Cgroup(d), &t.ports, t.host_inode, None)
                    })
                    .await;
                    match r {
                        Ok(Err(e)) if e.in_use() => continue,
                        Ok(Ok(Some(p))) => {
                            if let Err(e) = this.activate_apart(p).await {
                                warn!(pod = %uid, error = %e, "a running pod cannot be served");
                            }
                            return;
                        }
                        Ok(Ok(None)) => return,
                        Ok(Err(e)) => {
                            warn!(pod = %uid, error = %e, "a running pod cannot be served");
                            return;
                        }
                        Err(e) => {
                            warn!(pod = %uid, error = %e, "a running pod cannot be served");
                            return;
                        }
                    }
                }
                warn!(pod = %uid, "the pod's listeners stayed in use for 60 s; it is not served (its captured connects are refused)");
            });
        }
    }
}

/// The inode of the agent's own netns.
fn own_netns_inode() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

/// Pod cgroup directories under the kubelet's trees: `…-pod<uid>.slice`
/// (systemd driver) or `pod<uid>` (cgroupfs driver), with the pod's UID.
fn pod_cgroups(mount: &Path, roots: &[String]) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = roots
        .iter()
        .map(|r| (mount.join(r.trim_start_matches('/')), 0))
        .collect();
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let probe = format!("/kubepods/{name}");
            let uid = crate::attest::selectors::container_selectors(&probe)
                .into_iter()
                .find_map(|s| s.strip_prefix("k8s:pod-uid:").map(str::to_owned));
            match uid {
                Some(uid) => out.push((uid, e.path())),
                // QoS level slices (besteffort, burstable) lie in between.
                None if depth < 2 => stack.push((e.path(), depth + 1)),
                None => {}
            }
        }
    }
    out
}

/// A live process in `dir` or below (the pod's sandbox or a container).
fn a_process_under(dir: &Path) -> Option<u32> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs"))
            && let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok())
        {
            return Some(pid);
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// One request of `enforcer-cni` (a JSON line on the CNI socket).
#[derive(Debug, Deserialize, Serialize)]
pub struct CniRequest {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod_uid: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
}

/// The agent's answer (a JSON line).
#[derive(Debug, Deserialize, Serialize)]
pub struct CniAnswer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Serves `enforcer-cni` on the unix socket `path` (made 0600 in a 0700
/// directory: only root may ask the agent to serve a netns).
pub fn listen_cni(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Answers CNI requests until the agent drains.
pub async fn serve_cni(inpod: Arc<InPod>, listener: tokio::net::UnixListener) {
    let stop = crate::drain::draining();
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = &mut stop => return,
        };
        match conn {
            Ok((stream, _)) => {
                tokio::spawn(cni_connection(inpod.clone(), stream));
            }
            Err(e) => {
                warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn cni_connection(inpod: Arc<InPod>, stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    // The socket is 0600; a peer of another user (one that connected in
    // the moment between bind and chmod) is turned away all the same.
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == me => {}
        Ok(c) => {
            warn!(uid = c.uid(), pid = ?c.pid(), "CNI socket: a peer that is not root; ignored");
            return;
        }
        Err(e) => {
            warn!(error = %e, "CNI socket: no peer credentials; ignored");
            return;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read.take(64 * 1024)).lines();
    let answer = match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
        Ok(Ok(Some(line))) => match serde_json::from_str::<CniRequest>(&line) {
            Ok(req) => cni_request(&inpod, req).await,
            Err(e) => CniAnswer {
                ok: false,
                error: format!("malformed request: {e}"),
            },
        },
        Ok(Ok(None)) => return,
        Ok(Err(e)) => CniAnswer {
            ok: false,
            error: format!("reading the request: {e}"),
        },
        Err(_) => CniAnswer {
            ok: false,
            error: "no request within 10 s".into(),
        },
    };
    let mut line = serde_json::to_vec(&answer).unwrap_or_default();
    line.push(b'\n');
    let _ = write.write_all(&line).await;
}

use tokio::io::AsyncReadExt as _;

async fn cni_request(inpod: &Arc<InPod>, req: CniRequest) -> CniAnswer {
    // Without Kubernetes' CNI_ARGS the container id names the pod.
    let uid = if req.pod_uid.is_empty() {
        req.container_id.clone()
    } else {
        req.pod_uid.clone()
    };
    let fail = |error: String| CniAnswer { ok: false, error };
    let ok = CniAnswer {
        ok: true,
        error: String::new(),
    };
    match req.command.as_str() {
        "ADD" => {
            if req.netns.is_empty() {
                return fail("ADD without a netns".into());
            }
            match inpod.add(&uid, Path::new(&req.netns)).await {
                Ok(()) => {
                    info!(pod = %uid, namespace = %req.pod_namespace, name = %req.pod_name, "CNI ADD: pod served");
                    ok
                }
                Err(e) => {
                    warn!(pod = %uid, namespace = %req.pod_namespace, name = %req.pod_name, error = %e, "CNI ADD refused");
                    fail(e.to_string())
                }
            }
        }
        "DEL" => {
            // Unpinning and the map update: on the blocking pool.
            let this = inpod.clone();
            match tokio::task::spawn_blocking(move || this.remove(&uid)).await {
                Ok(_) => ok,
                Err(e) => fail(format!("DEL: {e}")),
            }
        }
        "CHECK" if inpod.is_served(&uid) => ok,
        "CHECK" => fail(format!("pod {uid} is not served")),
        other => fail(format!("unknown command {other:?}")),
    }
}
