//! Attestation: kernel facts → selectors → SPIFFE ID (DESIGN §1 step 2).
pub mod entries;
pub mod local;
pub mod selectors;

use std::sync::{Arc, RwLock};

use enforcer_common::OrigDst;
use spiffe::SpiffeId;

pub use entries::{Entries, EntryConfig, EntryError};
use selectors::SelectorCache;

/// What the kernel vouches for about the process behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadFacts {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 mount, when it could be resolved.
    pub cgroup_path: Option<String>,
    pub comm: String,
    pub netns_cookie: u64,
}

impl WorkloadFacts {
    pub fn from_record(rec: &OrigDst, cgroup_path: Option<String>) -> Self {
        let end = rec
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(rec.comm.len());
        Self {
            pid: rec.tgid,
            tid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            cgroup_id: rec.cgroup_id,
            cgroup_path,
            comm: String::from_utf8_lossy(&rec.comm[..end]).into_owned(),
            netns_cookie: rec.netns_cookie,
        }
    }
}

/// The result of attesting a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    pub facts: WorkloadFacts,
    pub selectors: Vec<String>,
    /// `None`: no registration entry matched; the workload has no identity.
    pub spiffe_id: Option<SpiffeId>,
}

/// Attests workloads against the registration entries in force; the entries
/// can be replaced at run time (config reload).
pub struct Attestor {
    entries: RwLock<Arc<Entries>>,
    cache: SelectorCache,
}

impl Attestor {
    pub fn new(entries: Entries) -> Self {
        Self {
            entries: RwLock::new(Arc::new(entries)),
            cache: SelectorCache::default(),
        }
    }

    pub fn set_entries(&self, entries: Entries) {
        match self.entries.write() {
            Ok(mut e) => *e = Arc::new(entries),
            Err(p) => *p.into_inner() = Arc::new(entries),
        }
    }

    pub fn entries(&self) -> Arc<Entries> {
        match self.entries.read() {
            Ok(e) => e.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn attest(&self, facts: WorkloadFacts) -> Attestation {
        let selectors = selectors::selectors(&facts, &self.cache);
        let spiffe_id = self.entries().identify(&selectors).cloned();
        Attestation {
            facts,
            selectors,
            spiffe_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_trimmed_at_nul_and_pid_is_the_tgid() {
        let mut rec = OrigDst {
            pid: 11,
            tgid: 10,
            ..Default::default()
        };
        rec.comm[..4].copy_from_slice(b"curl");
        let f = WorkloadFacts::from_record(&rec, None);
        assert_eq!(f.comm, "curl");
        assert_eq!((f.pid, f.tid), (10, 11));
    }
}
