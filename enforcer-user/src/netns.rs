//! Network namespaces the agent makes sockets in. A socket keeps the netns
//! it was created in, so the agent (one process, in the node's netns) makes
//! a pod's listeners and dials inside the pod by creating those sockets on a
//! thread that has entered the pod's netns (DESIGN §1.9, ztunnel's in-pod
//! model). One thread does that for every pod: it enters a netns, runs one
//! short job (`socket()`, `getifaddrs()`), and returns to the agent's netns
//! before the next job; it never runs anything else. Should it fail to
//! return, the agent aborts rather than make sockets in the wrong place.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, mpsc},
};

/// A failure to use a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening the network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("entering the network namespace of pod {pod}: {source}")]
    Enter { pod: String, source: nix::Error },
    #[error("the netns thread is gone")]
    Gone,
    #[error("{what} in the network namespace of pod {pod}: {source}")]
    Io {
        what: &'static str,
        pod: String,
        source: std::io::Error,
    },
}

/// A pod's network namespace, held open (the kernel keeps it while this
/// lives).
pub struct PodNs {
    file: File,
    /// The netns's inode (`/proc/<pid>/ns/net` of its processes).
    pub inode: u64,
    /// The kernel's cookie of the netns (the capture programs' key).
    pub cookie: u64,
    /// The pod's UID, for logs and errors.
    pub pod: String,
    /// Cancelled when the agent stops serving the pod: what still runs for
    /// it (connections, pooled HBONE connections from it) ends then.
    pub gone: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for PodNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNs")
            .field("pod", &self.pod)
            .field("inode", &self.inode)
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl PodNs {
    /// Opens the netns at `path` (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path, pod: &str) -> Result<Self, NetnsError> {
        use std::os::unix::fs::MetadataExt as _;
        let open_err = |source| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let inode = file.metadata().map_err(open_err)?.ino();
        // NS_GET_NSTYPE tells a netns file from any other file.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: an ioctl without argument on a valid fd.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        let mut ns = Self {
            file,
            inode,
            cookie: 0,
            pod: pod.to_owned(),
            gone: Default::default(),
        };
        let pod = ns.pod.clone();
        ns.cookie = ns
            .run(|| {
                let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
                netns_cookie(&s)
            })?
            .map_err(|source| NetnsError::Io {
                what: "reading the netns cookie",
                pod,
                source,
            })?;
        Ok(ns)
    }

    /// The netns file (to attach programs to the netns).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Queues `job` for the netns thread, to run inside this netns; its
    /// result arrives on the receiver (which closes if the job could not
    /// run: entering the netns failed, which the thread logs).
    fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, NetnsError> {
        let fd = self
            .file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| NetnsError::Io {
                what: "duplicating the netns fd",
                pod: self.pod.clone(),
                source: e,
            })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        worker()?
            .send((fd, self.pod.clone(), job))
            .map_err(|_| NetnsError::Gone)?;
        Ok(rx)
    }

    fn not_entered(&self) -> NetnsError {
        NetnsError::Enter {
            pod: self.pod.clone(),
            source: nix::Error::EINVAL,
        }
    }

    /// Runs `job` on the netns thread, inside this netns, and waits for it
    /// (blocking: not for the runtime's threads).
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        self.submit(job)?
            .blocking_recv()
            .map_err(|_| self.not_entered())
    }

    /// Like [`PodNs::run`], awaited.
    pub async fn run_async<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        self.submit(job)?.await.map_err(|_| self.not_entered())
    }

    /// A TCP socket of `domain` made inside this netns, non-blocking.
    pub async fn tcp_socket(&self, domain: socket2::Domain) -> Result<socket2::Socket, NetnsError> {
        let pod = self.pod.clone();
        self.run_async(move || {
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .await?
        .map_err(|source| NetnsError::Io {
            what: "making a socket",
            pod,
            source,
        })
    }

    /// The addresses of this netns's interfaces.
    pub fn addresses(&self) -> Result<Vec<std::net::IpAddr>, NetnsError> {
        self.run(interface_addresses)
    }
}

/// The addresses of the calling thread's netns.
pub fn interface_addresses() -> Vec<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|a| {
                let s = a.address?;
                s.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// `SO_NETNS_COOKIE` of a socket: the cookie of the netns it lives in
/// (Linux >= 5.14).
pub fn netns_cookie(socket: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for an 8-byte option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

type Job = Box<dyn FnOnce() + Send>;

/// The netns thread's queue; started on first use.
fn worker() -> Result<&'static mpsc::Sender<(OwnedFd, String, Job)>, NetnsError> {
    static WORKER: OnceLock<Option<mpsc::Sender<(OwnedFd, String, Job)>>> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            let home = File::open("/proc/thread-self/ns/net").ok()?;
            let (tx, rx) = mpsc::channel::<(OwnedFd, String, Job)>();
            std::thread::Builder::new()
                .name("netns".into())
                .spawn(move || {
                    for (fd, pod, job) in rx {
                        if let Err(e) = nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                        {
                            tracing::warn!(pod, error = %e, "entering a pod's network namespace failed");
                            continue;
                        }
                        job();
                        if let Err(e) =
                            nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET)
                        {
                            // Every later socket would be made in the pod.
                            tracing::error!(error = %e, "the netns thread cannot return to the agent's network namespace; aborting");
                            crate::logsink::flush();
                            std::process::abort();
                        }
                    }
                })
                .ok()?;
            Some(tx)
        })
        .as_ref()
        .ok_or(NetnsError::Gone)
}

/// Shared handle: the agent's own netns ([`Net::Host`]) or a pod's.
#[derive(Clone, Debug, Default)]
pub enum Net {
    #[default]
    Host,
    Pod(Arc<PodNs>),
}

impl Net {
    /// `work`, run until it ends or the pod is no longer served (then
    /// `work` is dropped: its sockets close, a relay's reset). The future
    /// holds `work` once: an `async fn` taking it would hold it twice (as
    /// its argument and as what it awaits), and a connection's task lives
    /// as long as its connection (bench/README.md "Memory after load").
    pub fn unless_gone<F: std::future::Future<Output = ()>>(&self, work: F) -> UnlessGone<F> {
        UnlessGone {
            work,
            gone: self.pod().map(|p| p.gone.clone().cancelled_owned()),
        }
    }

    /// The netns cookie of the pod; `None` for the agent's own netns.
    pub fn pod(&self) -> Option<&Arc<PodNs>> {
        match self {
            Net::Host => None,
            Net::Pod(p) => Some(p),
        }
    }

    /// An unconnected, non-blocking TCP socket for `dst`'s family, in this netns.
    pub async fn tcp_socket(&self, v6: bool) -> std::io::Result<tokio::net::TcpSocket> {
        match self {
            Net::Host => {
                if v6 {
                    tokio::net::TcpSocket::new_v6()
                } else {
                    tokio::net::TcpSocket::new_v4()
                }
            }
            Net::Pod(p) => {
                let domain = if v6 {
                    socket2::Domain::IPV6
                } else {
                    socket2::Domain::IPV4
                };
                let s = p.tcp_socket(domain).await.map_err(std::io::Error::other)?;
                Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Net::unless_gone`].
    pub struct UnlessGone<F> {
        #[pin]
        work: F,
        // `None` for the node's own netns, which is never gone.
        #[pin]
        gone: Option<tokio_util::sync::WaitForCancellationFutureOwned>,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for UnlessGone<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        if this.work.poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        if let Some(gone) = this.gone.as_pin_mut()
            && gone.poll(cx).is_ready()
        {
            tracing::debug!("the pod is no longer served; its connection is closed");
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future of `N` bytes that ends when told.
    async fn big<const N: usize>(done: tokio::sync::oneshot::Receiver<()>) {
        let pad = [0u8; N];
        let _ = done.await;
        std::hint::black_box(&pad);
    }

    #[test]
    fn a_connection_future_is_held_once() {
        // A connection's task lives as long as its connection: wrapping it
        // must not hold it twice (an `async fn` taking it would: 2 × N).
        let (_tx, rx) = tokio::sync::oneshot::channel();
        let work = big::<4096>(rx);
        let alone = std::mem::size_of_val(&work);
        let wrapped = std::mem::size_of_val(&Net::Host.unless_gone(work));
        assert!(
            wrapped <= alone + 128,
            "{wrapped} bytes wrapped, {alone} alone"
        );
    }

    #[tokio::test]
    async fn work_ends_it_or_the_pod_going_does() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(Net::Host.unless_gone(big::<8>(rx)));
        let _ = tx.send(());
        run.await.expect("ends with its work");

        // A pod's token cancelled: the work is dropped unfinished.
        let gone = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(UnlessGone {
            work: big::<8>(rx),
            gone: Some(gone.clone().cancelled_owned()),
        });
        gone.cancel();
        run.await.expect("ends when the pod is gone");
        assert!(tx.is_closed(), "the work was dropped");
    }
}
