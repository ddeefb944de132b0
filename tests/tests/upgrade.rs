//! Hitless upgrade: a new agent started beside the running one takes over its
//! listeners (`handover.sock` in `state_dir`) and kernel records; the old one
//! drains. Real agents on both nodes, real workloads
//! (tests/helpers/stream.py, python's http.server), upgraded mid-traffic.
use std::time::{Duration, Instant};

use std::os::unix::net::UnixDatagram;

use enforcer_tests::{
    MESH, PY_CONNECTS, Pair, SUPPORT_AGENT_ID, SUPPORT_LLM_ID, SUPPORT_TD, Testbed, entry,
    json_lines, stream_py, support_mesh,
};

const AGENT_ID: &str = SUPPORT_AGENT_ID;

fn mesh(test: &str) -> Pair {
    support_mesh(test, "").expect("two nodes")
}

/// Waits up to `secs` for a line of `<node>-<name>` that starts with one of
/// `prefixes`.
fn line_of(
    m: &Pair,
    node: &enforcer_tests::Node,
    name: &str,
    prefixes: &[&str],
    secs: u64,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let log = m.tb.server_log(node, name);
        if let Some(l) = log
            .lines()
            .find(|l| prefixes.iter().any(|p| l.starts_with(p)))
        {
            return l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{name} on {}: no line starting with {prefixes:?} within {secs} s: {log}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upgrade_mid_transfer_keeps_it_whole() {
    // A 10 s download from b to a workload on a; both nodes' agents are
    // upgraded while it runs. The bytes that arrive are the bytes sent
    // (sha256), the end is a clean one, and the old agents drain and exit.
    const N: u64 = 16 << 20;
    let mut m = mesh("upgxfer");
    let (a_cfg, b_cfg) = (m.tb.dir.join("a.toml"), m.tb.dir.join("b.toml"));
    let py = stream_py();
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "server-9661",
        &[
            "python3",
            "-u",
            &py,
            "serve-random",
            "9661",
            &N.to_string(),
            "10",
        ],
        9661,
    )
    .expect("server");
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "client-9661",
        &["python3", "-u", &py, "download-hash", &m.b.ipv4, "9661"],
    )
    .expect("client");
    line_of(&m, &m.a, "client-9661", &["STARTED"], 15);

    let na = m.tb.upgrade_enforcer(&m.ea, &a_cfg).expect("upgrade a");
    let nb = m.tb.upgrade_enforcer(&m.eb, &b_cfg).expect("upgrade b");
    assert!(
        !m.tb.server_log(&m.b, "server-9661").contains("SENT"),
        "both upgrades done while the transfer runs"
    );

    let sent = line_of(&m, &m.b, "server-9661", &["SENT"], 30);
    let got = line_of(&m, &m.a, "client-9661", &["EOF", "RESET", "TIMEOUT"], 30);
    let sha = sent.split_whitespace().nth(2).expect("server's sha256");
    assert_eq!(
        got,
        format!("EOF {N} {sha}"),
        "the workload received every byte, unchanged, and a clean end (server: {sent})"
    );
    m.assert_agents_exit(
        Duration::from_secs(20),
        "the old one drains and exits cleanly",
    );
    let line =
        m.ea.connection_line(|v| v["orig_dst"] == format!("{}:9661", m.b.ipv4));
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(line["bytes_received"], N, "{line}");
    assert!(
        m.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "handed over to a new agent; draining"),
        "the old agent says it handed over"
    );

    // The new agents serve on their own, with the old ones gone.
    let (code, _) = m.a.http_status(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
    assert_eq!(code, "200", "a new connection through both new agents");
    let new_line = na.connection_line(|v| v["orig_dst"] == format!("{}:8080", m.b.ipv4));
    assert_eq!(new_line["outcome"], "ok", "{new_line}");
    assert_eq!(new_line["src_spiffe_id"], AGENT_ID, "{new_line}");
    let inbound = nb.connection_line(|v| v["dst"] == format!("{}:8080", m.b.ipv4));
    assert_eq!(inbound["src_spiffe_id"], AGENT_ID, "{inbound}");
}

#[test]
fn connects_spread_over_an_upgrade_all_succeed() {
    // 1 000 connections, one after another, from a to b's HTTP server while
    // first a's agent, then b's is upgraded: none is refused, reset or
    // answered wrongly — the backlog of a listener is handed over with it,
    // and a connect redirected by the old kernel programs is found by
    // either agent.
    let mut m = mesh("upgconnects");
    let (a_cfg, b_cfg) = (m.tb.dir.join("a.toml"), m.tb.dir.join("b.toml"));
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "connects",
        &[
            "python3",
            "-u",
            "-c",
            PY_CONNECTS,
            &m.b.ipv4,
            "8080",
            "1000",
        ],
    )
    .expect("client");
    line_of(&m, &m.a, "connects", &["DONE 100"], 30);
    m.tb.upgrade_enforcer(&m.ea, &a_cfg).expect("upgrade a");
    line_of(&m, &m.a, "connects", &["DONE 300"], 30);
    m.tb.upgrade_enforcer(&m.eb, &b_cfg).expect("upgrade b");
    let log = m.tb.server_log(&m.a, "connects");
    assert!(
        !log.contains("OK "),
        "the upgrades happened while the connects ran: {log}"
    );
    let result = line_of(&m, &m.a, "connects", &["OK "], 90);
    assert_eq!(
        result,
        "OK 1000 FAIL 0",
        "every connect over the upgrades: {}",
        m.tb.server_log(&m.a, "connects")
    );
    m.assert_agents_exit(Duration::from_secs(20), "the old one exits cleanly");
}

#[test]
fn upgrade_that_changes_the_mark_is_refused_and_the_agent_keeps_serving() {
    // The kernel programs send captured connects only to a listener that
    // carries the agent's mark; a new agent with another capture.agent_mark
    // cannot use the handed-over listeners. It stops with an error that says
    // so, and the running agent, which has not handed over, serves on.
    let mut m = mesh("upgmark");
    let a_cfg = m.tb.dir.join("a.toml");
    let text = std::fs::read_to_string(&a_cfg).expect("a.toml");
    let other = m.tb.dir.join("a-mark.toml");
    std::fs::write(
        &other,
        text.replacen("[capture]\n", "[capture]\nagent_mark = 99\n", 1),
    )
    .expect("a-mark.toml");
    let Err(err) = m.tb.upgrade_enforcer(&m.ea, &other) else {
        panic!("the new agent must not take over");
    };
    assert!(
        format!("{err:#}").contains("a hitless upgrade cannot change the mark"),
        "{err:#}"
    );
    assert_serves_on(&mut m);
    assert!(
        m.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "handover failed; this agent keeps serving"),
        "the running agent logged the failed handover"
    );
}

/// The running agent, which has not handed over, still serves a captured
/// connection and has not started to drain.
fn assert_serves_on(m: &mut Pair) {
    let (code, _) = m.a.http_status(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
    assert_eq!(code, "200", "the running agent still serves");
    assert!(
        m.tb.wait_exit(m.ea.pid, Duration::from_millis(500))
            .is_none(),
        "the running agent did not drain"
    );
}

/// The signals a process handles (`SigCgt` of /proc/PID/status).
fn signals_caught(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .expect("SigCgt")
        .trim();
    u64::from_str_radix(hex, 16).expect("SigCgt in hex")
}

#[test]
fn sigusr2_starts_a_successor_that_systemd_follows() {
    // systemd's way in: SIGUSR2 to the main process starts the installed
    // binary with the same arguments; it takes over, the old agent tells
    // systemd the new main pid (MAINPID=, Type=notify) and drains.
    let (mut tb, a, b) = Testbed::linked_pair("upgusr2").expect("testbed");
    tb.start_server(&b, "web", &["python3", "-m", "http.server", "8080"], 8080)
        .expect("server on b");
    let sock_path = tb.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The notify socket's queue is filled first, so the agent's READY=1
    // waits in its send until the test reads: the moment it says it is
    // ready is held still, and what it handles then can be looked at.
    // (A sender's own buffer holds a few hundred; the receiver's queue,
    // `net.unix.max_dgram_qlen`, more: senders are added until a fresh one
    // finds the queue full.)
    let mut fillers = Vec::new();
    let full = loop {
        let filler = UnixDatagram::unbound().expect("a datagram socket");
        filler.set_nonblocking(true).expect("non-blocking");
        let mut sent = 0;
        while filler.send_to(b"FILL", &sock_path).is_ok() {
            sent += 1;
        }
        fillers.push(filler);
        if sent == 0 || fillers.len() > 1000 {
            break sent == 0;
        }
    };
    assert!(full, "the notify socket's queue never filled");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let notify = sock_path.display().to_string();
    let old = tb
        .start_enforcer_env(&a, &cfg, None, &[("NOTIFY_SOCKET", notify.as_str())])
        .expect("agent");
    // Ready (its /readyz answers), and its READY=1 waiting for room.
    // At READY=1 the agent handles the signals systemd and logrotate send:
    // their default action ends the process. (The failure, seen once in a
    // full run: the agent said READY=1 before it installed its handlers, so
    // the SIGUSR2 sent at once killed it.)
    let caught = signals_caught(old.pid);
    for (sig, name) in [
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (12, "SIGUSR2"),
        (15, "SIGTERM"),
    ] {
        assert!(
            caught & (1 << (sig - 1)) != 0,
            "{name} is not handled when the agent says READY=1 (SigCgt {caught:#x})"
        );
    }
    let next = |what: &str| -> Vec<String> {
        let mut buf = [0u8; 512];
        loop {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{what} within 30 s: {e}"));
            if &buf[..n] != b"FILL" {
                return String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned)
                    .collect();
            }
        }
    };
    assert!(next("READY=1").iter().any(|l| l == "READY=1"));

    tb.signal(old.pid, nix::sys::signal::Signal::SIGUSR2)
        .expect("SIGUSR2");
    let msg = next("MAINPID=");
    let successor: u32 = msg
        .iter()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected MAINPID=<pid>, got {msg:?}"));
    tb.adopt(successor, "the successor agent");
    assert_ne!(successor, old.pid);
    let cmdline = std::fs::read(format!("/proc/{successor}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("run"),
        "the successor runs `enforcer run`: {cmdline:?}"
    );
    let status = tb.wait_exit(old.pid, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent drains and exits: {status:?}"
    );
    assert!(
        enforcer_tests::pid_alive(successor),
        "the successor runs on"
    );
    let (code, _) = a.http_get(old.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "the successor answers /readyz");
    let (code, _) = a.http_status(Some("client.service"), &format!("http://{}:8080/", b.ipv4));
    assert_eq!(code, "200", "a captured connection through the successor");
    let served = old
        .log_lines()
        .into_iter()
        .filter(|v| v["message"] == "connection closed")
        .count();
    assert_eq!(
        served, 1,
        "the successor logged the connection (same log file)"
    );

    tb.signal(successor, nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM the successor");
    assert!(
        next("STOPPING=1").iter().any(|l| l == "STOPPING=1"),
        "the successor speaks to systemd as the main process"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while enforcer_tests::pid_alive(successor) {
        assert!(Instant::now() < deadline, "the successor stops at SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn drained_old_agent_waits_for_sigterm_when_told_to() {
    // A DaemonSet's old pod: if its agent exited after handing over, the
    // kubelet would restart it, and it would take the listeners back.
    // With runtime.after_handover = "wait" it drains, then waits for the
    // pod's SIGTERM, and exits at once then.
    let (mut tb, a, _b) = Testbed::linked_pair("upgwait").expect("testbed");
    let cfg = tb
        .enforcer_config_with(&a, "", "", "[runtime]\nafter_handover = \"wait\"\n")
        .expect("config");
    let old = tb.start_enforcer(&a, &cfg).expect("agent");
    let new = tb.upgrade_enforcer(&old, &cfg).expect("upgrade");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !old.log_lines().iter().any(|v| {
        v["message"]
            == "handed over and drained; waiting for SIGTERM (runtime.after_handover = \"wait\")"
    }) {
        assert!(Instant::now() < deadline, "the old agent never drained");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        tb.wait_exit(old.pid, Duration::from_secs(1)).is_none(),
        "drained, the old agent waits"
    );
    let (code, _) = a.http_get(new.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "the new agent serves");
    tb.signal(old.pid, nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let status = tb.wait_exit(old.pid, Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let (code, _) = a.http_get(new.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "the new agent serves on");
}

/// As uid/gid 65534, connects to the handover socket at PATH, says hello as
/// node NODE, and prints what came back: `BYTES <n> FDS <descriptors>` (a
/// reset, or a connection closed before the hello, counts as nothing).
const PY_STEAL_LISTENERS: &str = r#"
import array, json, os, socket, sys
path, node = sys.argv[1], sys.argv[2]
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
ints = array.array("i")
try:
    # The agent may refuse before the hello is even sent (EPIPE).
    s.send(json.dumps({"type": "hello", "protocol": "enforcer-handover/1", "node": node,
                       "pid": os.getpid(), "cgroup_id": 0}).encode())
    msg, anc, _, _ = s.recvmsg(16384, socket.CMSG_SPACE(16 * ints.itemsize))
except (ConnectionResetError, BrokenPipeError):
    msg, anc = b"", []
fds = sum(len(d) // ints.itemsize for lvl, kind, d in anc
          if lvl == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS)
print("BYTES", len(msg), "FDS", fds, flush=True)
"#;

#[test]
fn another_user_cannot_take_the_listeners() {
    // The attack: an unprivileged local user who can reach the handover
    // socket (a state_dir left world-accessible) asks for the listeners and
    // would receive the agent's outbound listener — every captured
    // connection of the node. The agent checks the peer's uid
    // (SO_PEERCRED) and hands over nothing; it serves on.
    use std::os::unix::fs::PermissionsExt as _;
    let (mut tb, a, _b) = Testbed::linked_pair("upgsteal").expect("testbed");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let agent = tb.start_enforcer(&a, &cfg).expect("agent");
    let state = tb.dir.join("a-state");
    let sock = state.join("handover.sock");
    for (path, mode) in [(&tb.dir, 0o755), (&state, 0o755), (&sock, 0o777)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let (_, out) = a
        .exec(
            None,
            &[
                "python3",
                "-c",
                PY_STEAL_LISTENERS,
                &sock.display().to_string(),
                &tb.node_instance(&a),
            ],
        )
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.trim(),
        "BYTES 0 FDS 0",
        "another user got an answer or descriptors: {text} {out:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log_lines().iter().any(|v| {
        v["message"] == "handover failed; this agent keeps serving"
            && v["error"].as_str().is_some_and(|e| e.contains("uid 65534"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the agent did not log the refused handover"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = a.http_get(agent.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "the agent serves on");
    assert!(
        tb.wait_exit(agent.pid, Duration::from_millis(500))
            .is_none(),
        "the agent did not drain"
    );
}

/// A draining agent's own connects, when the new agent runs in another
/// cgroup (a DaemonSet's new pod). The kernel programs know the agent by its
/// mark *and* its cgroup; after the handover the configured cgroup is the
/// new agent's, and the old one's is kept as `handover_cgroup_id` until it
/// exits. Here b's agents run inside the captured subtree (the harder
/// case), and the old one connects while it drains: at exit it exports the
/// spans it held to an OTLP receiver on node a. That connect is the agent's
/// own — not captured and handed to the new agent as an unidentified
/// workload's (which refuses it: no identity, a mesh destination).
#[test]
fn a_draining_agent_in_another_cgroup_still_connects_as_the_agent() {
    let (mut tb, a, b) = Testbed::linked_pair("upgcg").expect("testbed");
    let ca = tb.shared_ca("shared", SUPPORT_TD).expect("CA");
    // Spans wait for the agent's exit (the batch delay is a minute).
    let b_tail = format!(
        "{}\n{MESH}\n[traces]\nendpoint = \"http://{}:4318/v1/traces\"\nbatch_delay_ms = 60000\n",
        entry(SUPPORT_LLM_ID, "systemd:unit:llm.service"),
        a.ipv4
    );
    let b_config = tb
        .enforcer_config_with(&b, "", &ca, &b_tail)
        .expect("config");
    let eb = tb
        .start_enforcer_in(&b, &b_config, Some("agent-1.service"))
        .expect("b's agent, inside the captured subtree");
    let a_tail = format!(
        "{}\n{MESH}",
        entry(AGENT_ID, "systemd:unit:support-agent.service")
    );
    let a_config = tb
        .enforcer_config_with(&a, "", &ca, &a_tail)
        .expect("config");
    tb.start_enforcer(&a, &a_config).expect("a's agent");
    let receiver = format!("{}/helpers/otlp_receiver.py", env!("CARGO_MANIFEST_DIR"));
    tb.start_server(&a, "otlp", &["python3", "-u", &receiver, "4318"], 4318)
        .expect("OTLP receiver (PyPI's opentelemetry-proto: cargo xtask setup installs it)");
    let echo = format!("{}/helpers/http_echo.py", env!("CARGO_MANIFEST_DIR"));
    tb.start_server_in(
        &b,
        Some("llm.service"),
        "echo",
        &["python3", "-u", &echo, "8002"],
        8002,
    )
    .expect("echo server");
    a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8002/before", b.ipv4),
    );

    let new = tb
        .upgrade_enforcer_in(&eb, &b_config, Some("agent-2.service"))
        .expect("upgrade b into another cgroup");
    let old_pid = eb.pid;
    let status = tb.wait_exit(old_pid, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent drains and exits: {status:?}"
    );
    // The event: the old agent's spans arrived, so its connect went out.
    let spans = json_lines(
        &tb.server_log(&a, "otlp")
            .lines()
            .filter_map(|l| l.strip_prefix("SPAN "))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert!(
        spans.iter().any(|s| s["name"] == "inbound connection"
            && s["attributes"]["enforcer.source.spiffe_id"] == AGENT_ID),
        "the old agent exported its spans at exit: {spans:?}\n{}",
        eb.log_lines()
            .iter()
            .filter(|l| l["level"] == "WARN")
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        new.metric(
            "enforcer_connections_opened_total",
            &[("direction", "outbound")]
        )
        .expect("metric"),
        0.0,
        "the new agent was handed a captured connect on b: {:?}",
        new.closed_connections()
    );
}

#[test]
fn sigusr2_with_a_new_agent_that_cannot_start_leaves_the_running_one_serving() {
    // The new agent is not the old one's child (it is reparented to the
    // service manager before it is named the main process), so the old
    // one watches it by pid: when it exits without taking over — here the
    // config on disk was broken since the running agent read it — the
    // running agent says so and serves on.
    let mut m = mesh("upgbroken");
    let a_cfg = m.tb.dir.join("a.toml");
    let text = std::fs::read_to_string(&a_cfg).expect("a.toml");
    std::fs::write(&a_cfg, format!("{text}\n[no_such_table]\nkey = 1\n")).expect("a.toml");
    m.tb.signal(m.ea.pid, nix::sys::signal::Signal::SIGUSR2)
        .expect("SIGUSR2");
    let deadline = Instant::now() + Duration::from_secs(30);
    let started: u64 = loop {
        let lines = m.ea.log_lines();
        let started = lines
            .iter()
            .find(|v| v["message"] == "new agent started")
            .and_then(|v| v["successor"].as_u64());
        if let Some(pid) = started
            && lines.iter().any(|v| {
                v["message"] == "the new agent exited before it took over; this agent serves on"
                    && v["successor"].as_u64() == Some(pid)
            })
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the running agent did not report the new agent's exit within 30 s: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !enforcer_tests::pid_alive(started as u32),
        "the new agent {started} exited"
    );
    assert_serves_on(&mut m);
}
