//! Attestation: turns the facts the kernel recorded for a captured connect into
//! a description of the workload. The issue on workload identity extends this
//! with selectors and registration entries.
use enforcer_common::OrigDst;

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
