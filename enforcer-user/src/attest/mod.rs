//! Attestation: kernel facts → selectors → SPIFFE ID (DESIGN §1 step 2).
pub mod entries;
pub mod listeners;
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
    /// The kernel's mark of the process's last exec at its connect
    /// (`OrigDst::exec_mark`); `None` for facts read from `/proc` alone (a
    /// listener's owner), which have no moment to compare with.
    pub exec_mark: Option<u32>,
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
            exec_mark: Some(rec.exec_mark),
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

/// The workloads `/status` lists at most (the most recently attested).
pub const MAX_WORKLOADS_SHOWN: usize = 256;

/// A workload attested on this node, as `/status` shows it: one per
/// selector set, with its last process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenWorkload {
    pub selectors: Vec<String>,
    pub spiffe_id: Option<SpiffeId>,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub cgroup: Option<String>,
    pub attestations: u64,
    pub last_attested: std::time::SystemTime,
}

/// The initial (host's) pid namespace, as `/proc/self/ns/pid` names it: its
/// inode number is fixed by the kernel (`PROC_PID_INIT_INO`).
const HOST_PID_NS: &str = "pid:[4026531836]";

/// A warning when this agent does not run in the host's pid namespace (`ns`:
/// the target of its `/proc/self/ns/pid`): the kernel programs record the
/// host's pids, which name other processes (or none) here, so `unix:path`
/// and `unix:sha256` are never attested (the process is not found in the
/// recorded cgroup) and entries that need them match nothing. Fails
/// closed; said once, at start.
pub fn pid_namespace_warning(ns: &str, entries: &[crate::config::EntryConfig]) -> Option<String> {
    if ns == HOST_PID_NS {
        return None;
    }
    let needing: Vec<&str> = entries
        .iter()
        .filter(|e| {
            e.selectors
                .iter()
                .any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:"))
        })
        .map(|e| e.spiffe_id.as_str())
        .collect();
    Some(format!(
        "this agent runs in a pid namespace of its own ({ns}), but the kernel records the host's pids: \
         no workload gets unix:path or unix:sha256 selectors{}; run the agent in the host's pid namespace \
         (hostPID: true in Kubernetes)",
        if needing.is_empty() {
            String::new()
        } else {
            format!(", so these entries match nothing: {}", needing.join(", "))
        }
    ))
}

/// Whether `selectors` are those of a workload in a pod that the
/// Kubernetes API has not shown (no `k8s:ns` beside its `k8s:pod-uid`).
pub fn unknown_pod(selectors: &[String]) -> bool {
    selectors.iter().any(|s| s.starts_with("k8s:pod-uid:"))
        && !selectors.iter().any(|s| s.starts_with("k8s:ns:"))
}

/// An attestation that waits for its executable's digest, which another
/// attestation is hashing ([`Attestor::attest_unless_hashing`]).
#[derive(Debug)]
pub struct Pending {
    facts: WorkloadFacts,
    selectors: selectors::AwaitingDigest,
}

impl Pending {
    /// The attestation, once the digest is known; the task waits without
    /// holding a thread.
    pub async fn finish(self, attestor: &Attestor) -> Attestation {
        let selectors = self.selectors.selectors().await;
        attestor.identified(self.facts, selectors)
    }

    /// The same, the calling thread blocked meanwhile.
    fn finish_blocking(self, attestor: &Attestor) -> Attestation {
        let selectors = self.selectors.blocking();
        attestor.identified(self.facts, selectors)
    }
}

/// Attests workloads against the registration entries in force; the entries
/// can be replaced at run time (config reload).
pub struct Attestor {
    entries: RwLock<Arc<Entries>>,
    cache: SelectorCache,
    /// The workloads attested lately, by selector set (bounded).
    seen: std::sync::Mutex<lru::LruCache<Vec<String>, SeenWorkload>>,
    /// This node's pods (`[kubernetes]`) and the trust domain of the
    /// identities it gives pods that no entry names.
    pods: std::sync::OnceLock<PodSource>,
}

/// Where pods' metadata comes from, for [`Attestor::set_pods`].
struct PodSource {
    pods: Arc<crate::k8s::Pods>,
    /// The kubelet's pod cgroups (`kubernetes.pods_cgroup`).
    roots: Vec<String>,
}

/// Whether `path` is `root` or below it (whole components).
fn under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl Attestor {
    pub fn new(entries: Entries) -> Self {
        Self {
            entries: RwLock::new(Arc::new(entries)),
            cache: SelectorCache::default(),
            seen: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_WORKLOADS_SHOWN)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            pods: std::sync::OnceLock::new(),
        }
    }

    /// Gives the attestations the kernel's exec marks (`ENF_EXECS`): set
    /// once the kernel programs are attached. Until then, and if never, a
    /// connection's executable is not attested (fail closed).
    pub fn set_exec_marks(&self, marks: selectors::ExecMarks) {
        self.cache.set_exec_marks(marks);
    }

    /// Attests workloads in pods with the pods' metadata from the API
    /// (once, at start).
    pub fn set_pods(&self, pods: Arc<crate::k8s::Pods>, roots: &[String]) {
        let _ = self.pods.set(PodSource {
            pods,
            roots: roots.to_vec(),
        });
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

    /// Attests a workload on this thread (blocking: `/proc` reads, its
    /// executable's hash, or the wait for another attestation's hash).
    pub fn attest(&self, facts: WorkloadFacts) -> Attestation {
        self.attest_unless_hashing(facts)
            .unwrap_or_else(|pending| pending.finish_blocking(self))
    }

    /// Like [`Attestor::attest`], but when another attestation is hashing
    /// the workload's executable, returns at once: [`Pending::finish`]
    /// waits for that digest as a task, holding no thread.
    pub fn attest_unless_hashing(&self, facts: WorkloadFacts) -> Result<Attestation, Pending> {
        match selectors::selectors_unless_hashing(&facts, &self.cache) {
            Ok(selectors) => Ok(self.identified(facts, selectors)),
            Err(selectors) => Err(Pending { facts, selectors }),
        }
    }

    /// The identity the entries (or the pod) give to `selectors`; no I/O.
    fn identified(&self, facts: WorkloadFacts, mut selectors: Vec<String>) -> Attestation {
        let spiffe_id = match self.pod_of(facts.cgroup_path.as_deref(), &mut selectors) {
            // A pod the API has not shown: no identity (fail closed).
            Some(None) => None,
            Some(Some(fallback)) => self
                .entries()
                .identify(&selectors)
                .cloned()
                .or(Some(fallback)),
            None => self.entries().identify(&selectors).cloned(),
        };
        self.note(&facts, &selectors, spiffe_id.as_ref());
        Attestation {
            facts,
            selectors,
            spiffe_id,
        }
    }
}

impl Attestor {
    /// For a workload in a pod (`k8s:pod-uid` among its selectors) with
    /// `[kubernetes]` on: the pod's selectors added, and `Some(Some(id))`,
    /// the pod's `spiffe://<td>/ns/<ns>/sa/<sa>`, or `Some(None)` for a pod
    /// the API has not shown or a cgroup outside the kubelet's that names a
    /// pod. `None` otherwise.
    fn pod_of(
        &self,
        cgroup: Option<&str>,
        selectors: &mut Vec<String>,
    ) -> Option<Option<SpiffeId>> {
        let PodSource { pods, roots } = self.pods.get()?;
        let uid = selectors
            .iter()
            .find_map(|s| s.strip_prefix("k8s:pod-uid:"))?
            .to_owned();
        if !cgroup.is_some_and(|c| roots.iter().any(|r| under(c, r))) {
            // A cgroup that claims a pod from outside the kubelet's.
            return Some(None);
        }
        let container = selectors
            .iter()
            .find_map(|s| s.strip_prefix("container:id:"))
            .map(str::to_owned);
        match pods.lookup(&uid) {
            crate::k8s::Lookup::Unknown => Some(None),
            crate::k8s::Lookup::Known(pod) => {
                selectors.extend(pod.selectors(container.as_deref()).cloned());
                Some(pod.spiffe_id.clone())
            }
        }
    }

    /// Remembers an attestation for `/status`. Runs for every outbound
    /// connection: a workload seen before costs no allocation unless its
    /// facts changed.
    fn note(&self, facts: &WorkloadFacts, selectors: &[String], id: Option<&SpiffeId>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        match seen.get_mut(selectors) {
            Some(w) => {
                if w.spiffe_id.as_ref() != id {
                    w.spiffe_id = id.cloned();
                }
                w.pid = facts.pid;
                w.uid = facts.uid;
                if w.comm != facts.comm {
                    w.comm.clone_from(&facts.comm);
                }
                if w.cgroup != facts.cgroup_path {
                    w.cgroup.clone_from(&facts.cgroup_path);
                }
                w.attestations += 1;
                w.last_attested = now;
            }
            None => {
                seen.put(
                    selectors.to_vec(),
                    SeenWorkload {
                        selectors: selectors.to_vec(),
                        spiffe_id: id.cloned(),
                        pid: facts.pid,
                        uid: facts.uid,
                        comm: facts.comm.clone(),
                        cgroup: facts.cgroup_path.clone(),
                        attestations: 1,
                        last_attested: now,
                    },
                );
            }
        }
    }

    /// The workloads attested lately, most recent first.
    pub fn seen(&self) -> Vec<SeenWorkload> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().map(|(_, w)| w.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_in_a_pid_namespace_of_its_own_says_which_entries_cannot_match() {
        let entries = [
            crate::config::EntryConfig {
                spiffe_id: "spiffe://td/hashed".into(),
                selectors: vec!["unix:sha256:ab".into(), "unix:uid:0".into()],
            },
            crate::config::EntryConfig {
                spiffe_id: "spiffe://td/unit".into(),
                selectors: vec!["systemd:unit:a.service".into()],
            },
        ];
        assert_eq!(pid_namespace_warning(HOST_PID_NS, &entries), None);
        let w = pid_namespace_warning("pid:[4026532999]", &entries).expect("a warning");
        assert!(
            w.contains("pid:[4026532999]") && w.contains("spiffe://td/hashed"),
            "{w}"
        );
        assert!(!w.contains("spiffe://td/unit"), "{w}");
    }

    #[test]
    fn under_matches_whole_components() {
        assert!(under(
            "/kubepods.slice/kubepods-pod1.slice",
            "/kubepods.slice"
        ));
        assert!(under("/kubepods.slice", "/kubepods.slice/"));
        assert!(!under("/kubepods.slice-evil/x", "/kubepods.slice"));
        assert!(!under("/user.slice/kubepods.slice/x", "/kubepods.slice"));
    }

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
