//! Attestation of a local destination: the process that owns the listening
//! socket for a port in this network namespace (from `/proc/net/tcp{,6}` and
//! the socket inodes under `/proc/<pid>/fd`).
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{Attestation, Attestor, WorkloadFacts, selectors::proc_cgroup};

const TCP_LISTEN: &str = "0A";
const CACHE_TTL: Duration = Duration::from_secs(2);

/// Inodes of listening TCP sockets on `port` (IPv4 and IPv6).
pub fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != TCP_LISTEN {
                continue;
            }
            let Some((_, p)) = f[1].rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port)
                && let Ok(inode) = f[9].parse::<u64>()
                && inode != 0
            {
                out.push(inode);
            }
        }
    }
    out
}

/// The process holding a socket inode, by scanning `/proc/<pid>/fd`.
pub fn owner_of_inode(inode: u64) -> Option<u32> {
    let needle = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
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
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path())
                .map(|l| l.as_os_str() == needle.as_str())
                .unwrap_or(false)
            {
                return Some(pid);
            }
        }
    }
    None
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
        netns_cookie: 0,
    })
}

/// Attests local destinations by port, with a short cache.
#[derive(Default)]
pub struct LocalAttestor {
    cache: Mutex<HashMap<u16, (Instant, Option<Attestation>)>>,
}

impl LocalAttestor {
    /// The attestation of the workload listening on `port`, or `None` when no
    /// process listens there.
    pub fn attest_port(&self, attestor: &Attestor, port: u16) -> Option<Attestation> {
        if let Some((at, a)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            && at.elapsed() < CACHE_TTL
            && a.as_ref()
                .is_none_or(|a| std::path::Path::new(&format!("/proc/{}", a.facts.pid)).exists())
        {
            return a.clone();
        }
        let found = listening_inodes(port)
            .into_iter()
            .find_map(owner_of_inode)
            .and_then(facts_of_pid)
            .map(|facts| attestor.attest(facts));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port, (Instant::now(), found.clone()));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_a_listening_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let inodes = listening_inodes(port);
        assert!(
            !inodes.is_empty(),
            "listener on {port} not found in /proc/net/tcp"
        );
        let pid = inodes.into_iter().find_map(owner_of_inode);
        assert_eq!(pid, Some(std::process::id()));
        let facts = facts_of_pid(std::process::id()).expect("facts");
        assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
        drop(l);
        assert!(listening_inodes(port).is_empty());
    }
}
