//! Attestation of a local destination: the process behind the listening
//! socket the kernel would hand a connection to `ip:port` — the same socket
//! the agent then connects to — found from the listening sockets' table
//! ([`super::listeners`]) and the socket inodes under `/proc/<pid>/fd`.
//!
//! The kernel prefers a listener bound to the exact address over a wildcard
//! one, and an IPv4 socket over a dual-stack IPv6 one; a `SO_REUSEPORT` group
//! spreads connections over all its members. So a process that listens on
//! `127.0.0.1:P` is never taken for the server on `10.0.0.2:P`, and a group
//! (or a socket held by several processes) is accepted only when every
//! process in it has the same identity.
//!
//! Cost: the listener table is re-read at most every [`TABLE_TTL`] (an
//! address nobody listens on is answered from it, with no `/proc/*/fd`
//! scan); owners are cached per socket inode while their processes live; the
//! blocking reads run on the blocking pool, never on the runtime threads.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Attestation, Attestor, WorkloadFacts, selectors::proc_cgroup};

/// How stale the listener table (and an answer from it) may be.
pub const TABLE_TTL: Duration = Duration::from_millis(250);
/// A destination missing from the table re-reads it when it is older than
/// this: a server that has just started listening is found at once, and
/// connections to a port nobody listens on cost at most one read per
/// interval.
pub const MISS_REREAD: Duration = Duration::from_millis(20);
/// How long the owners of a listening socket are trusted without a rescan
/// (as long as they are alive).
const OWNER_TTL: Duration = Duration::from_secs(2);

/// Why no workload could be attested for a local address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("no process listens on {0}")]
    NoListener(SocketAddr),
    #[error("the socket listening on {0} is held by no live process")]
    NoOwner(SocketAddr),
    #[error(
        "the listeners the kernel may choose for {addr} belong to workloads of different identities ({ids}); refusing to pick one"
    )]
    Ambiguous { addr: SocketAddr, ids: String },
    #[error("attesting {0} failed: {1}")]
    Internal(SocketAddr, String),
}

pub use super::listeners::Listener;

/// Listening TCP sockets (IPv4 and IPv6) of the agent's netns.
pub fn listeners() -> Vec<Listener> {
    super::listeners::listening("/proc/self/net")
}

/// Listening TCP sockets (IPv4 and IPv6) of `net`: the agent's netns, or a
/// pod's (asked on the netns thread, inside the pod; nothing when that
/// fails, which attests no workload).
pub fn listeners_in(net: &crate::netns::Net) -> Vec<Listener> {
    match net.pod() {
        None => listeners(),
        Some(pod) => pod
            .run(|| super::listeners::listening("/proc/thread-self/net"))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading a pod's listening sockets failed");
                Vec::new()
            }),
    }
}

/// The listeners among `all` that the kernel may hand a new connection to
/// `dst` (more than one: a `SO_REUSEPORT` group). Empty: nobody listens.
pub fn chosen(all: &[Listener], dst: SocketAddr) -> Vec<Listener> {
    let on_port = all.iter().filter(|l| l.addr.port() == dst.port());
    let (mut exact4, mut exact6, mut any4, mut any6) = (vec![], vec![], vec![], vec![]);
    for l in on_port {
        match (l.addr.ip(), dst.ip().to_canonical()) {
            (IpAddr::V4(a), IpAddr::V4(d)) if a == d => exact4.push(*l),
            (IpAddr::V4(a), IpAddr::V4(_)) if a.is_unspecified() => any4.push(*l),
            (IpAddr::V6(a), d) if IpAddr::V6(a).to_canonical() == d && !a.is_unspecified() => {
                exact6.push(*l)
            }
            (IpAddr::V6(a), _) if a.is_unspecified() => any6.push(*l),
            _ => {}
        }
    }
    // Specific address first, then wildcard; IPv4 sockets win over IPv6
    // ones for an IPv4 destination (a higher score in the kernel's lookup).
    let v4_dst = dst.ip().to_canonical().is_ipv4();
    let order: [Vec<Listener>; 4] = if v4_dst {
        [exact4, exact6, any4, any6]
    } else {
        [exact6, vec![], any6, vec![]]
    };
    order
        .into_iter()
        .find(|c| !c.is_empty())
        .unwrap_or_default()
}

/// Processes holding a socket inode, by scanning `/proc/<pid>/fd`. pid 1
/// (systemd passing a socket-activated listener) is left out when another
/// process holds it too.
pub fn holders_of_inode(inode: u64) -> Vec<u32> {
    let needle = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .map(|l| l.as_os_str() == needle.as_str())
                .unwrap_or(false)
        }) {
            out.push(pid);
        }
    }
    if out.len() > 1 {
        out.retain(|p| *p != 1);
    }
    out
}

/// Kernel facts about a live process from `/proc/<pid>`.
pub fn facts_of_pid(pid: u32) -> Option<WorkloadFacts> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default();
    Some(WorkloadFacts {
        pid,
        tid: pid,
        uid: field("Uid:")?,
        gid: field("Gid:")?,
        cgroup_id: 0,
        cgroup_path: proc_cgroup(pid),
        comm,
        exec_mark: None,
        netns_cookie: 0,
    })
}

/// The first of `all` (not empty) when every one has the same SPIFFE ID: the
/// members of a `SO_REUSEPORT` group, or the processes holding one socket.
fn agree(addr: SocketAddr, mut all: Vec<Attestation>) -> Answer {
    if all.iter().all(|a| a.spiffe_id == all[0].spiffe_id) {
        return Ok(all.swap_remove(0));
    }
    let ids = all
        .iter()
        .map(|a| match &a.spiffe_id {
            Some(id) => format!("pid {}: {id}", a.facts.pid),
            None => format!("pid {}: none", a.facts.pid),
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(LocalError::Ambiguous { addr, ids })
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

type Answer = Result<Attestation, LocalError>;

/// Attests local destinations by address; see the module documentation.
#[derive(Default)]
pub struct LocalAttestor {
    /// Whose listeners: the agent's netns, or a pod's.
    net: crate::netns::Net,
    /// The socket inodes of the agent's own listeners in that netns.
    own: Vec<u64>,
    table: Mutex<Option<(Instant, Arc<Vec<Listener>>)>>,
    /// Socket inode -> when attested, and the attestation of its holders.
    owners: Mutex<HashMap<u64, (Instant, Answer)>>,
    /// Recent answers per address, served without leaving the runtime thread.
    recent: Mutex<HashMap<SocketAddr, (Instant, Answer)>>,
    /// One lookup on the blocking pool at a time: when the recent answers
    /// expire under a high connection rate, the connections that miss wait
    /// (as tasks, holding no thread) for the one lookup under way and take
    /// its answer, instead of each taking a blocking thread to repeat it
    /// (the soak saw b's blocking pool at its 512 threads).
    lookup: tokio::sync::Mutex<()>,
}

impl LocalAttestor {
    /// Attests the workloads listening in `net`, where the agent's own
    /// listeners are the sockets `own` (inodes).
    pub fn new(net: crate::netns::Net, own: Vec<u64>) -> Self {
        Self {
            net,
            own,
            ..Default::default()
        }
    }

    /// The attestation of the workload that a connection to `dst` reaches
    /// (port 0: the workload that owns the address, see
    /// [`LocalAttestor::attest_blocking`]). Blocking work runs on the
    /// blocking pool.
    pub async fn attest(self: &Arc<Self>, attestor: &Arc<Attestor>, dst: SocketAddr) -> Answer {
        if let Some(hit) = self.recent(dst) {
            return hit;
        }
        let _one = self.lookup.lock().await;
        // Answered while this one waited?
        if let Some(hit) = self.recent(dst) {
            return hit;
        }
        let (this, attestor) = (self.clone(), attestor.clone());
        tokio::task::spawn_blocking(move || this.attest_blocking(&attestor, dst))
            .await
            .unwrap_or_else(|e| Err(LocalError::Internal(dst, e.to_string())))
    }

    /// An answer for `dst` from the last [`TABLE_TTL`], if there is one, and
    /// only while the workload it names still lives (one procfs `stat`): a
    /// server that exits and a process that binds its port at once never
    /// borrow its identity from the cache.
    pub fn recent(&self, dst: SocketAddr) -> Option<Answer> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // "Nobody listens" is not reused: the listener may have just come.
        let usable = |a: &Answer| match a {
            Ok(a) => alive(a.facts.pid),
            Err(LocalError::NoListener(_)) => false,
            Err(_) => true,
        };
        match recent.get(&dst) {
            Some((at, a)) if at.elapsed() < TABLE_TTL && usable(a) => Some(a.clone()),
            _ => None,
        }
    }

    /// Like [`LocalAttestor::attest`], on the calling thread (blocking).
    /// Port 0 asks for the workload that owns the address itself (every
    /// listener on it, any port: [`LocalAttestor::address_blocking`]).
    pub fn attest_blocking(&self, attestor: &Attestor, dst: SocketAddr) -> Answer {
        let answer = if dst.port() == 0 {
            self.address_blocking(attestor, dst.ip())
        } else {
            self.listener_blocking(attestor, dst)
        };
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() > 4096 {
            recent.retain(|_, (at, _)| at.elapsed() < TABLE_TTL);
        }
        recent.insert(dst, (Instant::now(), answer.clone()));
        answer
    }

    /// The owners of the listeners the kernel may pick for `dst`, when they
    /// agree on one identity.
    fn listener_blocking(&self, attestor: &Attestor, dst: SocketAddr) -> Answer {
        let mut group = chosen(&self.table(TABLE_TTL), dst);
        if group.is_empty() {
            group = chosen(&self.table(MISS_REREAD), dst);
        }
        if group.is_empty() {
            return Err(LocalError::NoListener(dst));
        }
        group
            .iter()
            .map(|l| self.owner(attestor, l.inode, dst))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|all| agree(dst, all))
    }

    /// The workload that owns address `ip` — every listener the kernel
    /// may pick for a connection to `ip` on any port, the agent's own left
    /// out — when all of them have one identity (a pod's address, for an
    /// HBONE client that names no port: ztunnel's).
    fn address_blocking(&self, attestor: &Attestor, ip: IpAddr) -> Answer {
        let key = SocketAddr::new(ip, 0);
        let table = self.table(MISS_REREAD);
        let mut ports: Vec<u16> = table.iter().map(|l| l.addr.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        let mut all = Vec::new();
        for port in ports {
            let dst = SocketAddr::new(ip, port);
            // The agent's own listeners (15001, 15006, 15008) are not the pod's.
            for l in chosen(&table, dst)
                .into_iter()
                .filter(|l| !self.own.contains(&l.inode))
            {
                all.push(self.owner(attestor, l.inode, dst)?);
            }
        }
        if all.is_empty() {
            return Err(LocalError::NoListener(key));
        }
        agree(key, all)
    }

    /// The listener table, re-read when older than `max_age`.
    fn table(&self, max_age: Duration) -> Arc<Vec<Listener>> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match &*t {
            Some((at, table)) if at.elapsed() < max_age => table.clone(),
            _ => {
                let table = Arc::new(listeners_in(&self.net));
                *t = Some((Instant::now(), table.clone()));
                table
            }
        }
    }

    /// The attestation of the processes holding socket `inode`.
    fn owner(&self, attestor: &Attestor, inode: u64, dst: SocketAddr) -> Answer {
        if let Some((at, a)) = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&inode)
            && at.elapsed() < OWNER_TTL
            && a.as_ref().is_ok_and(|a| alive(a.facts.pid))
        {
            return a.clone();
        }
        let holders: Vec<Attestation> = holders_of_inode(inode)
            .into_iter()
            .filter_map(facts_of_pid)
            .map(|f| attestor.attest(f))
            .collect();
        let answer = if holders.is_empty() {
            Err(LocalError::NoOwner(dst))
        } else {
            agree(dst, holders)
        };
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if owners.len() > 4096 {
            owners.retain(|_, (at, _)| at.elapsed() < OWNER_TTL);
        }
        owners.insert(inode, (Instant::now(), answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::super::listeners::l;
    use super::*;

    #[test]
    fn kernel_choice_of_listener() {
        let table = [
            l("127.0.0.1:8080", 1),
            l("10.0.0.2:8080", 2),
            l("0.0.0.0:9090", 3),
            l("[::]:9090", 4),
            l("[::]:7070", 5),
            l("10.0.0.2:6060", 6),
            l("10.0.0.2:6060", 7),
            l("[fd00::2]:5050", 8),
            l("[::]:5050", 9),
            l("[::ffff:10.0.0.2]:4040", 10),
            l("0.0.0.0:4040", 11),
        ];
        let pick = |dst: &str| -> Vec<u64> {
            chosen(&table, dst.parse().expect("dst"))
                .iter()
                .map(|l| l.inode)
                .collect()
        };
        // A squatter on loopback is not the server on the node address.
        assert_eq!(pick("10.0.0.2:8080"), [2]);
        assert_eq!(pick("127.0.0.1:8080"), [1]);
        assert_eq!(pick("10.0.0.9:8080"), Vec::<u64>::new());
        // IPv4 wildcard before the dual-stack one; IPv6 only the IPv6 one.
        assert_eq!(pick("10.0.0.2:9090"), [3]);
        assert_eq!(pick("[fd00::2]:9090"), [4]);
        assert_eq!(pick("10.0.0.2:7070"), [5]);
        assert_eq!(pick("[::ffff:10.0.0.2]:9090"), [3]);
        // A SO_REUSEPORT group: every member.
        assert_eq!(pick("10.0.0.2:6060"), [6, 7]);
        assert_eq!(pick("[fd00::2]:5050"), [8]);
        assert_eq!(pick("[fd00::3]:5050"), [9]);
        // A v4-mapped bound address is as specific as the IPv4 one.
        assert_eq!(pick("10.0.0.2:4040"), [10]);
        assert_eq!(pick("[::1]:8080"), Vec::<u64>::new());
    }

    #[test]
    fn listeners_of_different_identities_are_refused() {
        let att = |pid: u32, id: Option<&str>| Attestation {
            facts: facts_of_pid(std::process::id())
                .map(|f| WorkloadFacts { pid, ..f })
                .expect("facts"),
            selectors: vec![],
            spiffe_id: id.map(|i| spiffe::SpiffeId::new(i).expect("id")),
        };
        let dst: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let same = agree(
            dst,
            vec![att(1, Some("spiffe://t/a")), att(2, Some("spiffe://t/a"))],
        );
        assert_eq!(same.expect("agree").facts.pid, 1);
        let err = agree(dst, vec![att(1, Some("spiffe://t/a")), att(2, None)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the listeners the kernel may choose for 10.0.0.2:80 belong to workloads of different identities (pid 1: spiffe://t/a, pid 2: none); refusing to pick one"
        );
    }

    #[test]
    fn finds_the_owner_of_a_listening_socket() {
        let sock = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = sock.local_addr().expect("addr");
        let group = chosen(&listeners(), addr);
        assert_eq!(group.len(), 1, "listener {addr} not found");
        assert_eq!(holders_of_inode(group[0].inode), [std::process::id()]);
        let facts = facts_of_pid(std::process::id()).expect("facts");
        assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
        drop(sock);
        assert!(chosen(&listeners(), addr).is_empty());
    }

    #[test]
    fn a_server_that_just_started_listening_is_found_at_once() {
        // The port is free and its miss has just been answered (table and
        // answer fresh); the server then starts listening. Before, the stale
        // table and the cached "no listener" refused it for up to 250 ms.
        let attestor = Attestor::new(Default::default());
        let local = LocalAttestor::default();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        assert!(matches!(
            local.attest_blocking(&attestor, addr),
            Err(LocalError::NoListener(_))
        ));
        let sock = std::net::TcpListener::bind(addr).expect("rebind");
        std::thread::sleep(MISS_REREAD);
        assert!(local.recent(addr).is_none(), "a miss is not reused");
        let answer = local.attest_blocking(&attestor, addr);
        assert!(
            answer
                .as_ref()
                .is_ok_and(|a| a.facts.pid == std::process::id()),
            "{answer:?}"
        );
        drop(sock);
    }
}
