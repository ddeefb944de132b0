//! Kernel side of enforcer: small and dumb. It rewrites captured TCP connects to
//! the agent's loopback listener and records what the kernel knows about them;
//! every decision beyond "does this destination match the capture rules" is
//! made in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_tuple,
    bindings::{BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_prandom_u32,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops, tracepoint},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext},
};
use enforcer_common::{
    AF_INET, AF_INET6, CIDR_CAPTURE, COUNTER_UDP_REFUSED, COUNTERS, CaptureConfig, INBOUND_STRICT,
    LISTENER_V4, LISTENER_V6, MAX_CIDRS, MAX_EXEC_TRACKED, MAX_INBOUND_PORTS, MAX_NETNS,
    MAX_POD_LISTENERS, MAX_TRACKED, OrigDst, PORT_WORDS, SockTuple, exec_mark, exec_mark_under_way,
    pod_address_key,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Allow the syscall (cgroup sock_addr programs: 1 = proceed).
const PROCEED: i32 = 1;

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_TCP_CLOSE: u32 = 7;

#[map(name = "ENF_CONFIG")]
static ENF_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Bitmap of captured destination ports (bit set = capture).
#[map(name = "ENF_PORTS")]
static ENF_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// Per-CPU counts of what the programs refused (`COUNTER_*`), summed by
/// the agent for its metrics.
#[map(name = "ENF_COUNTERS")]
static ENF_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = ENF_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot, which only this program run touches now.
        unsafe { *n += 1 };
    }
}

/// Bit per destination port whose UDP passes even to a captured destination
/// (DNS), when `CaptureConfig::udp_refuse` is set.
#[map(name = "ENF_UDP_PASS")]
static ENF_UDP_PASS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map(name = "ENF_CIDR4")]
static ENF_CIDR4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "ENF_CIDR6")]
static ENF_CIDR6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

/// Network namespaces (by cookie) in which the agent has an outbound listener.
/// A socket in any other netns is never redirected: there would be nothing to
/// accept it. A plain hash, not an LRU: an LRU may evict an entry before it
/// is full, and an evicted netns would no longer be captured. Full, it
/// refuses the agent's insert (the pod is not served: its ADD fails).
#[map(name = "ENF_NETNS")]
static ENF_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_NETNS, 0);

/// Workload socket cookie -> original destination (for getpeername and sock_ops).
#[map(name = "ENF_BY_COOKIE")]
static ENF_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_TRACKED, 0);

/// Workload socket 4-tuple -> original destination (read by the agent on accept).
#[map(name = "ENF_BY_TUPLE")]
static ENF_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::with_max_entries(MAX_TRACKED, 0);

/// Thread group id -> a random mark of its last `execve`, never 0 (an
/// LRU: the least recently used go when it is full; where the kernel
/// says when a process's last thread exits, its entry goes then). A
/// connect's record carries its process's mark ([`OrigDst::exec_mark`]),
/// which the agent compares after reading `/proc/<pid>/exe`: a program that
/// connects, writes and then execs a trusted executable is not attested as
/// that executable.
///
/// Each exec draws two marks: one as it begins, before the old program's
/// other threads are ended and the executable is replaced, with
/// [`enforcer_common::EXEC_UNDER_WAY`] set; one when the new program runs
/// (or the exec failed and the old one goes on), without. So a connect made
/// before the exec records a mark that differs from any the agent reads
/// once the executable is replaced, and one made by the old program's
/// other threads while the exec runs records the bit.
#[map(name = "ENF_EXECS")]
static ENF_EXECS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(MAX_EXEC_TRACKED, 0);

/// An exec begins: a mark with [`enforcer_common::EXEC_UNDER_WAY`] for the
/// calling process. Attached to `sched:sched_prepare_exec` (the exec's
/// point of no return, which every way into it passes: `execve`,
/// `execveat`, the 32-bit system calls) where the kernel has it (6.10 and
/// later), else to `syscalls:sys_enter_execve` and `sys_enter_execveat`
/// (which do not see the 32-bit system calls). Random, not a time: a
/// process cannot time an exec so that its mark comes out as before.
#[tracepoint]
pub fn enf_exec_begins(_ctx: TracePointContext) -> u32 {
    set_exec_mark(exec_mark_under_way);
    0
}

/// An exec is done: a mark without the bit. Attached to
/// `sched:sched_process_exec` (the new program runs: the other threads are
/// gone, the executable replaced), and where the exec's beginning is seen
/// at the system call, to `syscalls:sys_exit_execve` and
/// `sys_exit_execveat` too (an exec that failed leaves the old program
/// running, with its executable).
#[tracepoint]
pub fn enf_exec_done(_ctx: TracePointContext) -> u32 {
    set_exec_mark(exec_mark);
    0
}

#[inline(always)]
fn set_exec_mark(mark: fn(u32) -> u32) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain helper call without arguments.
    let _ = ENF_EXECS.insert(tgid, mark(unsafe { bpf_get_prandom_u32() }), 0);
}

/// Offset of `group_dead` in `sched:sched_process_exit`'s record (the agent
/// attaches [`enf_exit`] only where the tracepoint's format says so).
const EXIT_GROUP_DEAD: usize = 32;

/// `sched:sched_process_exit`: when a process's last thread exits, its
/// entry goes, so its pid, when reused, starts without one. (Not on the
/// exit of a thread group's leader alone: an exec from another thread ends
/// the leader first, and the exec's mark must stay.)
#[tracepoint]
pub fn enf_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: a field of the tracepoint's record, at the offset its format
    // gives (checked by the agent before attaching).
    let group_dead: u8 = unsafe { ctx.read_at(EXIT_GROUP_DEAD) }.unwrap_or(0);
    if group_dead != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = ENF_EXECS.remove(tgid);
    }
    0
}

/// The calling process's [`OrigDst::exec_mark`].
#[inline(always)]
fn current_exec_mark(tgid: u32) -> u32 {
    // SAFETY: the value is read by copy.
    unsafe { ENF_EXECS.get(tgid) }.map_or(0, |m| *m)
}

#[inline(always)]
fn config() -> Option<CaptureConfig> {
    let cfg = ENF_CONFIG.get(0)?;
    if cfg.enabled == 0 {
        return None;
    }
    Some(*cfg)
}

#[inline(always)]
fn port_captured(port: u16) -> bool {
    port_in(&ENF_PORTS, port)
}

#[inline(always)]
fn port_in(bitmap: &Array<u64>, port: u16) -> bool {
    match bitmap.get(u32::from(port) >> 6) {
        Some(word) => (*word >> (port & 63)) & 1 == 1,
        None => false,
    }
}

/// Whether a datagram (UDP) connect or send to `port` may be refused: a
/// datagram socket, capture on and set to refuse UDP, not the agent's, a
/// captured port that is not one of the UDP ports let through, in a served
/// network namespace. The caller checks the address. The agent relays TCP
/// only: UDP to a destination the rules capture would go around it —
/// QUIC (HTTP/3) to a model's API past every per-request decision — so it
/// is refused (EPERM), and clients that can fall back to TCP do.
#[inline(always)]
fn datagram_to_refuse(ctx: &SockAddrContext, sa: &bpf_sock_addr, port: u16) -> bool {
    if sa.type_ != SOCK_DGRAM {
        return false;
    }
    let Some(cfg) = config() else {
        return false;
    };
    if cfg.udp_refuse == 0 || is_agent(sa, &cfg) || !port_captured(port) {
        return false;
    }
    if port_in(&ENF_UDP_PASS, port) {
        return false;
    }
    // SAFETY: helper allowed for sock_addr programs; ctx is the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only tests for presence.
    unsafe { ENF_NETNS.get(netns) }.is_some()
}

/// The verdict on a datagram to an IPv4 destination (`sa.user_ip4`).
#[inline(always)]
fn datagram4(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> i32 {
    let port = u16::from_be(sa.user_port as u16);
    if datagram_to_refuse(ctx, sa, port) && v4_captured(sa.user_ip4.to_ne_bytes()) {
        count(COUNTER_UDP_REFUSED);
        PROCEED_REFUSED
    } else {
        PROCEED
    }
}

/// An IPv6 address as the context gives it (four words in network order)
/// as its 16 bytes.
#[inline(always)]
fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut ip = [0u8; 16];
    ip[0..4].copy_from_slice(&w[0].to_ne_bytes());
    ip[4..8].copy_from_slice(&w[1].to_ne_bytes());
    ip[8..12].copy_from_slice(&w[2].to_ne_bytes());
    ip[12..16].copy_from_slice(&w[3].to_ne_bytes());
    ip
}

/// `::ffff:a.b.c.d` (the context's four words).
#[inline(always)]
fn v4_mapped(w: [u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An IPv6 destination the CIDR rules capture (never `::1`, as
/// [`v4_captured`] never loopback).
#[inline(always)]
fn v6_captured(ip: [u8; 16]) -> bool {
    ip != LOOPBACK6 && matches!(ENF_CIDR6.get(Key::new(128, ip)), Some(v) if *v == CIDR_CAPTURE)
}

/// `::1` or `::`: this host.
#[inline(always)]
fn local6(ip: [u8; 16]) -> bool {
    ip[..15] == [0; 15] && ip[15] <= 1
}

/// The verdict on a datagram to an IPv6 destination (`sa.user_ip6`; a
/// v4-mapped one by the IPv4 rules, `::1` never).
#[inline(always)]
fn datagram6(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> i32 {
    let port = u16::from_be(sa.user_port as u16);
    if !datagram_to_refuse(ctx, sa, port) {
        return PROCEED;
    }
    let w = sa.user_ip6;
    let ip = ip6_bytes(w);
    let captured = if v4_mapped(w) {
        v4_captured([ip[12], ip[13], ip[14], ip[15]])
    } else {
        v6_captured(ip)
    };
    if captured {
        count(COUNTER_UDP_REFUSED);
        PROCEED_REFUSED
    } else {
        PROCEED
    }
}

/// UDP sent to an address on an unconnected socket (`sendto`, `sendmsg`,
/// `sendmmsg`, io_uring): the same rule as a UDP connect.
#[cgroup_sock_addr(sendmsg4)]
pub fn enf_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    datagram4(&ctx, sa)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enf_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    datagram6(&ctx, sa)
}

/// Facts about the calling process, common to both families.
#[inline(always)]
fn record(ctx: &SockAddrContext, family: u16, port: u16, addr: [u8; 16]) -> OrigDst {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: helpers allowed for cgroup sock_addr programs; ctx is the program's context.
    let (netns_cookie, socket_cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    OrigDst {
        family,
        port,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        exec_mark: current_exec_mark((pid_tgid >> 32) as u32),
        addr,
        // SAFETY: plain helper call without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie,
        socket_cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Common checks: TCP, capture enabled, not the agent itself, port captured,
/// netns served by the agent.
#[inline(always)]
fn eligible(ctx: &SockAddrContext, sa: &bpf_sock_addr, port: u16) -> Option<CaptureConfig> {
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    let cfg = config()?;
    if is_agent(sa, &cfg) {
        return None;
    }
    if !port_captured(port) {
        return None;
    }
    // SAFETY: helper allowed for sock_addr programs; ctx is the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only tests for presence.
    unsafe { ENF_NETNS.get(netns) }?;
    Some(cfg)
}

/// The agent's own sockets: they carry its mark (setting one needs
/// CAP_NET_ADMIN or CAP_NET_RAW) and are connected from its cgroup. Nothing
/// here is a pid, which a workload could obtain by forking after the agent died.
#[inline(always)]
fn is_agent(sa: &bpf_sock_addr, cfg: &CaptureConfig) -> bool {
    // SAFETY: `sk` of a sock_addr context is a valid socket pointer.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: as above; `mark` is readable from any bpf_sock.
    let mark = unsafe { (*sk).mark };
    if mark != cfg.agent_mark {
        return false;
    }
    // SAFETY: plain helper call without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    cgroup == cfg.agent_cgroup_id
        || (cfg.handover_cgroup_id != 0 && cgroup == cfg.handover_cgroup_id)
}

/// `netns` argument of the socket lookup helpers: the caller's namespace.
const BPF_F_CURRENT_NETNS: u64 = u64::MAX;

/// Whether the listener a redirected connect would reach is the agent's (it
/// carries the agent's mark). When the agent is gone, an unprivileged
/// workload could bind the loopback port itself and receive every other
/// workload's captured connections; with no listener, or another one, the
/// connect is refused instead.
#[inline(always)]
fn agents_listener(
    ctx: &SockAddrContext,
    tuple: &mut bpf_sock_tuple,
    size: u32,
    mark: u32,
) -> bool {
    // SAFETY: the tuple lives on this stack frame for the call; the returned
    // socket is released on every path.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS, 0);
        if sk.is_null() {
            return false;
        }
        let ours = (*sk).mark == mark;
        bpf_sk_release(sk.cast());
        ours
    }
}

#[inline(always)]
fn agents_listener4(ctx: &SockAddrContext, cfg: &CaptureConfig) -> bool {
    // SAFETY: plain data; every field is written below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Writing a union member is safe; reading one is not.
    tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes([127, 0, 0, 1]);
    tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes([127, 0, 0, 1]);
    tuple.__bindgen_anon_1.ipv4.sport = 0;
    tuple.__bindgen_anon_1.ipv4.dport = cfg.outbound_port.to_be();
    let size =
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
    agents_listener(ctx, &mut tuple, size as u32, cfg.agent_mark)
}

#[inline(always)]
fn agents_listener6(ctx: &SockAddrContext, cfg: &CaptureConfig) -> bool {
    // SAFETY: plain data; every field is written below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let loopback = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    // Writing a union member is safe; reading one is not.
    tuple.__bindgen_anon_1.ipv6.saddr = loopback;
    tuple.__bindgen_anon_1.ipv6.daddr = loopback;
    tuple.__bindgen_anon_1.ipv6.sport = 0;
    tuple.__bindgen_anon_1.ipv6.dport = cfg.outbound_port.to_be();
    let size =
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
    agents_listener(ctx, &mut tuple, size as u32, cfg.agent_mark)
}

/// A loopback (or unspecified: `0.0.0.0`, `::`, which the kernel connects
/// to this host) destination on a protected port (`ENF_INBOUND`): a server
/// of this node, which a captured workload reaches through the agent like
/// at the node's own address. Loopback is otherwise never captured (the
/// agent's listeners, local helpers).
#[inline(always)]
fn protected_loopback(port: u16) -> bool {
    // SAFETY: only tests for presence.
    unsafe { ENF_INBOUND.get(port) }.is_some()
}

/// `127.0.0.0/8` or `0.0.0.0`: this host.
#[inline(always)]
fn local4(addr: [u8; 4]) -> bool {
    addr[0] == 127 || addr == [0; 4]
}

#[inline(always)]
fn v4_captured(addr: [u8; 4]) -> bool {
    if addr[0] == 127 {
        return false; // loopback is never captured: the listener itself lives there
    }
    matches!(ENF_CIDR4.get(Key::new(32, addr)), Some(v) if *v == CIDR_CAPTURE)
}

#[cgroup_sock_addr(connect4)]
pub fn enf_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ == SOCK_DGRAM {
        return datagram4(&ctx, sa);
    }
    let port = u16::from_be(sa.user_port as u16);
    let Some(cfg) = eligible(&ctx, sa, port) else {
        return PROCEED;
    };
    let ip = sa.user_ip4.to_ne_bytes(); // user_ip4 is in network byte order
    if !(v4_captured(ip) || local4(ip) && protected_loopback(port)) {
        return PROCEED;
    }
    if !agents_listener4(&ctx, &cfg) {
        return PROCEED_REFUSED;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    let rec = record(&ctx, AF_INET, port, addr);
    if ENF_BY_COOKIE.insert(rec.socket_cookie, rec, 0).is_err() {
        return PROCEED_REFUSED;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    PROCEED
}

/// Verdict that makes connect() fail with EPERM: used when the record cannot be
/// stored or the agent's listener is not there, so a connect we should capture
/// never goes around the agent.
const PROCEED_REFUSED: i32 = 0;

#[cgroup_sock_addr(connect6)]
pub fn enf_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ == SOCK_DGRAM {
        return datagram6(&ctx, sa);
    }
    let port = u16::from_be(sa.user_port as u16);
    let Some(cfg) = eligible(&ctx, sa, port) else {
        return PROCEED;
    };
    let w = sa.user_ip6;
    let ip = ip6_bytes(w);

    let mapped = v4_mapped(w);
    let rec = if mapped {
        let v4 = [ip[12], ip[13], ip[14], ip[15]];
        if !(v4_captured(v4) || local4(v4) && protected_loopback(port)) {
            return PROCEED;
        }
        if !agents_listener4(&ctx, &cfg) {
            return PROCEED_REFUSED;
        }
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&v4);
        record(&ctx, AF_INET, port, addr)
    } else {
        if !(v6_captured(ip) || local6(ip) && protected_loopback(port)) {
            return PROCEED;
        }
        if !agents_listener6(&ctx, &cfg) {
            return PROCEED_REFUSED;
        }
        record(&ctx, AF_INET6, port, ip)
    };
    if ENF_BY_COOKIE.insert(rec.socket_cookie, rec, 0).is_err() {
        return PROCEED_REFUSED;
    }
    if mapped {
        sa.user_ip6 = [0, 0, w[2], u32::from_ne_bytes([127, 0, 0, 1])];
    } else {
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
    sa.user_port = u32::from(cfg.outbound_port.to_be());
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn enf_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper allowed for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU entries are read by value right away.
    if let Some(rec) = unsafe { ENF_BY_COOKIE.get(cookie) }
        && rec.family == AF_INET
    {
        sa.user_ip4 = u32::from_ne_bytes([rec.addr[0], rec.addr[1], rec.addr[2], rec.addr[3]]);
        sa.user_port = u32::from(rec.port.to_be());
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn enf_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper allowed for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU entries are read by value right away.
    if let Some(rec) = unsafe { ENF_BY_COOKIE.get(cookie) } {
        let a = rec.addr;
        if rec.family == AF_INET {
            sa.user_ip6 = [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            ];
        } else {
            sa.user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        }
        sa.user_port = u32::from(rec.port.to_be());
    }
    PROCEED
}

/// `bpf_sock_ops.remote_port` holds the network-order port in the upper 16 bits
/// on little-endian hosts (the kernel shifts it there) and the lower 16 bits on
/// big-endian ones.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    if cfg!(target_endian = "little") {
        u16::from_be((raw >> 16) as u16)
    } else {
        raw as u16
    }
}

/// Publishes the record under the socket's 4-tuple once the captured connect is
/// established (the agent finds it from the accepted socket), and forgets it when
/// the socket closes.
#[sock_ops]
pub fn enf_sock_ops(ctx: SockOpsContext) -> u32 {
    // Every context field is read once, up front and unconditionally: the
    // verifier only accepts context loads at a constant offset from the context
    // pointer, and reads under branches let LLVM share a computed address.
    let op = ctx.op();
    let family = ctx.family();
    let local4 = ctx.local_ip4();
    let remote4 = ctx.remote_ip4();
    let local6 = ctx.local_ip6();
    let remote6 = ctx.remote_ip6();
    let local_port = ctx.local_port();
    let remote_port_raw = ctx.remote_port();
    let new_state = ctx.arg(1);
    // SAFETY: helper allowed for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };

    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // A captured connect is under way (its record stored): be told when
        // the socket closes, also if it never connects (the agent's backlog
        // full, a timeout), so its record does not outlive it.
        // SAFETY: only tests for presence.
        if unsafe { ENF_BY_COOKIE.get(cookie) }.is_some() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the record is copied out immediately.
        let Some(rec) = (unsafe { ENF_BY_COOKIE.get(cookie) }) else {
            return 1;
        };
        let rec = *rec;
        let mut key = SockTuple {
            family,
            src_port: local_port as u16,
            dst_port: remote_port(remote_port_raw),
            src: [0; 16],
            dst: [0; 16],
        };
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if family == u32::from(AF_INET) {
            key.src[..4].copy_from_slice(&local4.to_ne_bytes());
            key.dst[..4].copy_from_slice(&remote4.to_ne_bytes());
        } else if remote6[0] == 0 && remote6[1] == 0 && remote6[2] == mapped {
            // A dual-stack socket that connected to a v4-mapped address: the
            // agent's IPv4 listener accepted it and sees IPv4 addresses.
            key.family = u32::from(AF_INET);
            key.src[..4].copy_from_slice(&local6[3].to_ne_bytes());
            key.dst[..4].copy_from_slice(&remote6[3].to_ne_bytes());
        } else {
            key.src = words_to_bytes(local6);
            key.dst = words_to_bytes(remote6);
        }
        let _ = ENF_BY_TUPLE.insert(key, rec, 0);
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if op == BPF_SOCK_OPS_STATE_CB && new_state == BPF_TCP_CLOSE {
        let _ = ENF_BY_COOKIE.remove(cookie);
    }
    1
}

/// Forgets a socket's record when the workload releases it (its last file
/// descriptor closed, or its process gone), whatever happened to its
/// connect: one that failed before the handshake (no local port free:
/// `EADDRNOTAVAIL`) never gets the state callback above, and its record
/// would otherwise stay until the LRU evicted it — a workload could evict
/// others' records at will.
#[cgroup_sock(sock_release)]
pub fn enf_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    if unsafe { (*ctx.sock).type_ } == SOCK_STREAM {
        // SAFETY: helper allowed for cgroup sock programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = ENF_BY_COOKIE.remove(cookie);
    }
    PROCEED
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Protected local ports (host order) -> INBOUND_STRICT | INBOUND_PERMISSIVE.
#[map(name = "ENF_INBOUND")]
static ENF_INBOUND: HashMap<u16, u8> = HashMap::with_max_entries(MAX_INBOUND_PORTS, 0);

/// The agent's plaintext listeners (index LISTENER_V4, LISTENER_V6).
#[map(name = "ENF_PLAINTEXT_LISTENERS")]
static ENF_PLAINTEXT_LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

/// The agent's plaintext listeners inside pods' network namespaces, by the
/// pod address a connection arrives on (see `pod_address_key`).
#[map(name = "ENF_POD_PLAINTEXT")]
static ENF_POD_PLAINTEXT: SockHash<[u32; 4]> = SockHash::with_max_entries(MAX_POD_LISTENERS, 0);

/// A new inbound connection that the steering programs look at: TCP to a
/// protected port, from outside the netns (not over loopback, not from a
/// loopback source). Its mode and whether it is IPv4, and the key of its
/// local address.
#[inline(always)]
fn steered(ctx: &SkLookupContext) -> Option<(u8, bool, [u32; 4])> {
    // SAFETY: the context pointer is valid for the duration of the program.
    let (protocol, family, port, ifindex, remote4, remote6, local4, local6) = unsafe {
        let l = &*ctx.lookup;
        (
            l.protocol,
            l.family,
            l.local_port,
            l.ingress_ifindex,
            l.remote_ip4,
            l.remote_ip6,
            l.local_ip4,
            l.local_ip6,
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return None;
    }
    let v4 = family == u32::from(AF_INET);
    // A loopback source is local: the agent's own forwards to the workload
    // (it connects from 127.0.0.1 / ::1) and local clients.
    let loopback = if v4 {
        remote4.to_ne_bytes()[0] == 127
    } else {
        remote6 == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    };
    if loopback {
        return None;
    }
    // SAFETY: read by value.
    let mode = (unsafe { ENF_INBOUND.get(port as u16) }).copied()?;
    Some((mode, v4, pod_address_key(!v4, local4, local6)))
}

/// Steers new inbound TCP connections to protected ports, arriving from
/// outside the node, to the agent's plaintext listener. Connections that come
/// over loopback (the agent's own forwards, local clients) are left alone.
#[sk_lookup]
pub fn enf_sk_lookup(ctx: SkLookupContext) -> u32 {
    let Some((mode, v4, _)) = steered(&ctx) else {
        return SK_PASS;
    };
    let index = if v4 { LISTENER_V4 } else { LISTENER_V6 };
    match ENF_PLAINTEXT_LISTENERS.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => SK_PASS,
        // The agent is not listening: a strict port fails closed.
        Err(_) if mode == INBOUND_STRICT => SK_DROP,
        Err(_) => SK_PASS,
    }
}

/// [`enf_sk_lookup`] in a pod's netns: to the agent's plaintext listener in
/// that pod, found by the address the connection arrived on.
#[sk_lookup]
pub fn enf_sk_lookup_pod(ctx: SkLookupContext) -> u32 {
    let Some((mode, _, key)) = steered(&ctx) else {
        return SK_PASS;
    };
    match ENF_POD_PLAINTEXT.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) if mode == INBOUND_STRICT => SK_DROP,
        Err(_) => SK_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
