//! Faults: an agent killed mid-transfer, a relay that must never end as if
//! complete when it did not, the agent's own forwards under port pressure.
//! Real agents, real workloads (tests/helpers/stream.py), real kernels'
//! resets.
use std::time::{Duration, Instant};

use enforcer_tests::{
    MESH, Node, PY_CONNECTS, Pair, SUPPORT_AGENT_ID, SUPPORT_LLM_ID, SUPPORT_TD, Testbed, entry,
    llm_pair, start_llm_http, stream_py, support_mesh,
};

const TD: &str = SUPPORT_TD;
const AGENT_ID: &str = SUPPORT_AGENT_ID;
const LLM_ID: &str = SUPPORT_LLM_ID;

fn mesh(test: &str) -> Pair {
    mesh_with(test, "")
}

fn mesh_with(test: &str, mesh_b: &str) -> Pair {
    support_mesh(test, mesh_b).expect("two nodes")
}

#[derive(Clone, Copy)]
enum Way {
    /// The server sends until its connection fails; the client reads.
    Download,
    /// The client sends until its connection fails; the server reads.
    Upload,
}

/// An endless transfer from a client in `client`'s support-agent.service to
/// a server on `server`:`port` (in llm.service), in the background; returns
/// once 1 MiB has arrived at the receiving end. The logs are `<node>-server-<port>` and
/// `<node>-client-<port>`.
fn start_transfer(tb: &mut Testbed, server: &Node, client: &Node, port: u16, way: Way) {
    let (serve, run) = match way {
        Way::Download => ("serve-download", "download"),
        Way::Upload => ("serve-upload", "upload"),
    };
    let port_s = port.to_string();
    let py = stream_py();
    tb.start_server_in(
        server,
        Some("llm.service"),
        &format!("server-{port}"),
        &["python3", "-u", &py, serve, &port_s],
        port,
    )
    .expect("stream server");
    tb.spawn(
        client,
        Some("support-agent.service"),
        &format!("client-{port}"),
        &["python3", "-u", &py, run, &server.ipv4, &port_s],
    )
    .expect("stream client");
    // The receiving side says when 1 MiB has arrived.
    let (receiver, log) = match way {
        Way::Download => (client, format!("client-{port}")),
        Way::Upload => (server, format!("server-{port}")),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !tb.server_log(receiver, &log).contains("STARTED") {
        assert!(
            Instant::now() < deadline,
            "the transfer to {}:{port} never started: client: {} server: {}",
            server.name,
            tb.server_log(client, &format!("client-{port}")),
            tb.server_log(server, &format!("server-{port}"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the side logging to `<node>-<name>` saw its connection end (`EOF n`,
/// `RESET n` or `TIMEOUT n`), waiting for it up to 40 s.
fn ending(tb: &Testbed, node: &Node, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let log = tb.server_log(node, name);
        if let Some(line) = log.lines().find(|l| {
            ["EOF ", "RESET ", "TIMEOUT "]
                .iter()
                .any(|k| l.starts_with(k))
        }) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{name} on {} never saw its connection end: {log}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_reset(tb: &Testbed, node: &Node, name: &str, what: &str) {
    let end = ending(tb, node, name);
    assert!(
        end.starts_with("RESET"),
        "{what}: {name} on {} must see ECONNRESET, never a clean end: it saw {end}",
        node.name
    );
}

#[test]
fn killed_client_agent_resets_a_download() {
    // The failure: a's agent kill -9'ed mid-download; the kernel closed its
    // socket to the workload with a FIN, and the workload saw a clean EOF —
    // a download that stopped looked complete.
    let mut m = mesh("killclientdl");
    start_transfer(&mut m.tb, &m.b, &m.a, 9601, Way::Download);
    m.tb.kill(m.ea.pid).expect("kill -9 a's agent");
    assert_reset(&m.tb, &m.a, "client-9601", "a's agent died mid-download");
}

#[test]
fn killed_server_agent_resets_a_download() {
    let mut m = mesh("killserverdl");
    start_transfer(&mut m.tb, &m.b, &m.a, 9602, Way::Download);
    m.tb.kill(m.eb.pid).expect("kill -9 b's agent");
    assert_reset(&m.tb, &m.a, "client-9602", "b's agent died mid-download");
    // And the server's sends fail: its connection was reset too.
    assert_reset(&m.tb, &m.b, "server-9602", "b's agent died mid-download");
}

#[test]
fn killed_client_agent_resets_an_upload() {
    let mut m = mesh("killclientul");
    start_transfer(&mut m.tb, &m.b, &m.a, 9603, Way::Upload);
    m.tb.kill(m.ea.pid).expect("kill -9 a's agent");
    assert_reset(&m.tb, &m.b, "server-9603", "a's agent died mid-upload");
    assert_reset(&m.tb, &m.a, "client-9603", "a's agent died mid-upload");
}

#[test]
fn killed_server_agent_resets_an_upload() {
    // The failure: b's agent kill -9'ed mid-upload; the server read a clean
    // EOF, an upload cut short taken as a whole one.
    let mut m = mesh("killserverul");
    start_transfer(&mut m.tb, &m.b, &m.a, 9604, Way::Upload);
    m.tb.kill(m.eb.pid).expect("kill -9 b's agent");
    assert_reset(&m.tb, &m.b, "server-9604", "b's agent died mid-upload");
}

#[test]
fn killed_agent_resets_both_ends_on_one_node() {
    // Same node: client and server both on a, one agent between them.
    let mut m = mesh("killsamenode");
    let a = m.a.clone();
    start_transfer(&mut m.tb, &a, &a, 9605, Way::Download);
    start_transfer(&mut m.tb, &a, &a, 9606, Way::Upload);
    m.tb.kill(m.ea.pid).expect("kill -9 a's agent");
    assert_reset(&m.tb, &a, "client-9605", "the agent died mid-download");
    assert_reset(&m.tb, &a, "server-9605", "the agent died mid-download");
    assert_reset(&m.tb, &a, "server-9606", "the agent died mid-upload");
    assert_reset(&m.tb, &a, "client-9606", "the agent died mid-upload");
}

#[test]
fn finished_transfers_end_cleanly_and_whole() {
    // The other half of the rule: a relay whose sides really ended ends
    // with a FIN after the last byte, on every path (the reset armed for
    // a dying agent is disarmed, never discarding what is still unsent).
    let mut m = mesh("cleanend");
    let py = stream_py();
    const N: &str = "33554432";
    let a = m.a.clone();
    for (server, port) in [(m.b.clone(), 9611u16), (a.clone(), 9612)] {
        let p = port.to_string();
        let name = format!("bytes-{port}");
        let serve = ["python3", "-u", &py, "serve-bytes", &p, N];
        m.tb.start_server_in(&server, Some("llm.service"), &name, &serve, port)
            .expect("server");
        let (_, out) = a
            .exec(
                Some("support-agent.service"),
                &["python3", "-u", &py, "download", &server.ipv4, &p],
            )
            .expect("download");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("EOF {N}")),
            "download from {}: every byte, then a clean end: {text}",
            server.name
        );
        let up_port = port + 10;
        let up = up_port.to_string();
        let name = format!("upload-{up_port}");
        let serve = ["python3", "-u", &py, "serve-upload", &up];
        m.tb.start_server_in(&server, Some("llm.service"), &name, &serve, up_port)
            .expect("server");
        a.exec(
            Some("support-agent.service"),
            &["python3", "-u", &py, "upload-bytes", &server.ipv4, &up, N],
        )
        .expect("upload");
        let end = ending(&m.tb, &server, &name);
        assert_eq!(
            end,
            format!("EOF {N}"),
            "upload to {}: every byte, then a clean end",
            server.name
        );
    }
}

/// Opens one connection per PORT to HOST, each from its own fixed source
/// port, reads each to its end and keeps it open; prints `PORT:EOF n` or
/// `PORT:ERR errno` for each.
const PY_HOLD_EACH: &str = r#"
import socket, sys
host, out, held = sys.argv[1], [], []
for i, port in enumerate(sys.argv[2:]):
    s = socket.socket()
    s.bind(("0.0.0.0", 50001 + i))
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        s.sendall(b"GO")
        n = 0
        while True:
            d = s.recv(65536)
            if not d:
                break
            n += len(d)
        out.append(f"{port}:EOF {n}")
    except OSError as e:
        out.append(f"{port}:ERR {e.errno}")
    held.append(s)
print(" ".join(out))
"#;

#[test]
fn agent_forwards_take_no_port_of_their_own() {
    // The failure: the agent bound 127.0.0.1:0 before each connect to a
    // local workload, so each forward held a port of the range against
    // every other socket, TIME_WAIT ones included: after ~30 000
    // connections each bind scanned the range (~100 connections/s), and
    // with the range used up forwards failed. Shown here with the range
    // narrowed to two ports: a third concurrent forward, to another
    // destination, must still get through (the 4-tuple differs).
    let mut m = mesh("noport");
    let a = m.a.clone();
    let py = stream_py();
    let ports = ["9621", "9622", "9623"];
    for p in ports {
        let port: u16 = p.parse().expect("port");
        let serve = ["python3", "-u", &py, "serve-bytes", p, "1000"];
        m.tb.start_server_in(&a, Some("llm.service"), &format!("bytes-{p}"), &serve, port)
            .expect("server");
    }
    set_port_range(&a, "40000 40001");
    let mut cmd = vec!["python3", "-c", PY_HOLD_EACH, a.ipv4.as_str()];
    cmd.extend(ports);
    let (_, out) = a
        .exec(Some("support-agent.service"), &cmd)
        .expect("three held connections");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "9621:EOF 1000 9622:EOF 1000 9623:EOF 1000",
        "three concurrent forwards with a two-port range: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vanished_peer_node_fails_its_streams_in_seconds() {
    // The failure: b's node vanishes (no FIN, no RST: its link goes down)
    // mid-download; a's HBONE connection waited on TCP retransmissions
    // (~15 minutes) and the workload's download hung. With PINGs, the
    // connection fails when the peer stops answering and the workload's
    // connection is reset, well inside the client's 20 s read timeout.
    let mut m = mesh("vanished");
    start_transfer(&mut m.tb, &m.b, &m.a, 9631, Way::Download);
    let out = std::process::Command::new("ip")
        .args(["-n", &m.b.netns, "link", "set", "to-a", "down"])
        .output()
        .expect("ip link set down");
    assert!(out.status.success(), "{out:?}");
    assert_reset(&m.tb, &m.a, "client-9631", "b's node vanished mid-download");
    let warned = m.ea.log_lines().into_iter().any(|v| {
        v["message"]
            .as_str()
            .is_some_and(|t| t.contains("did not answer PING"))
    });
    assert!(warned, "a's agent must say why: {:?}", m.ea.log);
}

/// Accepts connections on port 15008 and never says a word.
const PY_SILENT_PEER: &str = r#"
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 15008)); s.listen(16)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

#[test]
fn silent_peer_agent_fails_the_tunnel_in_seconds() {
    // The failure: a peer that accepts TCP on 15008 and never answers the
    // TLS handshake held the workload's connection forever.
    let (mut tb, a, b) = Testbed::linked_pair("silentpeer").expect("two nodes");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let cfg = tb
        .enforcer_config_with(
            &a,
            "",
            &ca,
            &format!(
                "{}\n{MESH}",
                entry(AGENT_ID, "systemd:unit:support-agent.service")
            ),
        )
        .expect("config");
    let ea = tb.start_enforcer(&a, &cfg).expect("a's agent");
    tb.start_server(&b, "silent", &["python3", "-c", PY_SILENT_PEER], 15008)
        .expect("silent peer");
    let (pid, out) = a
        .exec(
            Some("support-agent.service"),
            &["python3", "-u", &stream_py(), "download", &b.ipv4, "9640"],
        )
        .expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("RESET"),
        "the workload must be refused before its own 20 s timeout: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "tunnel_failed", "{line}");
    let why = ea
        .log_lines()
        .into_iter()
        .find(|v| v["message"] == "HBONE tunnel failed")
        .expect("a tunnel failure line");
    assert_eq!(why["reason"], "tls_handshake_timeout", "{why}");
}

/// Opens N connections to HOST:PORT at once (threads released together),
/// each asking `GET /` over HTTP/1.0; prints one status code per line.
const PY_CONCURRENT_GETS: &str = r#"
import socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
go = threading.Barrier(n)
results = []
def one():
    go.wait()
    try:
        s = socket.create_connection((host, port), timeout=20)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        results.append(data[9:12].decode())
    except OSError as e:
        results.append(f"ERR {e.errno}")
ts = [threading.Thread(target=one) for _ in range(n)]
for t in ts: t.start()
for t in ts: t.join()
# One line each, printed by one thread (prints from many interleave).
print("\n".join(results))
"#;

#[test]
fn concurrent_connects_share_one_dial() {
    // The failure: 16 connects at once from a workload to one destination,
    // the pool empty: each found no connection and dialed its own (16 TLS
    // handshakes, 16 connections to the peer). One dial per key at a time:
    // the others wait for it and share its connection.
    let m = mesh("onedial");
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", PY_CONCURRENT_GETS, &m.b.ipv4, "8080", "16"],
        )
        .expect("concurrent gets");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| *l == "200").count(),
        16,
        "every request answered: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<_> =
            m.ea.closed_connections()
                .into_iter()
                .filter(|v| v["orig_dst"] == format!("{}:8080", m.b.ipv4))
                .collect();
        if lines.len() >= 16 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 16, "one line per connection: {lines:?}");
    let dialed = lines.iter().filter(|v| v["hbone_reused"] == false).count();
    assert_eq!(dialed, 1, "one dial for 16 concurrent connects: {lines:?}");
}

/// Opens N connections to HOST:PORT at once, each asking `GET /`; prints
/// how many were answered 200, how many failed, and the CLOCK_MONOTONIC
/// time (s) of the first answer's first byte.
const PY_FIRST_ANSWER: &str = r#"
import socket, sys, threading, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
go = threading.Barrier(n)
answered, failed = [], []
def one():
    go.wait()
    try:
        s = socket.create_connection((host, port), timeout=120)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(65536)
        at = time.monotonic()
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        if data[9:12] == b"200":
            answered.append(at)
        else:
            failed.append(repr(data[:40]))
    except OSError as e:
        failed.append(repr(e))
ts = [threading.Thread(target=one) for _ in range(n)]
for t in ts: t.start()
for t in ts: t.join()
first = min(answered) if answered else -1.0
print(f"ANSWERED {len(answered)} FAILED {len(failed)} FIRST {first:.6f} {failed[:3]}", flush=True)
"#;

/// `(answered, failed, first answer's time)` from [`PY_FIRST_ANSWER`]'s line.
fn first_answer(said: &str) -> Option<(usize, usize, f64)> {
    let line = said.lines().find(|l| l.starts_with("ANSWERED "))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    Some((
        w.get(1)?.parse().ok()?,
        w.get(3)?.parse().ok()?,
        w.get(5)?.parse().ok()?,
    ))
}

#[test]
fn a_burst_from_a_workload_being_hashed_holds_up_no_other_workload() {
    // The failure: a new workload's executable is hashed once (the other
    // attestations wait for that digest), but each waiting attestation
    // held a blocking-pool thread. 70 connects at once from a workload
    // with a 2 GiB executable took all 64 threads for as long as the hash
    // ran, and a connection from any other new workload waited for a
    // thread — for a hash that was not its own. Now the waiters wait as
    // tasks: the other workload is answered while the hash still runs.
    let mut m = mesh("hashburst");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 (cargo xtask setup installs it)");
    let python = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        python.is_file(),
        "python3 did not name its executable: {out:?}"
    );
    // A copy of the interpreter, then zeros: 2 GiB to hash, none on disk.
    let big = m.tb.dir.join("big-python");
    std::fs::copy(&python, &big).expect("copying python3");
    std::fs::File::options()
        .write(true)
        .open(&big)
        .and_then(|f| f.set_len(2 << 30))
        .expect("a sparse 2 GiB executable");
    let hashes = |e: &enforcer_tests::Enforcer| {
        e.metric("enforcer_executable_hashes_total", &[])
            .expect("enforcer_executable_hashes_total")
    };
    let before = hashes(&m.ea);
    let b_ip = m.b.ipv4.clone();
    let big_s = big.display().to_string();
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "big",
        &[&big_s, "-c", PY_FIRST_ANSWER, &b_ip, "8080", "70"],
    )
    .expect("the 2 GiB workload");
    // Its hash has begun and all 70 connects are in: the burst's other
    // attestations wait for that hash.
    enforcer_tests::wait_for("a's agent to begin hashing the 2 GiB executable", || {
        hashes(&m.ea) > before
    });
    enforcer_tests::wait_for("a's agent to accept the burst's 70 connects", || {
        m.ea.metric("enforcer_active_connections", &[("direction", "outbound")])
            .is_ok_and(|n| n >= 70.0)
    });
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", PY_FIRST_ANSWER, &b_ip, "8080", "1"],
        )
        .expect("another workload's connect");
    let said = String::from_utf8_lossy(&out.stdout);
    let (ok, failed, other_at) = first_answer(&said).unwrap_or_else(|| {
        panic!(
            "the other workload said: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!((ok, failed), (1, 0), "the other workload: {said}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let big_said = loop {
        let log = m.tb.server_log(&m.a, "big");
        if log.contains("ANSWERED") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (ok, failed, big_at) =
        first_answer(&big_said).unwrap_or_else(|| panic!("the 2 GiB workload said: {big_said}"));
    assert_eq!((ok, failed), (70, 0), "the 2 GiB workload: {big_said}");
    assert!(
        other_at < big_at,
        "the other workload was answered at {other_at:.3} s, after the 2 GiB workload's first answer at {big_at:.3} s (its hash's end): it waited for a hash that was not its own"
    );
    // The 2 GiB executable once, python3 once.
    assert_eq!(hashes(&m.ea) - before, 2.0);
}

#[test]
fn stream_budget_refusal_is_retried_on_a_new_connection() {
    // The failure: b allows 3 streams per HBONE connection; the 4th was
    // refused (REFUSED_STREAM, never processed) and a's agent reset the
    // workload's connection. A refused stream is safe to send again: on a
    // fresh connection, to the same verified identity.
    let m = mesh_with("streambudget", "max_streams_per_connection = 3\n");
    let url = format!("http://{}:8080/", m.b.ipv4);
    for _ in 0..8 {
        m.a.get_ok(Some("support-agent.service"), &url);
    }
    let refused =
        m.eb.metric(
            "enforcer_hbone_streams_refused_total",
            &[("reason", "stream_budget")],
        )
        .expect("metrics");
    assert!(
        refused >= 1.0,
        "b refused streams past its budget: {refused}"
    );
}

/// An HTTP server on `node`:8080 in its llm.service; returns its URL.
fn start_http(tb: &mut Testbed, node: &Node) -> String {
    tb.start_server_in(
        node,
        Some("llm.service"),
        "http",
        enforcer_tests::HTTP_SERVER,
        8080,
    )
    .expect("server");
    format!("http://{}:8080/", node.ipv4)
}

/// Every line of the file is one whole JSON value; returns them.
fn whole_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    enforcer_tests::settle_logs();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a broken audit line ({e}): {l:?}\nin:\n{text}"))
        })
        .collect()
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("mount (needs root)");
        assert!(out.status.success(), "mounting a tmpfs: {out:?}");
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn full_disk_cuts_no_audit_line_and_fails_closed() {
    // The failure: with the disk full, one audit record was cut half-way
    // and the next appended to it (an unparseable line), and decisions went
    // on unaudited. Now a line is whole or absent, the failure is counted
    // and logged once, and with audit_on_failure = "deny" the decision
    // whose line could not be written is a denial.
    let (mut tb, a, _) = Testbed::linked_pair("auditfull").expect("testbed");
    let disk = SmallDisk::mount(tb.dir.join("full"), "64k");
    // 14 of the 16 pages taken: a few audit lines fit, then ENOSPC.
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![0u8; 14 * 4096]).expect("filler");
    let log = disk.0.join("audit.jsonl");
    let policy = format!(
        "[policy]\nsource = \"{}\"\naudit_log = \"{}\"\naudit_on_failure = \"deny\"\npoll_ms = 200\n",
        tb.allow_all_policy().expect("policy").display(),
        log.display()
    );
    let cfg = tb
        .enforcer_config_with(&a, "", "", &policy)
        .expect("config");
    let ea = tb.start_enforcer(&a, &cfg).expect("agent");
    let url = start_http(&mut tb, &a);
    let client = Some("client.service");
    let mut refused = None;
    for _ in 0..60 {
        let (code, pid) = a.http_status(client, &url);
        if code != "200" {
            refused = Some(pid);
            break;
        }
    }
    let pid = refused.expect("the disk never filled: every connection was allowed");
    // A second failure in the same burst: refused too, and not logged again.
    let (code, _) = a.http_status(client, &url);
    assert_ne!(code, "200", "still refused while the disk is full");
    let failures = ea
        .metric("enforcer_audit_write_failures_total", &[])
        .expect("metrics");
    assert!(failures >= 2.0, "failed writes are counted: {failures}");
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "denied", "{line}");
    assert!(
        line["policy_reason"]
            .as_str()
            .is_some_and(|r| r.contains("audit log unwritable")),
        "{line}"
    );
    let before = whole_lines(&log).len();
    assert!(before > 0, "some lines fitted before the disk was full");
    // Room again: the next decision is written, after whole lines only.
    std::fs::remove_file(&filler).expect("remove filler");
    let (code, _) = a.http_status(client, &url);
    assert_eq!(code, "200", "allowed again once its line can be written");
    let after = whole_lines(&log);
    assert!(after.len() > before, "the new decisions were written");
    let logged = |needle: &str| {
        ea.log_lines()
            .into_iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
            .count()
    };
    assert_eq!(
        logged("writing the audit log failed"),
        1,
        "logged once per burst"
    );
    assert_eq!(logged("the audit log is written again"), 1);
    drop(disk);
}

#[test]
fn rotated_or_deleted_audit_log_is_reopened_and_sighup_reopens_it() {
    // The failure: after logrotate renamed the audit log, every later line
    // went on into the renamed file (the path stayed empty), a deleted log
    // took every line into an unlinked inode, and SIGHUP — logrotate's
    // postrotate signal — killed the agent.
    let (mut tb, a, _) = Testbed::linked_pair("auditrotate").expect("testbed");
    let log = tb.audit_log(&a);
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let ea = tb.start_enforcer(&a, &cfg).expect("agent");
    let url = start_http(&mut tb, &a);
    let lines_of = |pid: u32| {
        let conn = ea.connection_line(|v| v["pid"] == pid)["conn_id"].clone();
        move |path: &std::path::Path| {
            whole_lines(path)
                .into_iter()
                .filter(|v| v["conn_id"] == conn)
                .count()
        }
    };
    let wait_lines = |path: &std::path::Path, pid: u32, what: &str| {
        let count = lines_of(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(path) == 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: no line at {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let pid = a.get_ok(Some("client.service"), &url);
    wait_lines(&log, pid, "before the rotation");
    // logrotate's default: rename, and a fresh file is expected at the path.
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated).expect("rename");
    let pid = a.get_ok(Some("client.service"), &url);
    wait_lines(&log, pid, "after a rename");
    // Deleted outright.
    std::fs::remove_file(&log).expect("remove");
    let pid = a.get_ok(Some("client.service"), &url);
    wait_lines(&log, pid, "after a deletion");
    // SIGHUP: reopened, and the agent stays up.
    let out = std::process::Command::new("kill")
        .args(["-HUP", &ea.pid.to_string()])
        .output()
        .expect("kill -HUP");
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ea
        .log_lines()
        .iter()
        .any(|v| v["message"] == "reopening the audit log" && v["why"] == "SIGHUP")
    {
        let pid = a.get_ok(Some("client.service"), &url);
        wait_lines(&log, pid, "after SIGHUP");
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reopen the audit log"
        );
    }
    let (code, _) = a.http_get(ea.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "the agent is still up after SIGHUP");
}

/// Nodes a and b as [`mesh`], with `runtime` as a's `[runtime]` keys.
fn mesh_runtime_a(test: &str, runtime: &str) -> Pair {
    llm_pair(test, TD, |_, n| {
        if n.name == "a" {
            let e = entry(AGENT_ID, "systemd:unit:support-agent.service");
            (
                String::new(),
                format!("{e}\n{MESH}\n[runtime]\n{runtime}\n"),
            )
        } else {
            let e = entry(LLM_ID, "systemd:unit:llm.service");
            (String::new(), format!("{e}\n{MESH}"))
        }
    })
    .expect("two nodes")
}

/// A 4 MiB download that takes about 3 s, from b:`port` to a client in
/// a/support-agent.service, started in the background; returns once 1 MiB
/// has arrived.
fn slow_download(m: &mut Pair, port: u16) {
    let (p, py) = (port.to_string(), stream_py());
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        &format!("server-{port}"),
        &["python3", "-u", &py, "serve-slow", &p, "4194304"],
        port,
    )
    .expect("slow server");
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        &format!("client-{port}"),
        &["python3", "-u", &py, "download", &m.b.ipv4, &p],
    )
    .expect("client");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !m
        .tb
        .server_log(&m.a, &format!("client-{port}"))
        .contains("STARTED")
    {
        assert!(Instant::now() < deadline, "the slow download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_last_relays_frames_reach_the_peer_before_a_drained_agent_exits() {
    // The failure: at the end of a drain the agent exited as soon as its
    // last relay ended. A relay ends once everything it read is handed to
    // HTTP/2 (within the stream's window), not once it is written: the
    // frames still queued went with the process. The peer agent saw its
    // HBONE connection drop, reset the server, and the server got part of
    // an upload the client had sent whole (seen in the drain test below as
    // b's "error" for a download that had completed, under load). Here b's
    // agent is stopped while a's relay ends, so that a cannot write what it
    // queued until b reads again.
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP, SIGTERM};
    let mut m = mesh("drainflush");
    let py = stream_py();
    // Within what HTTP/2 takes ahead of the socket (400 KiB a stream): a's
    // relay hands it all over, and ends, without waiting for b.
    const SIZE: u64 = 384 << 10;
    let size = SIZE.to_string();
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "server-9652",
        &["python3", "-u", &py, "serve-upload-halfclosed", "9652"],
        9652,
    )
    .expect("upload server");
    let flag = m.tb.dir.join("send-now");
    let flag_path = flag.display().to_string();
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "client-9652",
        &[
            "python3",
            "-u",
            &py,
            "upload-late",
            &m.b.ipv4,
            "9652",
            &size,
            &flag_path,
        ],
    )
    .expect("client");
    enforcer_tests::wait_for("the client's connection, half-closed by the server", || {
        m.tb.server_log(&m.a, "client-9652").contains("READY")
    });
    // Draining with this one relay open: a runs on until it ends.
    m.tb.signal(m.ea.pid, SIGTERM).expect("SIGTERM a");
    enforcer_tests::wait_for("a to drain", || {
        m.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "draining: no new connections; open ones may finish")
    });
    m.tb.signal(m.eb.pid, SIGSTOP).expect("SIGSTOP b");
    std::fs::write(&flag, b"").expect("flag");
    // The client has sent it all and closed, and a's relay has ended: all
    // of it is with a, most of it not yet written to b.
    enforcer_tests::wait_for("a's relay to end", || {
        m.ea.log_lines().iter().any(|v| {
            v["message"] == "connection closed" && v["orig_dst"] == format!("{}:9652", m.b.ipv4)
        })
    });
    m.tb.signal(m.eb.pid, SIGCONT).expect("SIGCONT b");
    assert_eq!(
        ending(&m.tb, &m.b, "server-9652"),
        format!("EOF {size}"),
        "the server gets the whole upload and a clean close"
    );
    let status = m.tb.wait_exit(m.ea.pid, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "a exits once drained: {status:?}"
    );
    let inbound =
        m.eb.connection_line(|v| v["dst"] == format!("{}:9652", m.b.ipv4));
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    assert_eq!(inbound["bytes_received"], SIZE, "{inbound}");
}

#[test]
fn the_last_streams_frames_reach_the_client_before_a_drained_server_agent_exits() {
    // The same on the server's side: b drains, its last stream's relay ends
    // with the download's last bytes handed to HTTP/2 while a (stopped here)
    // cannot read them yet; b must write them, and close its HBONE
    // connection cleanly, before it exits.
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP, SIGTERM};
    let mut m = mesh("drainflushb");
    let py = stream_py();
    const SIZE: u64 = 384 << 10;
    let size = SIZE.to_string();
    let flag = m.tb.dir.join("send-now");
    let flag_path = flag.display().to_string();
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "server-9653",
        &[
            "python3",
            "-u",
            &py,
            "serve-bytes-late",
            "9653",
            &size,
            &flag_path,
        ],
        9653,
    )
    .expect("download server");
    // "GO" and the client's half-close: only the download is left.
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "client-9653",
        &["python3", "-u", &py, "upload-bytes", &m.b.ipv4, "9653", "2"],
    )
    .expect("client");
    enforcer_tests::wait_for("the server to have the client's GO", || {
        m.tb.server_log(&m.b, "server-9653").contains("READY")
    });
    m.tb.signal(m.eb.pid, SIGTERM).expect("SIGTERM b");
    enforcer_tests::wait_for("b to drain", || {
        m.eb.log_lines()
            .iter()
            .any(|v| v["message"] == "draining: no new connections; open ones may finish")
    });
    m.tb.signal(m.ea.pid, SIGSTOP).expect("SIGSTOP a");
    std::fs::write(&flag, b"").expect("flag");
    enforcer_tests::wait_for("b's relay to end", || {
        m.eb.log_lines().iter().any(|v| {
            v["message"] == "connection closed" && v["dst"] == format!("{}:9653", m.b.ipv4)
        })
    });
    m.tb.signal(m.ea.pid, SIGCONT).expect("SIGCONT a");
    assert_eq!(
        ending(&m.tb, &m.a, "client-9653"),
        format!("EOF {SIZE}"),
        "the client gets the whole download and a clean close"
    );
    let status = m.tb.wait_exit(m.eb.pid, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "b exits once drained: {status:?}"
    );
    let line =
        m.ea.connection_line(|v| v["orig_dst"] == format!("{}:9653", m.b.ipv4));
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["bytes_received"], SIZE, "{line}");
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    // The failure: SIGTERM ended the agent at once; a transfer in progress
    // was cut. Now the listeners close (new connects are refused, fail
    // closed), HBONE peers get GOAWAY, and what is open finishes.
    use nix::sys::signal::Signal::SIGTERM;
    let mut m = mesh("drain");
    slow_download(&mut m, 9651);
    // Both agents told to stop mid-transfer: a's relay and b's stream
    // must both run on to the end.
    m.tb.signal(m.ea.pid, SIGTERM).expect("SIGTERM a");
    m.tb.signal(m.eb.pid, SIGTERM).expect("SIGTERM b");
    let (code, _) = m.a.http_status(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
    assert_eq!(code, "000", "a draining agent accepts no new connection");
    assert_eq!(
        ending(&m.tb, &m.a, "client-9651"),
        "EOF 4194304",
        "the transfer open at SIGTERM completes"
    );
    m.assert_agents_exit(Duration::from_secs(10), "exits cleanly once drained");
    let line =
        m.ea.connection_line(|v| v["orig_dst"] == format!("{}:9651", m.b.ipv4));
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["bytes_received"], 4194304, "{line}");
    let inbound =
        m.eb.connection_line(|v| v["dst"] == format!("{}:9651", m.b.ipv4));
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    assert!(
        m.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "drained: every connection ended")
    );
}

#[test]
fn drain_time_over_resets_what_remains_with_its_line() {
    use nix::sys::signal::Signal::SIGTERM;
    let mut m = mesh_runtime_a("drainover", "drain_secs = 1");
    start_transfer(&mut m.tb, &m.b, &m.a, 9652, Way::Download);
    m.tb.signal(m.ea.pid, SIGTERM).expect("SIGTERM a");
    assert_reset(&m.tb, &m.a, "client-9652", "cut by the end of the drain");
    let status = m.tb.wait_exit(m.ea.pid, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let line =
        m.ea.connection_line(|v| v["orig_dst"] == format!("{}:9652", m.b.ipv4));
    assert_eq!(line["outcome"], "drained", "{line}");
    assert!(line["bytes_received"].as_u64() > Some(1 << 20), "{line}");
}

/// One HTTP/1.1 request on a keep-alive connection to HOST:PORT, then waits
/// (up to 30 s) for the server side to close it; prints `STATUS <code>`,
/// then `EOF` (closed cleanly between requests), `RESET` or `TIMEOUT`.
const PY_KEEPALIVE_IDLE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(65536)
head, body = buf.split(b"\r\n\r\n", 1)
length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
while len(body) < length:
    body += s.recv(65536)
print("STATUS", head.split(b" ")[1].decode(), flush=True)
try:
    print("EOF" if s.recv(1) == b"" else "DATA", flush=True)
except ConnectionResetError:
    print("RESET", flush=True)
except socket.timeout:
    print("TIMEOUT", flush=True)
"#;

#[test]
fn draining_l7_session_closes_between_requests() {
    // An idle keep-alive session at a declared destination does not hold
    // the drain for its whole time, nor is it reset: the session is closed
    // at the request boundary (hyper's graceful shutdown), cleanly.
    use nix::sys::signal::Signal::SIGTERM;
    let mut m = mesh_with(
        "drainl7",
        "\n[[l7.destinations]]\nports = [8080]\nprotocol = \"http\"\n",
    );
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "idle",
        &["python3", "-u", "-c", PY_KEEPALIVE_IDLE, &m.b.ipv4, "8080"],
    )
    .expect("client");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !m.tb.server_log(&m.a, "idle").contains("STATUS 200") {
        assert!(
            Instant::now() < deadline,
            "no answer: {}",
            m.tb.server_log(&m.a, "idle")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = Instant::now();
    m.tb.signal(m.eb.pid, SIGTERM).expect("SIGTERM b");
    let status = m.tb.wait_exit(m.eb.pid, Duration::from_secs(12));
    assert!(
        status.is_some_and(|s| s.success()),
        "b drained well before its 15 s drain time: {status:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = m.tb.server_log(&m.a, "idle");
        if log.lines().count() >= 2 || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        log.lines().nth(1),
        Some("EOF"),
        "closed cleanly between requests ({:?} after SIGTERM): {log}",
        stopped.elapsed()
    );
}

/// Makes N captured connects to HOST:PORT; prints how many failed with
/// EPERM, then `OTHER <errno>` for any other outcome.
const PY_REFUSED_CONNECTS: &str = r#"
import errno, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
eperm = 0
for _ in range(n):
    s = socket.socket()
    try:
        s.connect((host, port))
        print("CONNECTED")
    except OSError as e:
        if e.errno == errno.EPERM:
            eperm += 1
        else:
            print("OTHER", e.errno)
    s.close()
print("EPERM", eperm)
"#;

#[test]
fn connects_refused_while_the_agent_is_down_leave_no_kernel_record() {
    // While the agent is down, captured connects fail (EPERM) before the
    // kernel program stores a record for them; none is left in the capture
    // maps (each record would hold a slot of the LRU maps, and evict live
    // connections' records under churn) when the agent is back.
    let mut m = mesh("downrecords");
    let cfg = m.tb.dir.join("a.toml");
    m.tb.stop(m.ea.pid).expect("stop a's agent");
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                "-c",
                PY_REFUSED_CONNECTS,
                &m.b.ipv4,
                "8080",
                "200",
            ],
        )
        .expect("connects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "EPERM 200", "every connect refused: {text}");
    let ea = m.tb.start_enforcer(&m.a, &cfg).expect("restart a's agent");
    for map in ["by_cookie", "by_tuple"] {
        let n = ea
            .metric("enforcer_capture_map_entries", &[("map", map)])
            .expect("metrics");
        assert_eq!(n, 0.0, "records left in {map}");
    }
    // And a connection made now ends with its records gone too.
    m.a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
    ea.connection_line(|v| v["orig_dst"] == format!("{}:8080", m.b.ipv4));
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", m.tb.node_instance(&m.a));
    assert_records_drain(
        &ea,
        &pins,
        Duration::from_secs(5),
        "after the connection closed",
    );
}

/// Five requests to `argv[1]:argv[2]`, each read to the server's end of
/// the connection before it is closed.
const PY_READ_TO_END_THEN_CLOSE: &str = r#"
import socket, sys, time
n = 0
for _ in range(5):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while s.recv(65536):
        pass
    time.sleep(0.05)
    s.close()
    n += 1
print("ok", n)
"#;

#[test]
fn an_agent_restarted_right_after_traffic_binds_its_port() {
    // The connections an agent closed first wait in TIME_WAIT on its
    // outbound port for a minute. Found under systemd (deploy.rs): the
    // outbound listener was bound without SO_REUSEADDR, so an agent
    // restarted meanwhile — after a crash, `systemctl restart` — stopped at
    // "cannot listen on 127.0.0.1:15001: Address already in use", and
    // systemd gave up after five tries.
    let mut m = mesh("restartbind");
    let cfg = m.tb.dir.join("a.toml");
    // Each read to the server's end before it closes: the agent, relaying
    // that end, closes its side first, so its side is the one that waits.
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                "-c",
                PY_READ_TO_END_THEN_CLOSE,
                &m.b.ipv4,
                "8080",
            ],
        )
        .expect("connections");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok 5",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The premise: the agent's side of those connections waits there.
    enforcer_tests::wait_for(
        "a connection of the agent's in TIME_WAIT on its outbound port (else the test proves nothing)",
        || {
            m.a.exec(
                None,
                &["ss", "-Htan", "state", "time-wait", "sport", "=", ":15001"],
            )
            .is_ok_and(|(_, out)| !out.stdout.is_empty())
        },
    );
    m.tb.signal(m.ea.pid, nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 a's agent");
    assert!(
        m.tb.wait_exit(m.ea.pid, Duration::from_secs(10)).is_some(),
        "a's agent exits at SIGKILL"
    );
    let ea =
        m.tb.start_enforcer(&m.a, &cfg)
            .expect("a's agent restarted at once, with its connections in TIME_WAIT");
    m.a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
    ea.connection_line(|v| v["orig_dst"] == format!("{}:8080", m.b.ipv4));
}

/// Waits up to `within` for `agent`'s capture maps (both) to hold no record;
/// fails with the count left, `when`, and the records (bpftool's dump of
/// the maps pinned under `pins`, the node's instance directory).
fn assert_records_drain(
    agent: &enforcer_tests::Enforcer,
    pins: &str,
    within: Duration,
    when: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let n = agent
            .metric("enforcer_capture_map_entries", &[])
            .expect("metrics");
        if n == 0.0 {
            return;
        }
        if Instant::now() >= deadline {
            let dump = |map: &str| {
                std::process::Command::new("bpftool")
                    .args(["map", "dump", "pinned", &format!("{pins}/maps/{map}")])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| format!("bpftool: {e}"))
            };
            panic!(
                "{n} records left {when}\nENF_BY_COOKIE: {}\nENF_BY_TUPLE: {}",
                dump("ENF_BY_COOKIE"),
                dump("ENF_BY_TUPLE")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens N non-blocking captured connects to HOST:PORT at once, waits 3 s,
/// prints `QUEUED <connected> PENDING <still connecting>`, and closes all.
const PY_FLOOD_CONNECTS: &str = r#"
import errno, resource, select, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    rc = s.connect_ex((host, port))
    if rc not in (0, errno.EINPROGRESS):
        print("CONNECT", rc)
    socks.append(s)
time.sleep(3)
poll = select.poll()
for s in socks:
    poll.register(s, select.POLLOUT)
ready = {fd for fd, ev in poll.poll(0) if ev & select.POLLOUT}
queued = pending = 0
for s in socks:
    if s.fileno() in ready and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
        queued += 1
    else:
        pending += 1
print("QUEUED", queued, "PENDING", pending, flush=True)
for s in socks:
    s.close()
"#;

#[test]
fn connects_that_fail_after_their_record_leave_none() {
    // The kernel stores a connect's record before the connect completes.
    // One that then fails — here the agent's accept backlog is full (the
    // agent stopped), so its SYNs are dropped and the workload gives up —
    // used to leave its record until the LRU evicted it (before the fix:
    // hundreds left). Now the socket's close removes it, connected or not.
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let m = mesh("failedrecords");
    m.tb.signal(m.ea.pid, SIGSTOP).expect("SIGSTOP a's agent");
    let out = m.a.exec(
        Some("support-agent.service"),
        &[
            "python3",
            "-c",
            PY_FLOOD_CONNECTS,
            &m.b.ipv4,
            "8080",
            "1400",
        ],
    );
    m.tb.signal(m.ea.pid, SIGCONT).expect("SIGCONT a's agent");
    let (_, out) = out.expect("connects");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pending: u64 = text
        .split_whitespace()
        .skip_while(|w| *w != "PENDING")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no PENDING count: {text} {out:?}"));
    assert!(
        pending > 0,
        "the backlog must overflow for this test to mean anything: {text}"
    );
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", m.tb.node_instance(&m.a));
    assert_records_drain(
        &m.ea,
        &pins,
        Duration::from_secs(30),
        &format!("30 s after every socket closed ({text})"),
    );
}

/// Connects once to HOST:PORT, prints `CONNECTED`, waits SECS, closes
/// abortively (SO_LINGER 0: the socket is gone at once) and prints `CLOSED`.
const PY_CONNECT_AND_ABORT: &str = r#"
import socket, struct, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
print("CONNECTED", flush=True)
time.sleep(secs)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print("CLOSED", flush=True)
"#;

#[test]
fn a_connect_the_agent_never_accepts_leaves_no_record() {
    // The kernel publishes a connect's record under its 4-tuple once the
    // workload's side is established, for the agent to take on accept. A
    // workload's side can be established while the agent's never is: the
    // handshake's last ACK is lost or dropped (on a full accept queue the
    // kernel drops it), the workload gives up, and the agent's kernel
    // forgets the half-open connection. Here the last ACK is dropped by a
    // firewall rule, which is that case made certain. Before the fix the
    // record stayed until the LRU evicted it (the rare failure of
    // connects_that_fail_after_their_record_leave_none): with enough of
    // them, live connects' records were evicted.
    let m = mesh("neveraccepted");
    let port = 15001.to_string(); // a's capture.outbound_port (default)
    let rule = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port,
        "--tcp-flags",
        "SYN,ACK,RST",
        "ACK",
        "-j",
        "DROP",
    ];
    let iptables = |op: &str| {
        let mut args = vec!["iptables", "-w", op];
        args.extend(rule);
        let (_, out) =
            m.a.exec(None, &args)
                .expect("iptables (apt install iptables)");
        assert!(
            out.status.success(),
            "iptables {op}: {} (apt install iptables; the kernel needs nf_tables)",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    iptables("-I");
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                "-c",
                PY_CONNECT_AND_ABORT,
                &m.b.ipv4,
                "8080",
                "1",
            ],
        )
        .expect("the connect");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("CONNECTED") && said.contains("CLOSED"),
        "the workload's side must connect (the agent's kernel answered the SYN) and close: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iptables("-D");
    // The record is there, and nobody will take it: the agent's kernel
    // has no such connection (its SYN-ACK, answered by the workload's
    // kernel with a reset, told it so).
    let left =
        m.ea.metric("enforcer_capture_map_entries", &[("map", "by_tuple")])
            .expect("metrics");
    assert_eq!(
        left, 1.0,
        "the record of the connect the agent never accepted must be in the map for this test to mean anything"
    );
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", m.tb.node_instance(&m.a));
    assert_records_drain(
        &m.ea,
        &pins,
        Duration::from_secs(60),
        "60 s after the workload's socket closed (the connection never accepted)",
    );
    // Counted once the sweep's pass is back from the blocking pool, a
    // moment after the map shows the record gone: waited for.
    let deadline = Instant::now() + Duration::from_secs(10);
    let swept = loop {
        let n =
            m.ea.metric("enforcer_capture_records_swept_total", &[])
                .expect("metrics");
        if n > 0.0 || Instant::now() >= deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(swept, 1.0, "the record removed is counted");
    assert_still_serves(&m, "after the sweep");
}

/// Sets the local port range of `node`'s network namespace ("LOW HIGH").
fn set_port_range(node: &enforcer_tests::Node, range: &str) {
    let (_, out) = node
        .exec(
            None,
            &[
                "sh",
                "-c",
                &format!("echo {range} > /proc/sys/net/ipv4/ip_local_port_range"),
            ],
        )
        .expect("setting the port range");
    assert!(out.status.success(), "port range {range}: {out:?}");
}

/// Five captured connects from a's support agent to b:8080 all succeed.
fn assert_still_serves(m: &Pair, when: &str) {
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", PY_CONNECTS, &m.b.ipv4, "8080", "5", "stop"],
        )
        .expect("connects");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("OK 5 FAIL 0"), "{when}: {said}");
}

/// Holds captured connects to HOST:PORT until one fails (at most N), prints
/// `FAILED <errno name> HELD <count>`, closes the ones held, prints `READY`,
/// waits for the file GO, closes the failed socket and prints `CLOSED`.
const PY_CONNECT_UNTIL_REFUSED: &str = r#"
import errno, os, socket, sys, time
host, port, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
held, failed, code = [], None, None
for _ in range(n):
    s = socket.socket()
    try:
        s.connect((host, port))
    except OSError as e:
        failed, code = s, errno.errorcode.get(e.errno, str(e.errno))
        break
    held.append(s)
print("FAILED", code, "HELD", len(held), flush=True)
for s in held:
    s.close()
print("READY", flush=True)
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.05)
if failed is not None:
    failed.close()
print("CLOSED", flush=True)
"#;

#[test]
fn a_connect_that_fails_before_the_handshake_leaves_no_record() {
    // The connect hook stores a captured connect's record under its socket
    // before the kernel picks a local port. When that fails (no port free
    // for the agent's address: EADDRNOTAVAIL), no handshake starts, so the
    // socket never asked to be told of its close, and its record stayed
    // until the LRU evicted it. A workload that provokes this at will
    // fills the map and evicts other workloads' records (their connects
    // then fail closed). Here the node's port range is four ports wide.
    let mut m = mesh("portsexhausted");
    set_port_range(&m.a, "61000 61003");
    let go = m.tb.dir.join("go");
    let go_s = go.display().to_string();
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "until-refused",
        &[
            "python3",
            "-u",
            "-c",
            PY_CONNECT_UNTIL_REFUSED,
            &m.b.ipv4,
            "8080",
            "64",
            &go_s,
        ],
    )
    .expect("the connects");
    let log = |m: &Pair| m.tb.server_log(&m.a, "until-refused");
    let wait_log = |m: &Pair, said: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !log(m).contains(said) {
            assert!(Instant::now() < deadline, "{what}: {}", log(m));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_log(&m, "READY", "the connects did not finish");
    assert!(
        log(&m).contains("FAILED EADDRNOTAVAIL HELD 4"),
        "four connects hold the four ports, the fifth finds none: {}",
        log(&m)
    );
    // The held connections' records go as they close; the failed
    // connect's stays while its socket is open (a getpeername on it
    // would read it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n =
            m.ea.metric("enforcer_capture_map_entries", &[("map", "by_cookie")])
                .expect("metrics");
        if n == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed connect's record must be in the map while its socket is open ({n} records): {}",
            log(&m)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&go, b"").expect("the go file");
    wait_log(&m, "CLOSED", "the socket was not closed");
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", m.tb.node_instance(&m.a));
    assert_records_drain(
        &m.ea,
        &pins,
        Duration::from_secs(30),
        "30 s after the socket whose connect failed was closed",
    );
    // The ports back, the agent still serves the workload.
    set_port_range(&m.a, "32768 60999");
    assert_still_serves(&m, "with the ports back");
}

#[test]
fn a_log_output_that_takes_nothing_stalls_no_connection() {
    // The failure: runtime threads wrote their log lines to standard error
    // themselves. With standard error a pipe nobody read (a journald
    // stopped or behind), the pipe filled after ~80 "connection closed"
    // lines, the next write blocked its thread, and every connection
    // through the agent hung. Now a thread of its own writes the log; the
    // lines wait in memory and none is lost.
    let (mut tb, a, b) = Testbed::linked_pair("stalledlog").expect("two nodes");
    let ca = tb.shared_ca("shared", TD).expect("a CA");
    start_llm_http(&mut tb, &b).expect("http server");
    let rest = |id: &str, unit: &str| format!("{}\n{MESH}", entry(id, unit));
    let cfg_b = tb
        .enforcer_config_with(&b, "", &ca, &rest(LLM_ID, "systemd:unit:llm.service"))
        .expect("b's config");
    let _eb = tb.start_enforcer(&b, &cfg_b).expect("b's agent");
    let cfg_a = tb
        .enforcer_config_with(
            &a,
            "",
            &ca,
            &rest(AGENT_ID, "systemd:unit:support-agent.service"),
        )
        .expect("a's config");
    let (mut reader, writer) = std::io::pipe().expect("a pipe");
    let ea = tb
        .start_enforcer_logging_to(&a, &cfg_a, writer.into())
        .expect("a's agent, its standard error a pipe nobody reads");
    // 400 lines of ~800 bytes: five times what the pipe holds.
    const N: usize = 400;
    let (_, out) = a
        .exec(
            Some("support-agent.service"),
            &[
                "python3",
                "-c",
                PY_CONNECTS,
                &b.ipv4,
                "8080",
                &N.to_string(),
                "stop",
            ],
        )
        .expect("sequential connects");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("OK {N} FAIL 0")),
        "every connection through a's agent answered while its log output took nothing: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Now the log is read: every connection's line is there.
    let text = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = std::io::Read::read(&mut reader, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("log buffer")
                .extend_from_slice(&buf[..n]);
        }
    });
    let dst = format!("{}:8080", b.ipv4);
    let deadline = Instant::now() + Duration::from_secs(20);
    let closed = loop {
        let log = String::from_utf8_lossy(&text.lock().expect("log buffer")).into_owned();
        let closed = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "connection closed" && v["orig_dst"] == dst)
            .count();
        if closed >= N || Instant::now() > deadline {
            break closed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        closed, N,
        "one \"connection closed\" line per connection, none lost"
    );
    assert_eq!(
        ea.metric("enforcer_log_lines_dropped_total", &[])
            .expect("the metric"),
        0.0
    );
}
