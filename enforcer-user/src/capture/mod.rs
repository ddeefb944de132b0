//! Kernel capture: loads the eBPF object, fills the rule maps, attaches the
//! programs to the configured cgroup subtree and pins programs, links and maps
//! under `<bpffs>/enforcer/v<LAYOUT_VERSION>/<node_name>/`.
//!
//! Links stay pinned when the agent exits, on purpose: a captured connect then
//! keeps being redirected to the (now closed) loopback listener and fails with
//! ECONNREFUSED instead of silently bypassing the agent. `enforcer detach`
//! removes the pins, which detaches the programs.
use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SkLookup, SockOps, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use enforcer_common::{
    AF_INET, AF_INET6, CIDR_CAPTURE, CIDR_EXCLUDE, CaptureConfig, LAYOUT_VERSION, MAX_EXEC_TRACKED,
    MAX_TRACKED, OrigDst, SockTuple, maps, programs,
};
use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::config::CaptureRules;

use crate::mark;

pub mod sweep;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The kernel object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture.cgroup {path}: {message}")]
    Cgroup { path: PathBuf, message: String },
    #[error("bpffs {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("loading the kernel programs failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("kernel program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("kernel program {name}: link: {message}")]
    Link { name: &'static str, message: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("reading this network namespace's cookie: {0}")]
    Netns(String),
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |e| CaptureError::Map {
        name,
        source: Box::new(e),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> CaptureError {
    move |e| CaptureError::Program {
        name,
        source: Box::new(e),
    }
}

/// A cgroup v2 directory that may be captured: exists, is on a cgroup2 mount,
/// and is not the root of the hierarchy (that would capture the whole machine).
#[derive(Debug, Clone)]
pub struct CaptureCgroup {
    pub path: PathBuf,
    /// The cgroup2 mount point the path lives on.
    pub mount: PathBuf,
}

impl CaptureCgroup {
    pub fn check(path: &Path) -> Result<Self, CaptureError> {
        let err = |message: String| CaptureError::Cgroup {
            path: path.to_owned(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(format!("{e}")))?;
        if !meta.is_dir() {
            return Err(err("is not a directory".into()));
        }
        let st = nix::sys::statfs::statfs(path).map_err(|e| err(format!("statfs: {e}")))?;
        if st.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
            return Err(err(
                "is not on a cgroup v2 filesystem (try the unified hierarchy, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)"
                    .into(),
            ));
        }
        let mount =
            cgroup2_mount_of(path).ok_or_else(|| err("cannot find its cgroup2 mount".into()))?;
        let canon = path.canonicalize().map_err(|e| err(format!("{e}")))?;
        if canon == mount {
            return Err(err(format!(
                "is the root of the cgroup2 hierarchy ({}); refusing to capture every process on the machine — name a subtree",
                mount.display()
            )));
        }
        Ok(Self { path: canon, mount })
    }
}

/// The cgroup2 mount point that contains `path` (longest matching mount).
pub(crate) fn cgroup2_mount_of(path: &Path) -> Option<PathBuf> {
    let canon = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if !post.starts_with("cgroup2 ") {
                return None;
            }
            pre.split(' ').nth(4).map(PathBuf::from)
        })
        .filter(|m| canon.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

/// Makes sure `dir` is a bpffs mount, mounting one if it is not.
fn ensure_bpffs(dir: &Path) -> Result<(), CaptureError> {
    let err = |message: String| CaptureError::Bpffs {
        path: dir.to_owned(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(format!("create: {e}")))?;
    let st = nix::sys::statfs::statfs(dir).map_err(|e| err(format!("statfs: {e}")))?;
    if st.filesystem_type().0 == BPF_FS_MAGIC {
        return Ok(());
    }
    info!(path = %dir.display(), "mounting bpffs");
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(format!("not a bpffs and mounting one failed: {e}")))
}

/// The pin directory of one agent instance.
pub fn pin_dir(bpffs: &Path, node_name: &str) -> PathBuf {
    bpffs
        .join("enforcer")
        .join(format!("v{LAYOUT_VERSION}"))
        .join(node_name)
}

const ATTACHMENTS: [(&str, Attach); 8] = [
    (programs::CONNECT4, Attach::SockAddr),
    (programs::CONNECT6, Attach::SockAddr),
    (programs::SENDMSG4, Attach::SockAddr),
    (programs::SENDMSG6, Attach::SockAddr),
    (programs::GETPEERNAME4, Attach::SockAddr),
    (programs::GETPEERNAME6, Attach::SockAddr),
    (programs::SOCK_OPS, Attach::SockOps),
    (programs::SOCK_RELEASE, Attach::Sock),
];

#[derive(Clone, Copy)]
enum Attach {
    SockAddr,
    SockOps,
    Sock,
}

/// The loaded and attached kernel side. Owns the eBPF object and the maps the
/// proxy reads; dropping it leaves the pinned links in place (fail closed).
pub struct Capture {
    ebpf: std::sync::Mutex<Ebpf>,
    /// The agent's plaintext listeners in pods, by pod address; `None`
    /// without protected ports.
    pod_plaintext: Option<std::sync::Mutex<aya::maps::SockHash<MapData, [u32; 4]>>>,
    by_tuple: std::sync::Mutex<HashMap<MapData, SockTuple, OrigDst>>,
    by_cookie: std::sync::Mutex<HashMap<MapData, u64, OrigDst>>,
    /// A second handle on `ENF_BY_TUPLE` for counting its entries at a
    /// scrape: a walk of a full map is one syscall per entry, and under
    /// `by_tuple`'s lock it would hold up every connection's lookup.
    by_tuple_count: std::sync::Mutex<HashMap<MapData, SockTuple, OrigDst>>,
    /// Pods' steering pins of another layout version are left (retired
    /// pod by pod); none at all, the usual case, and nothing is looked up.
    other_layout_pods: std::sync::atomic::AtomicBool,
    config: std::sync::Mutex<Array<MapData, CaptureConfig>>,
    /// The served network namespaces (by cookie): the agent's and the pods'.
    netns: std::sync::Mutex<HashMap<MapData, u64, u8>>,
    /// What the programs refused, per CPU (`ENF_COUNTERS`).
    counters: std::sync::Mutex<aya::maps::PerCpuArray<MapData, u64>>,
    /// Thread group -> the mark of its last exec (`ENF_EXECS`); `None` when
    /// the exec tracepoints could not be attached (no executable is
    /// attested).
    execs: Option<std::sync::Mutex<HashMap<MapData, u32, u32>>>,
    /// The cookie of the agent's own netns.
    pub host_netns: u64,
    pub cgroup: CaptureCgroup,
    pub pin_dir: PathBuf,
}

impl Capture {
    /// Loads, configures, attaches and pins. Replaces the pins of a previous run
    /// of the same instance only after the new programs are attached, so there is
    /// no moment in which captured connects are let through.
    pub fn attach(
        cgroup: CaptureCgroup,
        bpffs: &Path,
        node_name: &str,
        rules: &CaptureRules,
        outbound_port: u16,
        inbound: &InboundSteering<'_>,
        taking_over: &TakingOver<'_>,
    ) -> Result<Self, CaptureError> {
        let TakingOver {
            handover_cgroup,
            pods,
        } = *taking_over;
        ensure_bpffs(bpffs)?;
        let pin_dir = pin_dir(bpffs, node_name);
        let mut loader = EbpfLoader::new();
        // The record maps of the instance this one replaces are reused: a
        // connect its programs redirected (and recorded) just before they are
        // detached is still found when this agent accepts it, and a
        // workload's getpeername and close keep finding their records.
        let mut reused = Vec::new();
        for (name, expect) in RECORD_MAPS {
            let path = pin_dir.join("maps").join(name);
            if record_map_reusable(&path, expect) {
                loader.map_pin_path(name, path);
                reused.push(name);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| CaptureError::Load(Box::new(e)))?;
        if !reused.is_empty() {
            info!(maps = ?reused, "the previous instance's connection records are kept");
        }

        let agent_cgroup_id =
            crate::attest::selectors::own_cgroup_id(&cgroup.mount).map_err(|e| {
                CaptureError::Cgroup {
                    path: PathBuf::from("/proc/self/cgroup"),
                    message: format!("cannot find the agent's own cgroup: {e}"),
                }
            })?;
        let handover_cgroup_id = handover_cgroup
            .filter(|id| *id != agent_cgroup_id)
            .unwrap_or(0);
        let host_netns = own_netns_cookie()?;
        fill_rules(
            &mut ebpf,
            rules,
            outbound_port,
            agent_cgroup_id,
            handover_cgroup_id,
            std::iter::once(host_netns).chain(pods.iter().copied()),
        )?;

        let cgroup_file = File::open(&cgroup.path).map_err(|e| CaptureError::Cgroup {
            path: cgroup.path.clone(),
            message: format!("open: {e}"),
        })?;
        // Execs are followed before the new connect programs record any
        // connect, so every record's exec mark can be compared.
        let exec_tracking = track_execs(&mut ebpf)
            .inspect(|probes| info!(probes, "exec probes attached"))
            .inspect_err(|e| {
                warn!(error = %e, "the exec probes cannot be attached: no connection's executable is attested (unix:path, unix:sha256 selectors are left out), since an exec after a connect could not be told")
            })
            .is_ok();
        let mut links = Vec::new();
        // BPF links (kernel >= 5.7) always coexist with other programs on the
        // cgroup, so `Single` (flags 0) is the mode link_create accepts.
        for (name, kind) in ATTACHMENTS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?;
            // Same steps for both program types; a macro because they share no trait.
            macro_rules! load_attach {
                ($ty:ty) => {{
                    let p: &mut $ty = prog.try_into().map_err(prog_err(name))?;
                    p.load().map_err(prog_err(name))?;
                    let id = p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    let link: FdLink = p
                        .take_link(id)
                        .map_err(prog_err(name))?
                        .try_into()
                        .map_err(|e: aya::programs::links::LinkError| CaptureError::Link {
                            name,
                            message: e.to_string(),
                        })?;
                    link
                }};
            }
            let link = match kind {
                Attach::SockAddr => load_attach!(CgroupSockAddr),
                Attach::SockOps => load_attach!(SockOps),
                Attach::Sock => load_attach!(CgroupSock),
            };
            links.push((name, link));
        }
        if !inbound.ports.is_empty() {
            fill_inbound(&mut ebpf, inbound)?;
            let name = programs::SK_LOOKUP;
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?;
            let netns =
                File::open("/proc/self/ns/net").map_err(|e| CaptureError::Netns(e.to_string()))?;
            let p: &mut SkLookup = prog.try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            let id = p.attach(&netns).map_err(prog_err(name))?;
            let link: FdLink = p.take_link(id).map_err(prog_err(name))?.into();
            links.push((name, link));
            // Attached to each pod's netns as the agent serves the pod.
            let name = programs::SK_LOOKUP_POD;
            let p: &mut SkLookup = ebpf
                .program_mut(name)
                .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?
                .try_into()
                .map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            info!(
                ports = inbound.ports.len(),
                "inbound plaintext steering attached to this network namespace"
            );
        }
        info!(cgroup = %cgroup.path.display(), "kernel programs attached");

        // New programs are live; now retire the previous instance's pins,
        // and those of another release's layout on this node.
        remove_pins(&pin_dir);
        let other_layout_pods = retire_other_layouts(bpffs, node_name);
        for sub in ["links", "programs", "maps"] {
            let d = pin_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| CaptureError::Pin {
                path: d.clone(),
                message: e.to_string(),
            })?;
        }
        for (name, link) in links {
            let path = pin_dir.join("links").join(name);
            let pinned: PinnedLink = link.pin(&path).map_err(|e| CaptureError::Pin {
                path: path.clone(),
                message: e.to_string(),
            })?;
            // Dropping the PinnedLink handle keeps the pin (and the attachment).
            drop(pinned);
        }
        for name in ATTACHMENTS
            .iter()
            .map(|(n, _)| *n)
            .chain([programs::SK_LOOKUP, programs::SK_LOOKUP_POD])
        {
            let path = pin_dir.join("programs").join(name);
            if let Some(prog) = ebpf.program_mut(name).filter(|p| p.fd().is_ok()) {
                prog.pin(&path).map_err(|e| CaptureError::Pin {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        for name in maps::ALL {
            let path = pin_dir.join("maps").join(name);
            if let Some(map) = ebpf.map(name) {
                map.pin(&path).map_err(|e| CaptureError::Pin {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }

        let by_tuple = take_hash(&mut ebpf, maps::BY_TUPLE)?;
        let by_cookie = take_hash(&mut ebpf, maps::BY_COOKIE)?;
        let by_tuple_count = sweep::pinned(&pin_dir, maps::BY_TUPLE)?;
        let config = ebpf.take_map(maps::CONFIG).ok_or_else(|| {
            map_err(maps::CONFIG)(aya::maps::MapError::InvalidName {
                name: maps::CONFIG.into(),
            })
        })?;
        let config = Array::try_from(config).map_err(map_err(maps::CONFIG))?;
        let netns = take_hash(&mut ebpf, maps::NETNS)?;
        let counters = ebpf.take_map(maps::COUNTERS).ok_or_else(|| {
            map_err(maps::COUNTERS)(aya::maps::MapError::InvalidName {
                name: maps::COUNTERS.into(),
            })
        })?;
        let counters =
            aya::maps::PerCpuArray::try_from(counters).map_err(map_err(maps::COUNTERS))?;
        let execs = if exec_tracking {
            Some(std::sync::Mutex::new(take_hash(&mut ebpf, maps::EXECS)?))
        } else {
            None
        };
        let pod_plaintext = if inbound.ports.is_empty() {
            None
        } else {
            let name = maps::POD_PLAINTEXT;
            let map = ebpf.take_map(name).ok_or_else(|| {
                map_err(name)(aya::maps::MapError::InvalidName { name: name.into() })
            })?;
            Some(std::sync::Mutex::new(
                aya::maps::SockHash::try_from(map).map_err(map_err(name))?,
            ))
        };
        Ok(Self {
            ebpf: std::sync::Mutex::new(ebpf),
            pod_plaintext,
            by_tuple: std::sync::Mutex::new(by_tuple),
            by_cookie: std::sync::Mutex::new(by_cookie),
            by_tuple_count: std::sync::Mutex::new(by_tuple_count),
            other_layout_pods: std::sync::atomic::AtomicBool::new(other_layout_pods),
            config: std::sync::Mutex::new(config),
            netns: std::sync::Mutex::new(netns),
            counters: std::sync::Mutex::new(counters),
            execs,
            host_netns,
            cgroup,
            pin_dir,
        })
    }

    /// The exec mark of thread group `tgid` now, as a connect's record
    /// carries it (`OrigDst::exec_mark`): 0 when no exec of it is
    /// remembered. `None` when it cannot be read (no exec tracking).
    pub fn exec_mark(&self, tgid: u32) -> Option<u32> {
        let execs = self
            .execs
            .as_ref()?
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match execs.get(&tgid, 0) {
            Ok(mark) => Some(mark),
            Err(aya::maps::MapError::KeyNotFound) => Some(0),
            Err(e) => {
                warn!(tgid, error = %e, "reading ENF_EXECS");
                None
            }
        }
    }

    /// During a hitless upgrade, the cgroup of the agent that handed over
    /// (when it is not this agent's): its marked connects are the agent's
    /// until it exits, so a relay it drains is not captured again. `None`
    /// once it has exited.
    pub fn set_handover_cgroup(&self, id: Option<u64>) -> Result<(), CaptureError> {
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut value = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        value.handover_cgroup_id = id.filter(|id| *id != value.agent_cgroup_id).unwrap_or(0);
        config.set(0, value, 0).map_err(map_err(maps::CONFIG))
    }

    /// Serves a pod's netns (by cookie): its workloads' connects are
    /// captured from now on (the agent's listeners must be up in it).
    pub fn serve_netns(&self, cookie: u64) -> Result<(), CaptureError> {
        self.netns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(cookie, 1, 0)
            .map_err(map_err(maps::NETNS))
    }

    /// Steers plaintext to protected ports in a pod's netns (`netns`) to
    /// the agent's plaintext listeners there: `listeners` by the pod
    /// address each serves. `None` when no port is protected. Undone by
    /// [`Capture::unsteer_pod`] (and by dropping the returned value, which
    /// detaches the program; a closed listener leaves the map by itself).
    pub fn steer_pod(
        &self,
        netns: impl std::os::fd::AsFd,
        cookie: u64,
        listeners: &[(IpAddr, std::os::fd::RawFd)],
    ) -> Result<Option<PodSteering>, CaptureError> {
        let Some(map) = &self.pod_plaintext else {
            return Ok(None);
        };
        let mut keys = Vec::new();
        {
            let mut map = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (ip, fd) in listeners {
                let key = address_key(*ip);
                map.insert(key, *fd, 0)
                    .map_err(map_err(maps::POD_PLAINTEXT))?;
                keys.push(key);
            }
        }
        let name = programs::SK_LOOKUP_POD;
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let attached = (|| {
            let p: &mut SkLookup = ebpf
                .program_mut(name)
                .ok_or_else(|| prog_err(name)(aya::programs::ProgramError::NotLoaded))?
                .try_into()
                .map_err(prog_err(name))?;
            let id = p.attach(netns).map_err(prog_err(name))?;
            let link: FdLink = p.take_link(id).map_err(prog_err(name))?.into();
            Ok::<_, CaptureError>(link)
        })();
        drop(ebpf);
        // The new link runs beside the one a previous agent pinned for this
        // netns; that one goes once this one is attached.
        let pinned = attached.and_then(|link| {
            let dir = self.pin_dir.join("pods");
            let path = dir.join(cookie.to_string());
            let pin_err = |message: String| CaptureError::Pin {
                path: path.clone(),
                message,
            };
            std::fs::create_dir_all(&dir).map_err(|e| pin_err(e.to_string()))?;
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(
                    netns = cookie,
                    "a previous agent's steering of this pod retired"
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(e.to_string())),
            }
            link.pin(&path).map_err(|e| pin_err(e.to_string()))
        });
        match pinned {
            Ok(link) => {
                self.retire_other_layout_pods(|c| c == Some(cookie));
                Ok(Some(PodSteering { link, keys }))
            }
            Err(e) => {
                self.unsteer_keys(&keys);
                Err(e)
            }
        }
    }

    /// Removes the pods' steering pins another layout version of this
    /// instance left (an agent of another release) for which `retire`
    /// holds (given the pod's netns cookie).
    fn retire_other_layout_pods(&self, retire: impl Fn(Option<u64>) -> bool) {
        use std::sync::atomic::Ordering;
        if !self.other_layout_pods.load(Ordering::Relaxed) {
            return;
        }
        // `<bpffs>/enforcer/v<N>/<node>`
        let (Some(bpffs), Some(node)) = (self.pin_dir.ancestors().nth(3), self.pin_dir.file_name())
        else {
            return;
        };
        let pins = other_layout_pod_pins(bpffs, &node.to_string_lossy());
        let mut left = false;
        for (pin, version, cookie) in pins {
            if !retire(cookie) {
                left = true;
                continue;
            }
            match std::fs::remove_file(&pin) {
                Ok(()) => {
                    debug!(netns = ?cookie, pin = %pin.display(), "another layout version's steering of this pod retired")
                }
                Err(e) => {
                    left = true;
                    warn!(pin = %pin.display(), error = %e, "removing another layout version's steering of a pod")
                }
            }
            remove_empty(&version.join(node), &version);
        }
        if !left {
            self.other_layout_pods.store(false, Ordering::Relaxed);
        }
    }

    /// Undoes [`Capture::steer_pod`]: the program leaves the pod's netns.
    pub fn unsteer_pod(&self, steering: PodSteering) {
        self.unsteer_keys(&steering.keys);
        if let Err(e) = steering.link.unpin() {
            warn!(error = %e, "unpinning a pod's steering link");
        }
    }

    /// Removes the steering pins of pods not in `keep` (netns cookies): the
    /// pods a previous agent served that are gone now.
    pub fn retire_pod_pins(&self, keep: &[u64]) {
        self.retire_other_layout_pods(|c| !c.is_some_and(|c| keep.contains(&c)));
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("pods")) else {
            return;
        };
        for e in entries.flatten() {
            let cookie = e.file_name().to_string_lossy().parse::<u64>().ok();
            if cookie.is_some_and(|c| keep.contains(&c)) {
                continue;
            }
            if let Err(err) = std::fs::remove_file(e.path()) {
                warn!(path = %e.path().display(), error = %err, "removing a gone pod's pin");
            }
        }
    }

    fn unsteer_keys(&self, keys: &[[u32; 4]]) {
        if let Some(map) = &self.pod_plaintext {
            let mut map = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for key in keys {
                match map.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => warn!(error = %e, "removing a pod's plaintext listener"),
                }
            }
        }
    }

    /// Stops serving a pod's netns.
    pub fn forget_netns(&self, cookie: u64) -> Result<(), CaptureError> {
        match self
            .netns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&cookie)
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::NETNS)(e)),
        }
    }

    /// Finds and consumes the record of the workload socket whose 4-tuple is
    /// (`peer` → `local`) as seen from the accepted side, accepted by a
    /// listener in the netns `netns` (cookie). The kernel publishes it
    /// before the handshake completes; a short retry covers scheduling
    /// delays.
    ///
    /// Pods have loopback addresses of their own, so two netns may hold
    /// the same 4-tuple at once: a record made in another netns is never
    /// taken (a workload that connected to a pod's listener by hand with
    /// another pod's pending 4-tuple would get that pod's identity), and it
    /// is left for its own connection.
    pub async fn take_original(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns: u64,
    ) -> Option<OrigDst> {
        let key = tuple_key(peer, local);
        for attempt in 0..10u32 {
            let found = {
                let mut map = match self.by_tuple.lock() {
                    Ok(m) => m,
                    Err(poisoned) => poisoned.into_inner(),
                };
                match map.get(&key, 0) {
                    Ok(rec) if rec.netns_cookie != netns => {
                        warn!(
                            record_netns = rec.netns_cookie,
                            listener_netns = netns,
                            "a capture record of another network namespace has this connection's 4-tuple; not taken"
                        );
                        None
                    }
                    Ok(rec) => {
                        if let Err(e) = map.remove(&key) {
                            debug!(error = %e, "removing consumed tuple entry");
                        }
                        Some(Some(rec))
                    }
                    Err(aya::maps::MapError::KeyNotFound) => None,
                    Err(e) => {
                        warn!(error = %e, "reading the capture map failed");
                        Some(None)
                    }
                }
            };
            match found {
                Some(result) => return result,
                None => tokio::time::sleep(Duration::from_millis(1 << attempt.min(5))).await,
            }
        }
        None
    }

    /// UDP connects and sends the kernel programs refused since they were
    /// attached (`capture.udp`), over all CPUs.
    pub fn udp_refused(&self) -> u64 {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counters
            .get(&enforcer_common::COUNTER_UDP_REFUSED, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Entries currently in the tracking maps: (by socket cookie, by 4-tuple).
    pub fn entries(&self) -> (u64, u64) {
        fn count<K: aya::Pod, V: aya::Pod>(m: &std::sync::Mutex<HashMap<MapData, K, V>>) -> u64 {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            m.keys().filter(|k| k.is_ok()).count() as u64
        }
        (count(&self.by_cookie), count(&self.by_tuple_count))
    }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, CaptureError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| map_err(name)(aya::maps::MapError::InvalidName { name: name.into() }))?;
    HashMap::try_from(map).map_err(map_err(name))
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, CaptureError> {
    ebpf.map_mut(name)
        .ok_or_else(|| map_err(name)(aya::maps::MapError::InvalidName { name: name.into() }))
}

/// The steering of one pod's netns: the program's link there (detached
/// when dropped) and the pod's addresses in `ENF_POD_PLAINTEXT`.
pub struct PodSteering {
    /// Pinned under `<pin dir>/pods/<netns cookie>`: the steering outlives
    /// the agent (a strict port drops plaintext while no agent listens in
    /// the pod), until the pod is let go or the next agent replaces it.
    link: aya::programs::links::PinnedLink,
    keys: Vec<[u32; 4]>,
}

/// `ENF_POD_PLAINTEXT`'s key of a local address (IPv4 v4-mapped).
fn address_key(ip: IpAddr) -> [u32; 4] {
    let w = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    match ip.to_canonical() {
        IpAddr::V4(v4) => enforcer_common::pod_address_key(false, w(&v4.octets()), [0; 4]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            enforcer_common::pod_address_key(
                true,
                0,
                [w(&o[0..4]), w(&o[4..8]), w(&o[8..12]), w(&o[12..16])],
            )
        }
    }
}

/// What an agent takes over when it attaches: the cgroup of the agent that
/// handed over to it (its connects are the agent's until it exits), and the
/// netns cookies of the pods already running (captured from the start).
#[derive(Clone, Copy, Default)]
pub struct TakingOver<'a> {
    pub handover_cgroup: Option<u64>,
    pub pods: &'a [u64],
}

/// Inbound plaintext steering: protected ports and the agent's listeners.
pub struct InboundSteering<'a> {
    pub ports: Vec<(u16, u8)>,
    pub listener_v4: Option<&'a std::net::TcpListener>,
    pub listener_v6: Option<&'a std::net::TcpListener>,
}

fn fill_inbound(ebpf: &mut Ebpf, inbound: &InboundSteering<'_>) -> Result<(), CaptureError> {
    use maps::{INBOUND, PLAINTEXT_LISTENERS};
    let mut listeners: aya::maps::SockMap<_> =
        aya::maps::SockMap::try_from(map_mut(ebpf, PLAINTEXT_LISTENERS)?)
            .map_err(map_err(PLAINTEXT_LISTENERS))?;
    for (index, l) in [
        (enforcer_common::LISTENER_V4, inbound.listener_v4),
        (enforcer_common::LISTENER_V6, inbound.listener_v6),
    ] {
        if let Some(l) = l {
            listeners
                .set(index, l, 0)
                .map_err(map_err(PLAINTEXT_LISTENERS))?;
        }
    }
    let mut ports: HashMap<_, u16, u8> =
        HashMap::try_from(map_mut(ebpf, INBOUND)?).map_err(map_err(INBOUND))?;
    for (port, mode) in &inbound.ports {
        ports.insert(port, mode, 0).map_err(map_err(INBOUND))?;
    }
    Ok(())
}

fn fill_rules(
    ebpf: &mut Ebpf,
    rules: &CaptureRules,
    outbound_port: u16,
    agent_cgroup_id: u64,
    handover_cgroup_id: u64,
    served: impl Iterator<Item = u64>,
) -> Result<(), CaptureError> {
    use maps::{CIDR4, CIDR6, CONFIG, NETNS, PORTS, UDP_PASS};
    for (name, bitmap) in [(PORTS, &rules.ports), (UDP_PASS, &rules.udp_pass)] {
        let mut ports: Array<_, u64> =
            Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        for (i, word) in bitmap.iter().enumerate() {
            if *word != 0 {
                ports.set(i as u32, word, 0).map_err(map_err(name))?;
            }
        }
    }
    let mut trie4: LpmTrie<_, [u8; 4], u8> =
        LpmTrie::try_from(map_mut(ebpf, CIDR4)?).map_err(map_err(CIDR4))?;
    for (net, v) in cidr_entries(rules) {
        if let IpNet::V4(n) = net {
            let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
            trie4.insert(&key, v, 0).map_err(map_err(CIDR4))?;
        }
    }
    let mut trie6: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(map_mut(ebpf, CIDR6)?).map_err(map_err(CIDR6))?;
    for (net, v) in cidr_entries(rules) {
        if let IpNet::V6(n) = net {
            let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
            trie6.insert(&key, v, 0).map_err(map_err(CIDR6))?;
        }
    }
    let mut netns: HashMap<_, u64, u8> =
        HashMap::try_from(map_mut(ebpf, NETNS)?).map_err(map_err(NETNS))?;
    for cookie in served {
        netns.insert(cookie, 1, 0).map_err(map_err(NETNS))?;
    }
    // Last: the programs capture nothing until `enabled` is set.
    let mut cfg: Array<_, CaptureConfig> =
        Array::try_from(map_mut(ebpf, CONFIG)?).map_err(map_err(CONFIG))?;
    let value = CaptureConfig {
        enabled: 1,
        agent_mark: mark::get(),
        agent_cgroup_id,
        outbound_port,
        udp_refuse: u8::from(rules.udp_refuse),
        _pad: [0; 5],
        handover_cgroup_id,
    };
    cfg.set(0, value, 0).map_err(map_err(CONFIG))
}

/// The cookie of the network namespace this process runs in (SO_NETNS_COOKIE).
fn own_netns_cookie() -> Result<u64, CaptureError> {
    let sock =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| CaptureError::Netns(e.to_string()))?;
    crate::netns::netns_cookie(&sock).map_err(|e| {
        CaptureError::Netns(format!(
            "getsockopt(SO_NETNS_COOKIE): {e} (needs Linux >= 5.14)"
        ))
    })
}

/// Capture and exclusion entries; exclusions are written last so that an
/// exclusion equal to a capture prefix wins.
fn cidr_entries(rules: &CaptureRules) -> impl Iterator<Item = (IpNet, u8)> + '_ {
    rules
        .capture
        .iter()
        .map(|n| (n.trunc(), CIDR_CAPTURE))
        .chain(rules.exclude.iter().map(|n| (n.trunc(), CIDR_EXCLUDE)))
}

/// The kernel's key for a workload socket (`src` = workload, `dst` = listener).
pub fn tuple_key(workload: SocketAddr, listener: SocketAddr) -> SockTuple {
    let mut key = SockTuple {
        family: 0,
        src_port: workload.port(),
        dst_port: listener.port(),
        src: [0; 16],
        dst: [0; 16],
    };
    let put = |ip: IpAddr, out: &mut [u8; 16]| -> u16 {
        match ip {
            IpAddr::V4(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                AF_INET
            }
            IpAddr::V6(v6) => {
                out.copy_from_slice(&v6.octets());
                AF_INET6
            }
        }
    };
    key.family = u32::from(put(workload.ip(), &mut key.src));
    put(listener.ip(), &mut key.dst);
    key
}

/// The original destination of a record as a socket address.
pub fn original_destination(rec: &OrigDst) -> Option<SocketAddr> {
    let ip = match rec.family {
        AF_INET => IpAddr::from([rec.addr[0], rec.addr[1], rec.addr[2], rec.addr[3]]),
        AF_INET6 => IpAddr::from(rec.addr),
        _ => return None,
    };
    Some(SocketAddr::new(ip, rec.port))
}

/// The maps a new instance takes over from the one it replaces, with the
/// shape (type, key and value size, entries) they must have for that.
const RECORD_MAPS: [(&str, MapShape); 3] = [
    (
        maps::BY_TUPLE,
        MapShape {
            key: size_of::<SockTuple>(),
            value: size_of::<OrigDst>(),
            entries: MAX_TRACKED,
        },
    ),
    (
        maps::BY_COOKIE,
        MapShape {
            key: size_of::<u64>(),
            value: size_of::<OrigDst>(),
            entries: MAX_TRACKED,
        },
    ),
    // The exec marks the records' were taken from.
    (
        maps::EXECS,
        MapShape {
            key: size_of::<u32>(),
            value: size_of::<u32>(),
            entries: MAX_EXEC_TRACKED,
        },
    ),
];

/// An LRU hash map's sizes.
#[derive(Clone, Copy)]
struct MapShape {
    key: usize,
    value: usize,
    entries: u32,
}

/// Loads and attaches the exec tracepoints: where an exec begins,
/// `sched:sched_prepare_exec` (its point of no return; kernel 6.10 and
/// later) or, before 6.10, `syscalls:sys_enter_execve` and
/// `sys_enter_execveat`; where it is done, `sched:sched_process_exec` (and
/// with the system-call tracepoints, `sys_exit_execve`, `sys_exit_execveat`
/// for an exec that failed); and `sched:sched_process_exit` where its
/// record says whether the whole process is gone (`group_dead`). The links
/// live as long as the eBPF object (the agent): while no agent runs, no
/// captured connect is accepted either. `ENFORCER_EXEC_PROBE=syscalls`
/// takes the system-call tracepoints where `sched_prepare_exec` exists too
/// (to test them). Returns which were taken.
fn track_execs(ebpf: &mut Ebpf) -> Result<&'static str, String> {
    let attach = |ebpf: &mut Ebpf, name: &'static str, points: &[(&str, &str)]| {
        let p: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| format!("{name}: {e}"))?;
        p.load().map_err(|e| format!("{name}: {e}"))?;
        for (category, point) in points {
            p.attach(category, point)
                .map_err(|e| format!("{name} at {category}:{point}: {e}"))?;
        }
        Ok::<_, String>(())
    };
    let tracefs = |path: &str| {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|d| std::fs::read_to_string(format!("{d}/events/{path}")).ok())
    };
    let syscalls_asked = std::env::var_os("ENFORCER_EXEC_PROBE").is_some_and(|v| v == "syscalls");
    // Where an exec is done first, then where it begins: no process is
    // left with a beginning whose end is not followed.
    let taken = if tracefs("sched/sched_prepare_exec/format").is_some() && !syscalls_asked {
        attach(
            ebpf,
            programs::EXEC_DONE,
            &[("sched", "sched_process_exec")],
        )?;
        attach(
            ebpf,
            programs::EXEC_BEGINS,
            &[("sched", "sched_prepare_exec")],
        )?;
        "sched:sched_prepare_exec"
    } else {
        attach(
            ebpf,
            programs::EXEC_DONE,
            &[
                ("sched", "sched_process_exec"),
                ("syscalls", "sys_exit_execve"),
                ("syscalls", "sys_exit_execveat"),
            ],
        )?;
        attach(
            ebpf,
            programs::EXEC_BEGINS,
            &[
                ("syscalls", "sys_enter_execve"),
                ("syscalls", "sys_enter_execveat"),
            ],
        )?;
        warn!(
            "this kernel has no sched:sched_prepare_exec (6.10 and later): execs are followed from their system calls, which do not show a 32-bit execve; such an exec after a connect is told only once its new program runs, so an attestation that reads the executable in the microseconds before can take it for the one that connected. Run kernel 6.10 or later, or turn the 32-bit system calls off (ia32_emulation=0 on the kernel's command line)"
        );
        "syscalls:sys_enter_execve"
    };
    let format = tracefs("sched/sched_process_exit/format").unwrap_or_default();
    if format.contains("field:bool group_dead;\toffset:32;\tsize:1;") {
        attach(ebpf, programs::EXIT, &[("sched", "sched_process_exit")])?;
    } else {
        warn!(
            "sched:sched_process_exit has no group_dead on this kernel: a process's exec mark is kept after it exits, so a pid reused by a process that did not exec is not told from the one that had it (the cgroup check still holds)"
        );
    }
    Ok(taken)
}

/// Whether the map pinned at `path` is an LRU hash map of `shape` (key and
/// value sizes, entries). A missing pin is not; a pin of
/// another shape is left to be replaced (with a warning): its records are
/// lost, never misread.
fn record_map_reusable(path: &Path, shape: MapShape) -> bool {
    let info = match aya::maps::MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(_) if !path.exists() => return false,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the pinned record map cannot be read; a new one is made");
            return false;
        }
    };
    let same = matches!(info.map_type(), Ok(aya::maps::MapType::LruHash))
        && info.key_size() as usize == shape.key
        && info.value_size() as usize == shape.value
        && info.max_entries() == shape.entries;
    if !same {
        warn!(
            path = %path.display(),
            key_size = info.key_size(),
            value_size = info.value_size(),
            max_entries = info.max_entries(),
            "the pinned record map has another shape; a new one is made (the previous instance's records are lost)"
        );
    }
    same
}

/// The cgroup programs' link pins of an instance that are missing: the pins
/// are what keeps them attached (the agent holds no link of its own), so a
/// missing one is a program detached (`enforcer detach --force`, or a pin
/// removed by hand).
pub fn missing_link_pins(dir: &Path) -> Vec<&'static str> {
    ATTACHMENTS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dir.join("links").join(name).exists())
        .collect()
}

/// Removes every pin of an instance: links (which detaches the programs),
/// programs and maps. Missing files are fine.
pub fn remove_pins(dir: &Path) {
    for sub in ["links", "programs", "maps"] {
        let d = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                warn!(path = %entry.path().display(), error = %e, "removing pin");
            }
        }
        let _ = std::fs::remove_dir(&d);
    }
}

/// Removes the pins of this node's instance under every other layout
/// version: those of an agent of another release that ran here. Its
/// programs stay attached after it stops (fail closed), and its connect
/// program, attached before this agent's, would run first and record every
/// captured connect in maps this agent does not read. Called once this
/// agent's programs are attached; a connect redirected by the old programs
/// in between is lost (its record is in the old maps), and a workload
/// socket connected under them reads the agent's address from
/// `getpeername` once they are gone. Returns whether pods' steering pins
/// of such versions are left (retired pod by pod).
fn retire_other_layouts(bpffs: &Path, node_name: &str) -> bool {
    let mut pods_left = false;
    for (version, version_dir) in other_layouts(bpffs) {
        let dir = version_dir.join(node_name);
        if !dir.exists() {
            continue;
        }
        remove_pins(&dir);
        warn!(
            version,
            dir = %dir.display(),
            "retired the kernel programs of another layout version"
        );
        // Its pods' steering links stay until this agent steers each pod
        // (`Capture::steer_pod`) or finds it gone (`retire_pod_pins`):
        // removed now, a pod's plaintext would reach its workload
        // unsteered in between.
        remove_empty(&dir, &version_dir);
        pods_left |= dir.exists();
    }
    pods_left
}

/// The pin directories of layout versions other than this agent's
/// (`<bpffs>/enforcer/v<N>`), with N.
fn other_layouts(bpffs: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(bpffs.join("enforcer")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let version = e
                .file_name()
                .to_str()?
                .strip_prefix('v')?
                .parse::<u32>()
                .ok()?;
            (version != LAYOUT_VERSION).then(|| (version, e.path()))
        })
        .collect()
}

/// The pods' steering pins under every other layout version of this
/// node's instance: the pin, its version's directory, the pod's netns
/// cookie (from the pin's name).
fn other_layout_pod_pins(bpffs: &Path, node_name: &str) -> Vec<(PathBuf, PathBuf, Option<u64>)> {
    let mut found = Vec::new();
    for (_, version_dir) in other_layouts(bpffs) {
        let Ok(pods) = std::fs::read_dir(version_dir.join(node_name).join("pods")) else {
            continue;
        };
        for p in pods.flatten() {
            let cookie = p.file_name().to_string_lossy().parse::<u64>().ok();
            found.push((p.path(), version_dir.clone(), cookie));
        }
    }
    found
}

/// Removes an instance directory of another layout version once nothing
/// is pinned in it, and the version's directory once it holds no instance.
fn remove_empty(instance: &Path, version: &Path) {
    let _ = std::fs::remove_dir(instance.join("pods"));
    let _ = std::fs::remove_dir(instance);
    let _ = std::fs::remove_dir(version);
}

/// `enforcer detach`: removes the pins of an instance and its directory.
pub fn detach(bpffs: &Path, node_name: &str) -> Result<bool, CaptureError> {
    let dir = pin_dir(bpffs, node_name);
    if !dir.exists() {
        return Ok(false);
    }
    remove_pins(&dir);
    // The pods' steering links too (`Capture::steer_pod`).
    if let Ok(entries) = std::fs::read_dir(dir.join("pods")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir.join("pods"));
    std::fs::remove_dir(&dir).map_err(|e| CaptureError::Pin {
        path: dir.clone(),
        message: format!("remove: {e}"),
    })?;
    Ok(true)
}

/// Resolves cgroup ids (kernel facts) to paths relative to the cgroup2 mount,
/// by walking the captured subtree: on cgroup v2 a cgroup's id is the inode
/// number of its directory.
pub struct CgroupResolver {
    root: PathBuf,
    mount: PathBuf,
    cache: std::collections::HashMap<u64, String>,
}

impl CgroupResolver {
    pub fn new(cgroup: &CaptureCgroup) -> Self {
        Self {
            root: cgroup.path.clone(),
            mount: cgroup.mount.clone(),
            cache: Default::default(),
        }
    }

    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        self.rescan();
        self.cache.get(&id).cloned()
    }

    /// Maps the subtree's cgroups afresh: cgroups that went are forgotten,
    /// so the map holds the cgroups that exist, not every one ever seen.
    fn rescan(&mut self) {
        let mut fresh = std::collections::HashMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&self.mount)
                .map(|r| format!("/{}", r.display()));
            if let Ok(rel) = rel {
                fresh.insert(meta.ino(), rel);
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
        }
        self.cache = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_resolver_forgets_cgroups_that_went() {
        use std::os::unix::fs::MetadataExt as _;
        let mount = std::env::temp_dir().join(format!("enforcer-cgr-{}", std::process::id()));
        let root = mount.join("node");
        std::fs::create_dir_all(root.join("gone.service")).expect("dirs");
        let mut r = CgroupResolver {
            root: root.clone(),
            mount: mount.clone(),
            cache: Default::default(),
        };
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let gone = ino(&root.join("gone.service"));
        assert_eq!(r.path_of(gone).as_deref(), Some("/node/gone.service"));
        // (cgroupfs never reuses a cgroup's id; a plain directory may reuse
        // an inode, so the new one is made before the old one goes.)
        std::fs::create_dir(root.join("new.service")).expect("mkdir");
        std::fs::remove_dir(root.join("gone.service")).expect("rmdir");
        let new = ino(&root.join("new.service"));
        assert_eq!(r.path_of(new).as_deref(), Some("/node/new.service"));
        assert!(
            !r.cache.contains_key(&gone),
            "a removed cgroup is forgotten"
        );
        assert_eq!(r.cache.len(), 2, "the root and the one cgroup there is");
        let _ = std::fs::remove_dir_all(&mount);
    }

    #[test]
    fn tuple_key_matches_kernel_layout() {
        let k = tuple_key(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        assert_eq!(k.family, 2);
        assert_eq!(k.src_port, 40000);
        assert_eq!(k.dst_port, 15001);
        assert_eq!(&k.src[..4], &[127, 0, 0, 1]);
        assert_eq!(&k.src[4..], &[0; 12]);
        let k6 = tuple_key("[::1]:1".parse().unwrap(), "[::1]:15001".parse().unwrap());
        assert_eq!(k6.family, 10);
        assert_eq!(k6.dst[15], 1);
    }

    #[test]
    fn original_destination_decodes_both_families() {
        let mut rec = OrigDst {
            family: AF_INET,
            port: 8080,
            ..Default::default()
        };
        rec.addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(
            original_destination(&rec),
            Some("10.0.0.2:8080".parse().unwrap())
        );
        rec.family = AF_INET6;
        rec.addr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(
            original_destination(&rec),
            Some("[fd00::2]:8080".parse().unwrap())
        );
        rec.family = 99;
        assert_eq!(original_destination(&rec), None);
    }

    #[test]
    fn root_cgroup_is_refused() {
        if let Some(mount) = cgroup2_mount_of(Path::new("/sys/fs/cgroup/unified"))
            .or_else(|| cgroup2_mount_of(Path::new("/sys/fs/cgroup")))
        {
            let err = CaptureCgroup::check(&mount).unwrap_err().to_string();
            assert!(err.contains("root of the cgroup2 hierarchy"), "{err}");
        } else {
            panic!(
                "no cgroup2 mount found: this test needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)"
            );
        }
    }
}
