//! Kernel facts → selectors (`unix:uid:1000`, `systemd:unit:x.service`, …).
//!
//! Selectors come from what the kernel recorded at connect time (uid, gid,
//! cgroup) and from `/proc/<pid>` (executable path and digest), the latter only
//! after checking that the process still lives in the cgroup the kernel
//! recorded, so a recycled pid cannot lend its executable to another workload,
//! and that it has not exec'd since the connect (its exec mark), so a program
//! cannot connect and then exec a trusted executable to borrow its identity.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use sha2::{Digest as _, Sha256};
use tracing::warn;

use super::WorkloadFacts;

/// The cgroup path down to the cgroup of the unit or container the
/// workload belongs to: the first component, from the root, that is a
/// systemd unit (`.service`, `.scope`) or a container's (a 64-hex id); the
/// whole path when none is. What lies below that component the unit or
/// container made itself: systemd hands units with `Delegate=` a subtree of
/// their own (every user's manager, `user@<uid>.service`; container
/// runtimes), in which their unprivileged owners name cgroups as they like,
/// so no unit, pod or container is read from there.
pub fn owner_cgroup(cgroup_path: &str) -> &str {
    let mut end = 0;
    for comp in cgroup_path.split('/') {
        end += comp.len();
        if comp.ends_with(".service") || comp.ends_with(".scope") || is_container_id(comp) {
            return &cgroup_path[..end];
        }
        end += 1;
    }
    cgroup_path
}

/// Parses the container runtime facts out of a cgroup path (its
/// [`owner_cgroup`]): Kubernetes pod UID and container id for containerd,
/// CRI-O and Docker, with the systemd and the cgroupfs cgroup drivers.
pub fn container_selectors(cgroup_path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let owned = owner_cgroup(cgroup_path);
    for comp in owned.split('/') {
        // systemd driver: kubepods-burstable-pod<uid with _>.slice
        if let Some(rest) = comp.strip_suffix(".slice")
            && let Some(idx) = rest.rfind("-pod")
            && rest.starts_with("kubepods")
        {
            let uid = rest[idx + 4..].replace('_', "-");
            if is_uid(&uid) {
                out.push(format!("k8s:pod-uid:{uid}"));
            }
        }
        // cgroupfs driver: /kubepods/burstable/pod<uid>/<container id>
        if let Some(uid) = comp.strip_prefix("pod")
            && is_uid(uid)
            && owned.contains("kubepods")
        {
            out.push(format!("k8s:pod-uid:{uid}"));
        }
        // systemd driver: cri-containerd-<id>.scope, crio-<id>.scope, docker-<id>.scope
        if let Some(rest) = comp.strip_suffix(".scope") {
            for prefix in ["cri-containerd-", "crio-", "docker-", "containerd-"] {
                if let Some(id) = rest.strip_prefix(prefix)
                    && is_container_id(id)
                {
                    out.push(format!("container:id:{id}"));
                }
            }
        }
        // cgroupfs driver and plain Docker (/docker/<id>): a bare 64-hex component.
        if is_container_id(comp) {
            out.push(format!("container:id:{comp}"));
        }
    }
    out.dedup();
    out
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The systemd unit a cgroup path belongs to: the outermost `.service` or
/// `.scope` component (`/system.slice/llm.service` → `llm.service`), the
/// one systemd made — not one its processes made below it
/// (`/user.slice/user-1000.slice/user@1000.service/app.slice/llm.service`
/// is `user@1000.service`'s: [`owner_cgroup`]).
pub fn systemd_unit(cgroup_path: &str) -> Option<&str> {
    owner_cgroup(cgroup_path)
        .rsplit('/')
        .next()
        .filter(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

/// Names from an `/etc/passwd`-style file (files only; no NSS modules),
/// parsed once and parsed again only when the file's mtime changes.
pub struct IdNames {
    file: &'static str,
    table: Mutex<Option<(std::time::SystemTime, HashMap<u32, String>)>>,
}

impl IdNames {
    pub const fn new(file: &'static str) -> Self {
        Self {
            file,
            table: Mutex::new(None),
        }
    }

    fn lookup(&self, id: u32) -> Option<String> {
        let mtime = std::fs::metadata(self.file)
            .and_then(|m| m.modified())
            .ok()?;
        let mut table = self.table.lock().ok()?;
        if table.as_ref().is_none_or(|(at, _)| *at != mtime) {
            let text = std::fs::read_to_string(self.file).ok()?;
            let names = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let _pw = f.next()?;
                    Some((f.next()?.parse::<u32>().ok()?, name.to_owned()))
                })
                .collect();
            *table = Some((mtime, names));
        }
        table.as_ref()?.1.get(&id).cloned()
    }
}

/// What selector derivation keeps between connections.
pub struct SelectorCache {
    digests: DigestCache,
    users: IdNames,
    groups: IdNames,
    exec_marks: std::sync::OnceLock<ExecMarks>,
}

/// A process's exec mark now, as the kernel keeps it (thread group id ->
/// `OrigDst::exec_mark`'s value for its last exec; `None`: it cannot be
/// read).
pub type ExecMarks = Box<dyn Fn(u32) -> Option<u32> + Send + Sync>;

impl Default for SelectorCache {
    fn default() -> Self {
        Self {
            digests: DigestCache::default(),
            users: IdNames::new("/etc/passwd"),
            groups: IdNames::new("/etc/group"),
            exec_marks: std::sync::OnceLock::new(),
        }
    }
}

impl SelectorCache {
    pub fn set_exec_marks(&self, marks: ExecMarks) {
        let _ = self.exec_marks.set(marks);
    }

    /// Whether the process of `facts` has not exec'd (nor had its pid
    /// reused) since its connect, nor was in the middle of an exec when it
    /// connected: its exec mark now is the one the kernel recorded then,
    /// and that one was not drawn while an exec was under way. Asked after
    /// `/proc/<pid>/exe` was read, so a yes says that what was read is the
    /// executable that connected. Facts without a record have nothing to
    /// compare and pass; `None`: the marks cannot be read (no exec
    /// tracking, said at start), which proves nothing.
    fn same_exec(&self, facts: &WorkloadFacts) -> Option<bool> {
        let Some(recorded) = facts.exec_mark else {
            return Some(true);
        };
        let now = self.exec_marks.get().and_then(|now| now(facts.pid))?;
        Some(now == recorded && !enforcer_common::exec_under_way(recorded))
    }
}

/// Digests of executables, keyed by the file's device, inode, size, mtime
/// and ctime (to the nanosecond) so a file written again is hashed again;
/// the most recently used [`DigestCache::CAPACITY`] are kept (each
/// container's overlay mount is a device of its own, so the keys grow with
/// containers started).
///
/// A file's mtime is whatever its owner sets (`touch -d`), so it tells
/// nothing alone: an executable patched in place to the same size, its
/// mtime set back, kept the digest of what it had been — and the identity
/// given to that digest. Its ctime is set by the kernel, to the time, at
/// every write and every change of its times; but that time is the clock's
/// tick (milliseconds on kernels without fine-grained timestamps), so a
/// write in the same tick as the one before could leave it as it was. A
/// digest is therefore cached only when the file's ctime was
/// [`DigestCache::SETTLE`] old when the hash began: any later write has a
/// later ctime. A file written less than that ago is hashed at each
/// attestation.
///
/// One hash per executable at a time: the attestations of a new workload's
/// concurrent first connections wait for the one hashing its executable and
/// take its digest. Before, each hashed it again — 32 connects at once from
/// a 1 GiB executable were 32 GiB to read and hash, every blocking-pool
/// thread busy meanwhile, other workloads' new connections waiting. The
/// outbound path waits as a task ([`DigestWait::digest`]), holding no
/// blocking-pool thread, so a burst of connects from one new workload
/// leaves the pool to everyone else.
pub struct DigestCache {
    done: Mutex<lru::LruCache<DigestKey, String>>,
    running: Mutex<HashMap<DigestKey, Arc<Flight>>>,
    /// Executables hashed (not found in the cache) by this cache.
    hashed: AtomicU64,
    /// How old a file's ctime must be for its digest to be cached.
    settle: std::time::Duration,
}

/// A file's device and inode.
type FileId = (u64, u64);

/// A file as the kernel describes it: device, inode, size, mtime and ctime
/// (seconds, nanoseconds).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct DigestKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl DigestKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file's ctime is at least `settle` before `now`.
    fn settled(&self, settle: std::time::Duration, now: std::time::SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::new(secs, nanos))
            .and_then(|c| c.checked_add(settle))
            .is_some_and(|c| c <= now)
    }
}

/// One hash under way; its waiters are woken with its digest (`None`: the
/// executable could not be read): threads by `finished`, tasks by `notify`.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Option<String>>>,
    finished: Condvar,
    notify: tokio::sync::Notify,
}

impl Flight {
    fn result(&self) -> Option<Option<String>> {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A hash another attestation is running: [`DigestWait::digest`] (a task)
/// or [`DigestWait::blocking`] (a thread) gives its digest when it ends.
pub struct DigestWait(Arc<Flight>);

impl std::fmt::Debug for DigestWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestWait")
    }
}

impl DigestWait {
    /// The digest, once the attestation hashing it is through; the task
    /// waits without holding a thread.
    pub async fn digest(self) -> Option<String> {
        loop {
            let notified = self.0.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check: an end between the two wakes it.
            notified.as_mut().enable();
            if let Some(r) = self.0.result() {
                return r;
            }
            notified.await;
        }
    }

    /// The digest, the calling thread blocked until the hash is through.
    pub fn blocking(self) -> Option<String> {
        let mut result = self.0.result.lock().unwrap_or_else(|p| p.into_inner());
        while result.is_none() {
            result = self
                .0
                .finished
                .wait(result)
                .unwrap_or_else(|p| p.into_inner());
        }
        result.clone().flatten()
    }
}

/// What [`DigestCache::begin`] found.
enum Begun<'a> {
    /// Known (or unreadable: `None`).
    Known(Option<String>),
    /// This caller hashes it: the file opened, whose own metadata is the key.
    Hash(Finish<'a>, std::fs::File),
    /// Another caller is hashing it.
    Wait(DigestWait),
}

/// Ends a flight however its hash ends (a panic included): the digest
/// cached, the waiters answered, the flight gone.
struct Finish<'a> {
    cache: &'a DigestCache,
    key: DigestKey,
    /// The file had not changed for [`DigestCache::settle`] when the hash
    /// began: its digest may be cached.
    settled: bool,
    flight: Arc<Flight>,
    digest: Option<String>,
}

impl Finish<'_> {
    fn hash(mut self, file: std::fs::File) -> Option<String> {
        self.cache.hashed.fetch_add(1, Ordering::Relaxed);
        HASHED.fetch_add(1, Ordering::Relaxed);
        self.digest = hash_open(file);
        self.digest.clone()
    }
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.digest.as_ref().filter(|_| self.settled) {
            let mut done = self.cache.done.lock().unwrap_or_else(|p| p.into_inner());
            done.put(self.key, d.clone());
        }
        self.cache
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        *self.flight.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.digest.take());
        self.flight.finished.notify_all();
        self.flight.notify.notify_waiters();
    }
}

impl Default for DigestCache {
    fn default() -> Self {
        Self::settled_after(Self::SETTLE)
    }
}

/// Executables hashed by every cache of the agent
/// (`enforcer_executable_hashes_total`).
static HASHED: AtomicU64 = AtomicU64::new(0);

/// Connections whose process exec'd after its connect
/// (`enforcer_execs_after_connect_total`).
static EXECS_AFTER_CONNECT: AtomicU64 = AtomicU64::new(0);

/// Connections attested without their executable since start: their process
/// exec'd (or its pid was reused) after the connect.
pub fn execs_after_connect() -> u64 {
    EXECS_AFTER_CONNECT.load(Ordering::Relaxed)
}

/// Executables hashed since start, by every [`DigestCache`].
pub fn executables_hashed() -> u64 {
    HASHED.load(Ordering::Relaxed)
}

impl DigestCache {
    pub const CAPACITY: std::num::NonZeroUsize = std::num::NonZeroUsize::new(1024).unwrap();
    /// How long a file must have gone unchanged (its ctime) for its digest
    /// to be cached: far above the clock's tick.
    pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

    /// A cache of digests of files unchanged for `settle`.
    fn settled_after(settle: std::time::Duration) -> Self {
        Self {
            done: Mutex::new(lru::LruCache::new(Self::CAPACITY)),
            running: Mutex::default(),
            hashed: AtomicU64::new(0),
            settle,
        }
    }

    fn cached(&self, key: &DigestKey) -> Option<String> {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.get(key).cloned()
    }

    /// The digest of `exe`, hashed on this thread unless it is cached or
    /// another caller hashes it now (then this thread waits for that one).
    #[cfg(test)]
    fn sha256_of(&self, exe: &Path) -> Option<String> {
        match self.sha256_unless_hashing(exe).1 {
            Ok(d) => d,
            Err(wait) => wait.blocking(),
        }
    }

    /// Like [`DigestCache::sha256_of`], but when another caller is hashing
    /// `exe`, returns at once with what waits for its digest; with the file
    /// opened (device, inode; `None` when it could not be opened).
    fn sha256_unless_hashing(
        &self,
        exe: &Path,
    ) -> (Option<FileId>, Result<Option<String>, DigestWait>) {
        let (file, begun) = self.begin(exe);
        let digest = match begun {
            Begun::Known(d) => Ok(d),
            Begun::Hash(finish, file) => Ok(finish.hash(file)),
            Begun::Wait(wait) => Err(wait),
        };
        (file, digest)
    }

    /// The key is the metadata of the file opened, and a hash reads that
    /// open file: through `/proc/<pid>/exe`, a process that execs between
    /// a `stat` and an `open` of the path would have had one executable's
    /// digest cached under another's key. Also the file's device and inode.
    fn begin(&self, exe: &Path) -> (Option<FileId>, Begun<'_>) {
        let Ok(file) = std::fs::File::open(exe) else {
            return (None, Begun::Known(None));
        };
        let Ok(meta) = file.metadata() else {
            return (None, Begun::Known(None));
        };
        let key = DigestKey::of(&meta);
        (Some((key.dev, key.ino)), self.begin_with(key, file))
    }

    fn begin_with(&self, key: DigestKey, file: std::fs::File) -> Begun<'_> {
        let settled = key.settled(self.settle, std::time::SystemTime::now());
        if let Some(d) = self.cached(&key) {
            return Begun::Known(Some(d));
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // Hashed while this one took the lock?
        if let Some(d) = self.cached(&key) {
            return Begun::Known(Some(d));
        }
        if let Some(f) = running.get(&key) {
            return Begun::Wait(DigestWait(f.clone()));
        }
        let flight = Arc::new(Flight::default());
        running.insert(key, flight.clone());
        Begun::Hash(
            Finish {
                cache: self,
                key,
                settled,
                flight,
                digest: None,
            },
            file,
        )
    }
}

/// The SHA-256 of an open file's contents, hex; `None` when it cannot be
/// read.
fn hash_open(mut file: std::fs::File) -> Option<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}

/// The same, of the file at `path`.
#[cfg(test)]
fn hash_file(path: &Path) -> Option<String> {
    hash_open(std::fs::File::open(path).ok()?)
}

/// The cgroup v2 path of a live process, from `/proc/<pid>/cgroup` (`0::/path`).
pub fn proc_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The cgroup v2 id (inode number of the cgroup directory) of this process,
/// given the cgroup2 mount point. The kernel programs compare it with the
/// caller's cgroup id.
pub fn own_cgroup_id(mount: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let rel = proc_cgroup(std::process::id())
        .ok_or_else(|| std::io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))?;
    let path = mount.join(rel.trim_start_matches('/'));
    Ok(std::fs::metadata(&path)?.ino())
}

/// Selectors for a workload. `exe` facts are included only when `/proc/<pid>`
/// still belongs to the recorded cgroup. Blocks while another attestation
/// hashes the same executable.
pub fn selectors(facts: &WorkloadFacts, cache: &SelectorCache) -> Vec<String> {
    match selectors_unless_hashing(facts, cache) {
        Ok(out) => out,
        Err(pending) => pending.blocking(),
    }
}

/// A workload's selectors but its executable's digest, which another
/// attestation is hashing now.
#[derive(Debug)]
pub struct AwaitingDigest {
    selectors: Vec<String>,
    wait: DigestWait,
}

impl AwaitingDigest {
    /// The selectors, the digest added once it is known; the task waits
    /// without holding a thread.
    pub async fn selectors(self) -> Vec<String> {
        let digest = self.wait.digest().await;
        with_digest(self.selectors, digest)
    }

    /// The same, the calling thread blocked meanwhile.
    pub fn blocking(self) -> Vec<String> {
        let digest = self.wait.blocking();
        with_digest(self.selectors, digest)
    }
}

/// Like [`selectors`], but when another attestation is hashing the
/// workload's executable, returns at once with the rest, to wait for that
/// digest elsewhere.
pub fn selectors_unless_hashing(
    facts: &WorkloadFacts,
    cache: &SelectorCache,
) -> Result<Vec<String>, AwaitingDigest> {
    let mut out = vec![
        format!("unix:uid:{}", facts.uid),
        format!("unix:gid:{}", facts.gid),
    ];
    if let Some(user) = cache.users.lookup(facts.uid) {
        out.push(format!("unix:user:{user}"));
    }
    if let Some(group) = cache.groups.lookup(facts.gid) {
        out.push(format!("unix:group:{group}"));
    }
    let mut digest = None;
    if let Some(cg) = &facts.cgroup_path {
        out.push(format!("cgroup:path:{cg}"));
        if let Some(unit) = systemd_unit(cg) {
            out.push(format!("systemd:unit:{unit}"));
        }
        out.extend(container_selectors(cg));
        if proc_cgroup(facts.pid).as_deref() == Some(cg.as_str())
            && let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", facts.pid))
        {
            // Hash through /proc/<pid>/exe: the very file the process runs,
            // even when the path was replaced since.
            let live: PathBuf = format!("/proc/{}/exe", facts.pid).into();
            let (file, hashed) = cache.digests.sha256_unless_hashing(&live);
            let path_is_its_own = file.is_some_and(|f| names_the_file(&exe, f));
            // Read after the executable was: if the process exec'd since it
            // connected (a program that connects, writes its request and
            // execs a trusted executable), what was read is not what
            // connected, and no executable is attested.
            match cache.same_exec(facts) {
                Some(true) => {}
                Some(false) => {
                    EXECS_AFTER_CONNECT.fetch_add(1, Ordering::Relaxed);
                    warn!(pid = facts.pid, comm = %facts.comm, exe = %exe.display(),
                        "the workload exec'd (or its pid was reused) after it connected, or connected while an exec was replacing it: its executable is not attested for this connection (no unix:path, unix:sha256)");
                    return Ok(with_digest(out, None));
                }
                None => return Ok(with_digest(out, None)),
            }
            if path_is_its_own {
                out.push(format!("unix:path:{}", exe.display()));
            }
            match hashed {
                Ok(d) => digest = d,
                Err(wait) => {
                    return Err(AwaitingDigest {
                        selectors: out,
                        wait,
                    });
                }
            }
        }
    }
    Ok(with_digest(out, digest))
}

/// Whether `path`, as the agent sees it, names the very file `running`
/// (the device and inode opened through `/proc/<pid>/exe`). The path the
/// kernel gives for a process's
/// executable is the one in the process's own mount namespace, and an
/// unprivileged user can make one of those (`unshare -rm`) and mount over
/// any directory there: its own program at `/usr/bin/trusted` read as
/// `/usr/bin/trusted`. Only the same device and inode at that path in the
/// agent's namespace says the path is the executable's. A deleted file
/// (`… (deleted)`) names nothing.
fn names_the_file(path: &Path, running: FileId) -> bool {
    std::fs::metadata(path).is_ok_and(|p| (p.dev(), p.ino()) == running)
}

/// `selectors` with the executable's digest (if known), sorted, once each.
fn with_digest(mut selectors: Vec<String>, digest: Option<String>) -> Vec<String> {
    if let Some(d) = digest {
        selectors.push(format!("unix:sha256:{d}"));
    }
    selectors.sort();
    selectors.dedup();
    selectors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_a_directory_on_the_cgroup2_mount() {
        let mount =
            crate::capture::cgroup2_mount_of(std::path::Path::new("/sys/fs/cgroup/unified"))
                .or_else(|| {
                    crate::capture::cgroup2_mount_of(std::path::Path::new("/sys/fs/cgroup"))
                })
                .expect("a cgroup2 mount (mount -t cgroup2 none /sys/fs/cgroup)");
        let id = super::own_cgroup_id(&mount).expect("own cgroup id");
        let rel = super::proc_cgroup(std::process::id()).expect("a cgroup v2 line");
        if rel == "/" {
            // The kernel's id of the root cgroup.
            assert_eq!(id, 1);
        } else {
            assert!(id > 1, "cgroup {rel} has id {id}");
        }
    }

    #[test]
    fn digest_cache_keeps_the_most_recent_executables_only() {
        let dir = std::env::temp_dir().join(format!("enforcer-digests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cache = DigestCache::settled_after(std::time::Duration::ZERO);
        let cap = DigestCache::CAPACITY.get();
        for i in 0..cap + 10 {
            let f = dir.join(format!("exe-{i}"));
            std::fs::write(&f, i.to_string()).expect("file");
            assert!(cache.sha256_of(&f).is_some());
        }
        assert_eq!(cache.done.lock().expect("lock").len(), cap);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_attestations_of_one_executable_hash_it_once() {
        // The failure: eight connects at once from a new workload each
        // hashed its executable: eight reads and hashes of the same file.
        let dir = std::env::temp_dir().join(format!("enforcer-flight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let exe = dir.join("big-exe");
        std::fs::write(&exe, vec![7u8; 16 << 20]).expect("a 16 MiB file");
        let cache = DigestCache::settled_after(std::time::Duration::ZERO);
        let go = std::sync::Barrier::new(8);
        let digests: Vec<Option<String>> = std::thread::scope(|s| {
            let all: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        go.wait();
                        cache.sha256_of(&exe)
                    })
                })
                .collect();
            all.into_iter().map(|t| t.join().expect("thread")).collect()
        });
        let want = hash_file(&exe).expect("digest");
        assert!(
            digests.iter().all(|d| d.as_deref() == Some(want.as_str())),
            "{digests:?}"
        );
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 1, "hashed once");
        assert!(cache.running.lock().expect("lock").is_empty());
        // A changed file (new mtime and size) is hashed again.
        std::fs::write(&exe, b"replaced").expect("rewrite");
        assert_ne!(cache.sha256_of(&exe), Some(want));
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_written_again_is_hashed_again_whatever_its_mtime_says() {
        // The attack: an executable patched in place to the same size,
        // its mtime set back (as `touch -d` does), kept the digest cached
        // for what it had been (the key was device, inode, mtime in
        // seconds, size): the patched program was attested as the original.
        let dir =
            std::env::temp_dir().join(format!("enforcer-digest-ctime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let exe = dir.join("exe");
        std::fs::write(&exe, b"the trusted program").expect("exe");
        let mtime = std::fs::metadata(&exe)
            .and_then(|m| m.modified())
            .expect("mtime");
        let digest = |b: &[u8]| Some(hex::encode(Sha256::digest(b)));
        let cache = DigestCache::settled_after(std::time::Duration::ZERO);
        assert_eq!(cache.sha256_of(&exe), digest(b"the trusted program"));
        assert_eq!(cache.sha256_of(&exe), digest(b"the trusted program"));
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 1, "cached");
        std::fs::write(&exe, b"a patched program!!").expect("patch");
        std::fs::File::options()
            .write(true)
            .open(&exe)
            .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(mtime)))
            .expect("mtime set back");
        let meta = std::fs::metadata(&exe).expect("meta");
        assert_eq!(meta.modified().ok(), Some(mtime));
        assert_eq!(meta.len(), b"the trusted program".len() as u64);
        assert_eq!(cache.sha256_of(&exe), digest(b"a patched program!!"));
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 2);

        // A file changed less than `settle` ago is hashed each time; once
        // it has been left alone that long, its digest is cached.
        let settle = std::time::Duration::from_millis(300);
        let cache = DigestCache::settled_after(settle);
        std::fs::write(&exe, b"a new program").expect("exe");
        assert_eq!(cache.sha256_of(&exe), digest(b"a new program"));
        assert_eq!(cache.sha256_of(&exe), digest(b"a new program"));
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 2, "not cached yet");
        std::thread::sleep(settle + std::time::Duration::from_millis(100));
        assert_eq!(cache.sha256_of(&exe), digest(b"a new program"));
        assert_eq!(cache.sha256_of(&exe), digest(b"a new program"));
        assert_eq!(
            cache.hashed.load(Ordering::Relaxed),
            3,
            "cached once settled"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_digest_is_cached_under_the_key_of_the_file_it_was_read_from() {
        // The attack: through /proc/<pid>/exe, a process that execs a
        // trusted executable between the cache's look at the path (its
        // key: device, inode, mtime, size) and the hash's read of it had the
        // trusted executable's digest cached under its own executable's key;
        // from then on every connection of its own executable got the
        // trusted digest without any exec. A symlink moved between the two
        // stands for the exec: the hash reads the file the key was taken
        // from, not whatever the path names by then.
        let dir = std::env::temp_dir().join(format!("enforcer-digest-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (own, trusted, link) = (dir.join("own"), dir.join("trusted"), dir.join("exe"));
        std::fs::write(&own, b"the attacker's program").expect("own");
        std::fs::write(&trusted, b"the trusted executable, longer").expect("trusted");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&own, &link).expect("link");
        let cache = DigestCache::settled_after(std::time::Duration::ZERO);
        let (_, Begun::Hash(finish, file)) = cache.begin(&link) else {
            panic!("a new executable was not to be hashed");
        };
        // The "exec": the path now names the trusted executable.
        std::fs::remove_file(&link).expect("unlink");
        std::os::unix::fs::symlink(&trusted, &link).expect("relink");
        let digest = |b: &[u8]| Some(hex::encode(Sha256::digest(b)));
        assert_eq!(finish.hash(file), digest(b"the attacker's program"));
        assert_eq!(
            cache.sha256_of(&own),
            digest(b"the attacker's program"),
            "the attacker's executable keeps its own digest"
        );
        assert_eq!(
            cache.sha256_of(&link),
            digest(b"the trusted executable, longer")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_caller_that_finds_the_executable_being_hashed_returns_and_waits_as_a_task() {
        // The failure: the attestations that found a hash under way each
        // blocked their blocking-pool thread until it ended; a burst of
        // connects from one new workload held the whole pool, and other
        // workloads' connections waited for a hash that was not theirs.
        // A FIFO stands for an executable whose hash lasts until the test
        // says: the hasher reads it until the writer closes it.
        let dir = std::env::temp_dir().join(format!("enforcer-digest-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let exe = dir.join("slow-exe");
        nix::unistd::mkfifo(&exe, nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        // The writer, open before any reader (read and write: opening a
        // FIFO does not wait for the other side then), so that each caller's
        // open returns at once.
        let mut writer = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&exe)
            .expect("the FIFO's writer");
        let cache = DigestCache::default();
        std::thread::scope(|s| {
            let hasher = s.spawn(|| cache.sha256_unless_hashing(&exe));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while cache.running.lock().expect("lock").is_empty() {
                assert!(std::time::Instant::now() < deadline, "the hash never began");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // Returns at once, while the hash is under way.
            let (_, Err(wait)) = cache.sha256_unless_hashing(&exe) else {
                panic!("found a digest while its executable was being hashed");
            };
            let (_, Err(blocking)) = cache.sha256_unless_hashing(&exe) else {
                panic!("found a digest while its executable was being hashed");
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let waiting = rt.spawn(wait.digest());
            let blocked = s.spawn(|| blocking.blocking());
            // One turn of the runtime: the task is parked on the flight.
            rt.block_on(tokio::task::yield_now());
            assert!(!waiting.is_finished());
            std::io::Write::write_all(&mut writer, b"the executable").expect("the hash's input");
            drop(writer);
            let want = Some(hex::encode(Sha256::digest(b"the executable")));
            assert_eq!(hasher.join().expect("hasher").1.ok(), Some(want.clone()));
            assert_eq!(rt.block_on(waiting).expect("task"), want);
            assert_eq!(blocked.join().expect("thread"), want);
        });
        assert_eq!(cache.hashed.load(Ordering::Relaxed), 1, "hashed once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    const POD: &str = "0f5e1c2a-1b2c-4d5e-8f90-123456789abc";
    const CID: &str = "4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";

    #[test]
    fn containerd_systemd_driver() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            POD.replace('-', "_")
        );
        let s = container_selectors(&p);
        assert_eq!(
            s,
            vec![format!("k8s:pod-uid:{POD}"), format!("container:id:{CID}")]
        );
    }

    #[test]
    fn crio_systemd_driver() {
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope",
            POD.replace('-', "_")
        );
        assert_eq!(
            container_selectors(&p),
            vec![format!("k8s:pod-uid:{POD}"), format!("container:id:{CID}")]
        );
    }

    #[test]
    fn cgroupfs_driver() {
        let p = format!("/kubepods/besteffort/pod{POD}/{CID}");
        assert_eq!(
            container_selectors(&p),
            vec![format!("k8s:pod-uid:{POD}"), format!("container:id:{CID}")]
        );
    }

    #[test]
    fn docker_standalone() {
        assert_eq!(
            container_selectors(&format!("/system.slice/docker-{CID}.scope")),
            vec![format!("container:id:{CID}")]
        );
        assert_eq!(
            container_selectors(&format!("/docker/{CID}")),
            vec![format!("container:id:{CID}")]
        );
    }

    #[test]
    fn cgroups_a_workload_made_below_its_own_name_nothing() {
        let pod = POD.replace('-', "_");
        // (path, unit, container selectors)
        let table: [(String, Option<&str>, Vec<String>); 7] = [
            // A user's manager, delegated: its units are its own.
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/llm.service".into(),
                Some("user@1000.service"),
                vec![],
            ),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/docker-{CID}.scope"),
                Some("user@1000.service"),
                vec![],
            ),
            // A unit with Delegate= naming a pod and a container below it.
            (
                format!("/system.slice/tool.service/kubepods-pod{pod}.slice/crio-{CID}.scope"),
                Some("tool.service"),
                vec![],
            ),
            // A container (systemd driver) with systemd inside.
            (
                format!(
                    "/kubepods.slice/kubepods-pod{pod}.slice/cri-containerd-{CID}.scope/init.scope"
                ),
                Some(&*format!("cri-containerd-{CID}.scope")),
                vec![format!("k8s:pod-uid:{POD}"), format!("container:id:{CID}")],
            ),
            // A container (cgroupfs driver) naming another pod's container.
            (
                format!(
                    "/kubepods/besteffort/pod{POD}/{CID}/pod{}/{}",
                    OTHER_POD,
                    "ab".repeat(32)
                ),
                None,
                vec![format!("k8s:pod-uid:{POD}"), format!("container:id:{CID}")],
            ),
            // No unit nor container: the whole path is read.
            (
                format!("/kubepods/besteffort/pod{POD}"),
                None,
                vec![format!("k8s:pod-uid:{POD}")],
            ),
            ("/enforced.slice".into(), None, vec![]),
        ];
        for (path, unit, containers) in table {
            assert_eq!(systemd_unit(&path), unit, "{path}");
            assert_eq!(container_selectors(&path), containers, "{path}");
        }
    }

    const OTHER_POD: &str = "11111111-2222-4333-8444-555555555555";

    #[test]
    fn plain_paths_have_no_container_selectors() {
        assert!(container_selectors("/system.slice/llm.service").is_empty());
        assert!(container_selectors("/kubepods/burstable/podnot-a-uid/x").is_empty());
    }

    #[test]
    fn user_and_group_names_come_from_the_files() {
        let users = IdNames::new("/etc/passwd");
        assert_eq!(users.lookup(0).as_deref(), Some("root"));
        assert_eq!(
            users.lookup(0).as_deref(),
            Some("root"),
            "served from the parsed table"
        );
        assert_eq!(
            IdNames::new("/etc/group").lookup(0).as_deref(),
            Some("root")
        );
        assert_eq!(users.lookup(4_000_000_000), None);
    }

    #[test]
    fn systemd_unit_is_the_unit_systemd_made() {
        assert_eq!(
            systemd_unit("/system.slice/llm.service"),
            Some("llm.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/session-2.scope"),
            Some("session-2.scope")
        );
        assert_eq!(systemd_unit("/enforced.slice"), None);
    }

    /// This process's facts, as the kernel would record them at a connect
    /// (with `exec_mark`; its cgroup from /proc).
    fn own_facts(exec_mark: Option<u32>) -> WorkloadFacts {
        let pid = std::process::id();
        WorkloadFacts {
            pid,
            tid: pid,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            cgroup_id: 0,
            cgroup_path: proc_cgroup(pid),
            comm: String::new(),
            netns_cookie: 0,
            exec_mark,
        }
    }

    #[test]
    fn own_process_gets_exe_and_digest() {
        let facts = own_facts(None);
        let cg = facts.cgroup_path.clone();
        let s = selectors(&facts, &SelectorCache::default());
        assert!(s.contains(&format!("unix:uid:{}", facts.uid)), "{s:?}");
        if cg.is_some() {
            let exe = std::fs::read_link("/proc/self/exe").expect("exe");
            assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
            assert!(
                s.iter()
                    .any(|x| x.starts_with("unix:sha256:") && x.len() == 12 + 64),
                "{s:?}"
            );
        }
        // A recorded cgroup that is not the process's: no exe facts.
        let wrong = WorkloadFacts {
            cgroup_path: Some("/elsewhere".into()),
            ..facts
        };
        let s = selectors(&wrong, &SelectorCache::default());
        assert!(!s.iter().any(|x| x.starts_with("unix:path:")), "{s:?}");
    }

    #[test]
    fn an_executable_is_attested_only_for_a_connect_its_program_made() {
        use enforcer_common::{exec_mark, exec_mark_under_way};
        let pid = std::process::id();
        assert!(
            proc_cgroup(pid).is_some(),
            "this test needs a cgroup v2 line in /proc/self/cgroup"
        );
        let settled = exec_mark(0x8123_4567);
        let under_way = exec_mark_under_way(0x0123_4567);
        // (mark recorded at the connect, mark now, executable attested)
        let table: [(Option<u32>, Option<u32>, bool); 8] = [
            // Facts from /proc alone (a listener's owner): nothing to compare.
            (None, Some(settled), true),
            // No exec remembered then or now (the process predates the agent).
            (Some(0), Some(0), true),
            (Some(settled), Some(settled), true),
            // Exec'd since (or the pid was reused).
            (Some(settled), Some(exec_mark(0x0765_4321)), false),
            (Some(0), Some(settled), false),
            // Exec'd since, and the exec is still at work when read.
            (Some(settled), Some(under_way), false),
            // Connected by the old program's other threads during an exec,
            // even when the mark has not moved since.
            (Some(under_way), Some(under_way), false),
            // The marks cannot be read: no executable.
            (Some(settled), None, false),
        ];
        for (recorded, now, attested) in table {
            let cache = SelectorCache::default();
            cache.set_exec_marks(Box::new(move |p| {
                assert_eq!(p, pid);
                now
            }));
            let s = selectors(&own_facts(recorded), &cache);
            assert_eq!(
                s.iter().any(|x| x.starts_with("unix:path:")),
                attested,
                "recorded {recorded:?}, now {now:?}: {s:?}"
            );
            assert_eq!(
                s.iter().any(|x| x.starts_with("unix:sha256:")),
                attested,
                "recorded {recorded:?}, now {now:?}: {s:?}"
            );
        }
        assert!(!enforcer_common::exec_under_way(settled) && settled != 0);
        assert_eq!(exec_mark(enforcer_common::EXEC_UNDER_WAY), 1);
    }
}
