//! The listening TCP sockets of a network namespace: the table a local
//! destination's owner is looked up in ([`super::local`]).
//!
//! They are asked of the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`,
//! sock_diag(7)) for listeners only, which walks the listening hash alone.
//! `/proc/net/tcp{,6}` — the fallback, when the kernel has no `inet_diag` —
//! prints every TCP socket of the namespace, established and TIME_WAIT ones
//! too, so reading it costs more the busier the node: at a few thousand new
//! connections a second it was the agents' largest kernel cost on the
//! connect path (bench/README.md "Where the time goes").
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// One listening TCP socket of a network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
}

/// Listening TCP sockets (IPv4 and IPv6) of the calling thread's netns.
/// `proc_net` is that netns's `/proc/…/net` directory, read for a family
/// whose socket diagnostics fail (logged once per agent): on a kernel
/// without IPv6 only the IPv6 dump fails, and only `tcp6` (absent there)
/// is read, not the IPv4 table as well.
pub fn listening(proc_net: &str) -> Vec<Listener> {
    let mut buf = vec![0u8; DUMP_BUF];
    let dumps = match diag_socket() {
        Ok(socket) => FAMILIES.each_ref().map(|f| dump(&socket, f, &mut buf)),
        Err(e) => FAMILIES.map(|_| Err(io::Error::new(e.kind(), e.to_string()))),
    };
    combine(dumps, proc_net)
}

/// Each family's dump, or its `/proc/net` table where the dump failed.
fn combine(dumps: [io::Result<Vec<Listener>>; 2], proc_net: &str) -> Vec<Listener> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let mut out = Vec::new();
    for (family, dumped) in FAMILIES.iter().zip(dumps) {
        match dumped {
            Ok(l) => out.extend(l),
            Err(e) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, family = family.name,
                        "asking the kernel's socket diagnostics (NETLINK_SOCK_DIAG) for listening sockets failed; \
                         reading /proc/net/{} instead, which costs more on a busy node (modprobe tcp_diag)",
                        family.proc_file);
                }
                out.extend(from_proc_file(proc_net, family.proc_file, family.v6));
            }
        }
    }
    out
}

/// A family the listeners are asked for.
struct Family {
    name: &'static str,
    family: u8,
    socket_id: fn() -> SocketId,
    seq: u32,
    proc_file: &'static str,
    v6: bool,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "ipv4",
        family: AF_INET,
        socket_id: SocketId::new_v4,
        seq: 1,
        proc_file: "tcp",
        v6: false,
    },
    Family {
        name: "ipv6",
        family: AF_INET6,
        socket_id: SocketId::new_v6,
        seq: 2,
        proc_file: "tcp6",
        v6: true,
    },
];

fn diag_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// The receive buffer of a dump: one read takes many answers.
const DUMP_BUF: usize = 64 * 1024;

/// The listeners, from `NETLINK_SOCK_DIAG` alone (one dump per family,
/// listening state only), failing rather than falling back.
#[cfg(test)]
fn diag() -> io::Result<Vec<Listener>> {
    let socket = diag_socket()?;
    let mut buf = vec![0u8; DUMP_BUF];
    let mut out = Vec::new();
    for f in &FAMILIES {
        out.extend(dump(&socket, f, &mut buf)?);
    }
    Ok(out)
}

/// One family's listening sockets.
fn dump(socket: &Socket, f: &Family, buf: &mut [u8]) -> io::Result<Vec<Listener>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = f.seq;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: f.family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: (f.socket_id)(),
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut out = Vec::new();
    dump_into(socket, buf, f.seq, &mut out)?;
    Ok(out)
}

/// Reads one dump's answers (until `NLMSG_DONE`) into `out`.
fn dump_into(socket: &Socket, buf: &mut [u8], seq: u32, out: &mut Vec<Listener>) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if size == 0 {
            return Err(bad("the kernel closed the dump".into()));
        }
        let mut chunk = &buf[..size];
        while !chunk.is_empty() {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(chunk)
                .map_err(|e| bad(format!("an undecodable sock_diag answer: {e}")))?;
            let len = msg.header.length as usize;
            if len == 0 || len > chunk.len() {
                return Err(bad(format!("a sock_diag answer of length {len}")));
            }
            if msg.header.sequence_number == seq {
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let id = &r.header.socket_id;
                        out.push(Listener {
                            addr: SocketAddr::new(id.source_address, id.source_port),
                            inode: u64::from(r.header.inode),
                        });
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    _ => {}
                }
            }
            // Messages are aligned to 4 bytes.
            chunk = chunk.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
    }
}

/// The listeners from `<proc_net>/tcp` and `tcp6`.
pub fn from_proc(proc_net: &str) -> Vec<Listener> {
    let mut out = from_proc_file(proc_net, "tcp", false);
    out.extend(from_proc_file(proc_net, "tcp6", true));
    out
}

/// The listeners from `<proc_net>/<file>` (none when it is absent: `tcp6`
/// on a kernel without IPv6).
fn from_proc_file(proc_net: &str, file: &str, v6: bool) -> Vec<Listener> {
    let Ok(text) = std::fs::read_to_string(format!("{proc_net}/{file}")) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| parse_line(l, v6))
        .collect()
}

const TCP_LISTEN: &str = "0A";

/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode`
fn parse_line(line: &str, v6: bool) -> Option<Listener> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || f[3] != TCP_LISTEN {
        return None;
    }
    let (hex_ip, hex_port) = f[1].rsplit_once(':')?;
    let port = u16::from_str_radix(hex_port, 16).ok()?;
    let ip = parse_hex_ip(hex_ip, v6)?;
    let inode = f[9].parse::<u64>().ok().filter(|i| *i != 0)?;
    Some(Listener {
        addr: SocketAddr::new(ip, port),
        inode,
    })
}

/// The kernel prints addresses as 32-bit words in host byte order.
fn parse_hex_ip(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    if v6 {
        if hex.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        if hex.len() != 8 {
            return None;
        }
        Some(IpAddr::V4(Ipv4Addr::from(word(0)?)))
    }
}

/// A listener for tests: `addr` parsed, `inode`.
#[cfg(test)]
pub(crate) fn l(addr: &str, inode: u64) -> Listener {
    Listener {
        addr: addr.parse().expect("addr"),
        inode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_whose_dump_fails_is_read_from_its_proc_file_alone() {
        // A kernel without IPv6: the IPv6 dump fails, the IPv4 one does not.
        // Only `tcp6` is read (absent there), not the IPv4 table as well.
        let dir = std::env::temp_dir().join(format!("enforcer-listeners-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n";
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n";
        std::fs::write(dir.join("tcp"), format!("{head}{v4}")).expect("tcp");
        let proc_net = dir.display().to_string();
        let dumped = l("10.0.0.1:80", 1);
        let failed = || Err(io::Error::from_raw_os_error(libc::ENOENT));
        // No tcp6 file (IPv6 off): the IPv4 dump alone.
        assert_eq!(
            combine([Ok(vec![dumped]), failed()], &proc_net),
            vec![dumped]
        );
        std::fs::write(dir.join("tcp6"), format!("{head}{v6}")).expect("tcp6");
        assert_eq!(
            combine([Ok(vec![dumped]), failed()], &proc_net),
            vec![dumped, l("[::1]:8080", 777)]
        );
        // No diagnostics at all: both files.
        assert_eq!(
            combine([failed(), failed()], &proc_net),
            vec![l("127.0.0.1:8080", 12345), l("[::1]:8080", 777)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_lines_parse_addresses_in_host_order() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_line(v4, false), Some(l("127.0.0.1:8080", 12345)));
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_line(v6, true), Some(l("[::1]:8080", 777)));
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_line(&established, false), None);
    }

    /// The socket diagnostics and `/proc/net/tcp{,6}` name the same
    /// listeners — IPv4, dual-stack and IPv6-only ones, with their inodes —
    /// and neither names a connected socket.
    #[test]
    fn socket_diagnostics_agree_with_proc() {
        use std::os::fd::AsRawFd;
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let any6 = std::net::TcpListener::bind("[::]:0").expect("bind [::] (IPv6 on lo)");
        let lo6 = std::net::TcpListener::bind("[::1]:0").expect("bind [::1]");
        // A connected socket and its accepted end are not listeners.
        let client = std::net::TcpStream::connect(v4.local_addr().expect("addr")).expect("connect");
        let (server, _) = v4.accept().expect("accept");
        let inode = |fd: i32| -> u64 {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
            let s = link.to_string_lossy();
            s.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse()
                .expect("a socket inode")
        };
        let diag = diag().expect(
            "NETLINK_SOCK_DIAG answers for listening sockets (kernel with CONFIG_INET_DIAG and tcp_diag: modprobe tcp_diag)",
        );
        let proc = from_proc("/proc/self/net");
        for (sock, fd) in [
            (&v4, v4.as_raw_fd()),
            (&any6, any6.as_raw_fd()),
            (&lo6, lo6.as_raw_fd()),
        ] {
            let want = Listener {
                addr: sock.local_addr().expect("addr"),
                inode: inode(fd),
            };
            assert!(diag.contains(&want), "{want:?} not in {diag:?}");
            assert!(proc.contains(&want), "{want:?} not in {proc:?}");
        }
        for fd in [client.as_raw_fd(), server.as_raw_fd()] {
            let i = inode(fd);
            assert!(
                diag.iter().all(|l| l.inode != i),
                "connected socket {i} listed"
            );
        }
    }
}
