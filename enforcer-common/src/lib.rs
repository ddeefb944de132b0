//! Types shared by the kernel programs (`enforcer-ebpf`) and the node agent
//! (`enforcer-user`). Every type here is `#[repr(C)]` plain data: its layout is
//! the contract between the two sides. Changing any layout means bumping
//! [`LAYOUT_VERSION`], which is part of the bpffs pin path, so a new agent never
//! reuses maps pinned by an older one with a different schema.
#![no_std]

/// Version of the map layouts below; part of the pin path (`enforcer/v2/...`).
/// The record maps (`ENF_BY_TUPLE`, `ENF_BY_COOKIE`: [`SockTuple`],
/// [`OrigDst`]) are shared by the agent instances of one pin directory — a
/// new agent reuses the pinned ones it finds — so their layouts must not
/// change without a bump; the other maps are each instance's own.
/// v2: the agent is recognised by socket mark and cgroup, never by pid.
/// `OrigDst::exec_mark` took the place of a padding word within v2 (the same
/// layout): older programs' records carry 0 there, read as "no exec
/// remembered", which `ENF_EXECS`, new with it, agrees with for every
/// process that has not exec'd since.
pub const LAYOUT_VERSION: u32 = 2;

/// Address family values as the kernel reports them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Number of 64-bit words in the port bitmap (65536 ports / 64).
pub const PORT_WORDS: u32 = 1024;

/// Maximum number of captured sockets tracked at once (LRU maps).
pub const MAX_TRACKED: u32 = 65536;

/// Thread groups whose last `execve` is remembered at once (`ENF_EXECS`,
/// an LRU).
pub const MAX_EXEC_TRACKED: u32 = 65536;

/// The bit of an exec mark that says the process was in the middle of an
/// exec: set from the exec's point of no return until the new program
/// runs. A connect recorded with it set was made by the old program's
/// other threads while the exec was replacing it, so neither executable
/// can be vouched for.
pub const EXEC_UNDER_WAY: u32 = 1 << 31;

/// The mark of an exec that is done (the new program runs) from a random
/// word: never 0 (0 is "no exec remembered") and without
/// [`EXEC_UNDER_WAY`].
#[inline(always)]
pub fn exec_mark(random: u32) -> u32 {
    (random & !EXEC_UNDER_WAY).max(1)
}

/// The mark of an exec that is under way, from a random word.
#[inline(always)]
pub fn exec_mark_under_way(random: u32) -> u32 {
    random | EXEC_UNDER_WAY
}

/// Whether `mark` was drawn while an exec was under way.
#[inline(always)]
pub fn exec_under_way(mark: u32) -> bool {
    mark & EXEC_UNDER_WAY != 0
}

/// Slots of `ENF_COUNTERS` (per-CPU counts the kernel programs keep).
pub const COUNTERS: u32 = 1;
/// UDP connects and sends the programs refused (`capture.udp`).
pub const COUNTER_UDP_REFUSED: u32 = 0;

/// Maximum number of network namespaces the agent serves listeners in.
pub const MAX_NETNS: u32 = 1024;

/// Maximum number of CIDR rules per family.
pub const MAX_CIDRS: u32 = 1024;

/// Names of the maps, as declared in the kernel object and pinned on bpffs.
pub mod maps {
    pub const CONFIG: &str = "ENF_CONFIG";
    pub const PORTS: &str = "ENF_PORTS";
    pub const CIDR4: &str = "ENF_CIDR4";
    pub const CIDR6: &str = "ENF_CIDR6";
    pub const BY_COOKIE: &str = "ENF_BY_COOKIE";
    pub const BY_TUPLE: &str = "ENF_BY_TUPLE";
    pub const NETNS: &str = "ENF_NETNS";
    pub const INBOUND: &str = "ENF_INBOUND";
    pub const PLAINTEXT_LISTENERS: &str = "ENF_PLAINTEXT_LISTENERS";
    pub const POD_PLAINTEXT: &str = "ENF_POD_PLAINTEXT";
    pub const EXECS: &str = "ENF_EXECS";
    pub const UDP_PASS: &str = "ENF_UDP_PASS";
    pub const COUNTERS: &str = "ENF_COUNTERS";
    pub const ALL: [&str; 13] = [
        CONFIG,
        PORTS,
        UDP_PASS,
        COUNTERS,
        CIDR4,
        CIDR6,
        BY_COOKIE,
        BY_TUPLE,
        NETNS,
        INBOUND,
        PLAINTEXT_LISTENERS,
        POD_PLAINTEXT,
        EXECS,
    ];
}

/// Names of the kernel programs (function names; never the ELF section names).
pub mod programs {
    pub const CONNECT4: &str = "enf_connect4";
    pub const CONNECT6: &str = "enf_connect6";
    pub const GETPEERNAME4: &str = "enf_getpeername4";
    pub const GETPEERNAME6: &str = "enf_getpeername6";
    pub const SOCK_OPS: &str = "enf_sock_ops";
    pub const SOCK_RELEASE: &str = "enf_sock_release";
    /// `cgroup/sendmsg4`, `sendmsg6`: UDP sent to an address (unconnected).
    pub const SENDMSG4: &str = "enf_sendmsg4";
    pub const SENDMSG6: &str = "enf_sendmsg6";
    pub const SK_LOOKUP: &str = "enf_sk_lookup";
    /// The same steering in pods' network namespaces, to the plaintext
    /// listeners the agent opened inside each pod (`ENF_POD_PLAINTEXT`).
    pub const SK_LOOKUP_POD: &str = "enf_sk_lookup_pod";
    /// An exec begins: tracepoint `sched:sched_prepare_exec` (kernel 6.10
    /// and later), else `syscalls:sys_enter_execve` and `sys_enter_execveat`.
    pub const EXEC_BEGINS: &str = "enf_exec_begins";
    /// An exec is done: tracepoint `sched:sched_process_exec` (and, with the
    /// system-call tracepoints above, `sys_exit_execve`, `sys_exit_execveat`).
    pub const EXEC_DONE: &str = "enf_exec_done";
    /// Tracepoint `sched:sched_process_exit`.
    pub const EXIT: &str = "enf_exit";
}

/// Entries of `ENF_POD_PLAINTEXT`: a pod's addresses (each with the
/// listener of its family) over the pods a node runs.
pub const MAX_POD_LISTENERS: u32 = 8192;

/// The key of a local address in `ENF_POD_PLAINTEXT`: the IPv6 address as
/// four 32-bit words in network byte order, an IPv4 one v4-mapped
/// (`::ffff:a.b.c.d`).
pub fn pod_address_key(v6: bool, ip4: u32, ip6: [u32; 4]) -> [u32; 4] {
    if v6 {
        ip6
    } else {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
    }
}

/// Inbound plaintext handling of a protected local port (`ENF_INBOUND` value).
/// `strict`: refused by the agent, dropped by the kernel when the agent is down.
/// `permissive`: forwarded by the agent and audited as unauthenticated.
pub const INBOUND_STRICT: u8 = 1;
pub const INBOUND_PERMISSIVE: u8 = 2;

/// Indexes of the agent's plaintext listeners in `ENF_PLAINTEXT_LISTENERS`.
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;

/// Maximum number of protected inbound ports.
pub const MAX_INBOUND_PORTS: u32 = 4096;

/// Values of a CIDR rule (LPM trie value). The longest matching prefix wins, so
/// an `EXCLUDE` rule inside a `CAPTURE` range carves a hole in it.
pub const CIDR_EXCLUDE: u8 = 0;
pub const CIDR_CAPTURE: u8 = 1;

/// Global capture configuration, the single entry of the `ENF_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// 1 once userspace has filled the rule maps; 0 = capture nothing.
    pub enabled: u32,
    /// `SO_MARK` the agent puts on every socket it connects from and on its
    /// outbound listeners. Setting a mark needs CAP_NET_ADMIN or CAP_NET_RAW
    /// in the socket's network namespace, so an unprivileged workload cannot
    /// carry it. Never a pid: pids are recycled and can be obtained by forking.
    pub agent_mark: u32,
    /// cgroup v2 id of the agent's own cgroup. A connect is the agent's only
    /// when it carries the mark *and* comes from this cgroup.
    pub agent_cgroup_id: u64,
    /// Outbound listener port on the loopback address, host byte order.
    pub outbound_port: u16,
    /// 1: UDP (any datagram socket) to a captured destination is refused,
    /// but on the ports of `ENF_UDP_PASS`; 0: it passes.
    pub udp_refuse: u8,
    pub _pad: [u8; 5],
    /// During a hitless upgrade: the cgroup v2 id of the agent that handed
    /// its listeners over and is draining, when it runs in another cgroup
    /// (a DaemonSet's surge pod); its marked connects are the agent's too
    /// until it exits. 0 = none.
    pub handover_cgroup_id: u64,
}

/// The original destination of a captured connect and the facts the kernel
/// vouches for about the process that made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// [`AF_INET`] or [`AF_INET6`] — the family of `addr` (a v4 destination
    /// reached through a dual-stack IPv6 socket is recorded as [`AF_INET`]).
    pub family: u16,
    /// Original destination port, host byte order.
    pub port: u16,
    /// Process id (kernel tid) and thread-group id (userspace pid).
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The process's last `execve` before the connect, as the kernel
    /// remembered it (a random [`exec_mark`] drawn at that exec; 0: none
    /// remembered, as for a process that exec'd before the agent first
    /// ran). The agent compares it
    /// with the mark after it has read `/proc/<pid>/exe`: a different one
    /// says the process exec'd (or its pid was reused) since the connect,
    /// and the executable it read is not the one that connected. Records of
    /// older programs have 0 here.
    pub exec_mark: u32,
    /// Original destination address in network byte order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
    /// cgroup v2 id of the process (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket.
    pub netns_cookie: u64,
    /// Socket cookie of the workload's socket.
    pub socket_cookie: u64,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
}

/// 4-tuple of the workload's socket as seen from the workload: `src` is the
/// workload's local address, `dst` is the agent's outbound listener.
/// Addresses in network byte order (IPv4 in the first 4 bytes), ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub family: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are `#[repr(C)]`, `Copy`, contain no pointers and no
    // implicit padding (explicit `_pad` fields), so any bit pattern is valid.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockTuple {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<CaptureConfig>(), 4 + 4 + 8 + 2 + 6 + 8);
        assert_eq!(size_of::<OrigDst>(), 2 + 2 + 4 * 5 + 16 + 8 * 3 + 16);
        assert_eq!(size_of::<SockTuple>(), 4 + 2 + 2 + 16 + 16);
    }
}
