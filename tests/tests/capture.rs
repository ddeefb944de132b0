//! Kernel capture and the transparent outbound path, end to end: real netns,
//! real cgroups, real enforcer processes, unmodified clients and servers.
use enforcer_tests::{Enforcer, Node, Testbed};
use serde_json::Value;

/// Two linked nodes, a Python HTTP server on b:8080 (dual stack), and the
/// enforcer running on a.
fn two_nodes(test: &str) -> (Testbed, Node, Node, Enforcer) {
    two_nodes_with(test, "", None)
}

/// Like [`two_nodes`], with extra `[capture]` keys and, optionally, the
/// enforcer itself started inside a child cgroup of the captured subtree.
fn two_nodes_with(
    test: &str,
    capture: &str,
    enforcer_cgroup: Option<&str>,
) -> (Testbed, Node, Node, Enforcer) {
    let (mut tb, a, b) = Testbed::linked_pair(test).expect("two linked nodes");
    tb.start_server(&b, "http", enforcer_tests::HTTP_SERVER, 8080)
        .expect("http server on b");
    let cfg = tb.enforcer_config(&a, capture).expect("config");
    let enf = tb
        .start_enforcer_in(&a, &cfg, enforcer_cgroup)
        .expect("enforcer on a");
    (tb, a, b, enf)
}

/// Prints the socket's peer name, sends a request and prints the status line.
const PY_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((host, port))
print("PEER", s.getpeername()[0], s.getpeername()[1])
s.sendall(b"GET /?py-client HTTP/1.0\r\n\r\n")
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
print("STATUS", data.split(b"\r\n")[0].decode())
"#;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_captured(enf: &Enforcer, pid: u32, unit: &str, dst: &str) -> Value {
    let line = enf
        .wait_for_connection(|v| v["pid"] == pid)
        .unwrap_or_else(|| {
            panic!(
                "no connection from pid {pid} in the enforcer log:\n{}",
                std::fs::read_to_string(&enf.log).unwrap_or_default()
            )
        });
    assert_eq!(line["orig_dst"], dst, "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");
    let cgroup = line["cgroup"].as_str().unwrap_or_default();
    assert!(
        cgroup.ends_with(&format!("/a/{unit}")),
        "cgroup {cgroup:?} should name the workload's cgroup ({line})"
    );
    assert!(line["bytes_sent"].as_u64().unwrap_or(0) > 0, "{line}");
    assert!(line["bytes_received"].as_u64().unwrap_or(0) > 0, "{line}");
    assert!(line["conn_id"].as_u64().is_some(), "{line}");
    assert!(line["uid"].as_u64().is_some(), "{line}");
    assert!(line["duration_ms"].as_u64().is_some(), "{line}");
    line
}

fn check_client_reaches_server(ipv6: bool) {
    let (tb, a, b, enf) = two_nodes(if ipv6 { "cap6" } else { "cap4" });
    let host = if ipv6 { b.ipv6.clone() } else { b.ipv4.clone() };
    let url_host = if ipv6 {
        format!("[{host}]")
    } else {
        host.clone()
    };

    // curl, unmodified, in its own cgroup under node a's captured subtree.
    let url = format!("http://{url_host}:8080/?curl-client");
    let (pid, out) = a
        .exec(
            Some("curl-client.service"),
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{remote_ip}",
                &url,
            ],
        )
        .expect("curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        format!("200 {host}"),
        "curl should see the original peer"
    );
    assert_captured(
        &enf,
        pid,
        "curl-client.service",
        &format!("{url_host}:8080"),
    );

    // A Python socket client: getpeername() must return the original address.
    let (pid, out) = a
        .exec(
            Some("py-client.service"),
            &["python3", "-c", PY_CLIENT, &host, "8080"],
        )
        .expect("python client");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(
        text.contains(&format!("PEER {host} 8080")),
        "getpeername() must return the original peer: {text}"
    );
    assert!(text.contains("STATUS HTTP/1.0 200 OK"), "{text}");
    assert_captured(&enf, pid, "py-client.service", &format!("{url_host}:8080"));

    // The server saw both requests, from node a's address (forwarded by the agent).
    for needle in ["/?curl-client", "/?py-client"] {
        assert!(
            tb.wait_server_log(&b, "http", needle),
            "server never saw {needle}: {}",
            tb.server_log(&b, "http")
        );
    }
    let a_addr = if ipv6 { &a.ipv6 } else { &a.ipv4 };
    assert!(
        tb.server_log(&b, "http").contains(a_addr.as_str()),
        "the server sees node a's address"
    );

    // Metrics record both connections and their bytes.
    let opened = enf
        .metric(
            "enforcer_connections_opened_total",
            &[("direction", "outbound")],
        )
        .expect("metrics");
    let ok = enf
        .metric(
            "enforcer_connections_closed_total",
            &[("direction", "outbound"), ("outcome", "ok")],
        )
        .expect("metrics");
    let sent = enf
        .metric(
            "enforcer_bytes_total",
            &[("direction", "outbound"), ("flow", "sent")],
        )
        .expect("metrics");
    let received = enf
        .metric(
            "enforcer_bytes_total",
            &[("direction", "outbound"), ("flow", "received")],
        )
        .expect("metrics");
    assert_eq!(opened, 2.0);
    assert_eq!(ok, 2.0);
    assert!(
        sent > 0.0 && received > sent,
        "sent {sent} received {received}"
    );
    assert_eq!(
        enf.metric("enforcer_active_connections", &[("direction", "outbound")])
            .expect("metrics"),
        0.0
    );
    drop(tb);
}

#[test]
fn ipv4_client_reaches_server_through_enforcer() {
    check_client_reaches_server(false);
}

#[test]
fn ipv6_client_reaches_server_through_enforcer() {
    check_client_reaches_server(true);
}

#[test]
fn process_outside_captured_subtree_is_not_captured() {
    let (_tb, a, b, enf) = two_nodes("outside");
    let url = format!("http://{}:8080/?outside", b.ipv4);
    a.get_ok(None, &url);
    // A captured one afterwards proves the enforcer was up and logging.
    let pid = a.get_ok(Some("inside.service"), &url);
    assert_captured(&enf, pid, "inside.service", &format!("{}:8080", b.ipv4));
    assert_eq!(
        enf.closed_connections().len(),
        1,
        "only the captured connection may be logged"
    );
    assert_eq!(
        enf.metric("enforcer_connections_opened_total", &[])
            .expect("metrics"),
        1.0
    );
}

#[test]
fn uncaptured_ports_and_loopback_go_direct() {
    let (mut tb, a, b, enf) = two_nodes_with("ports", "ports = [\"9000-9999\"]", None);
    tb.start_server(
        &b,
        "http2",
        &["python3", "-m", "http.server", "9090", "--bind", "::"],
        9090,
    )
    .expect("server");
    for (port, captured) in [(8080, false), (9090, true)] {
        let url = format!("http://{}:{port}/", b.ipv4);
        let pid = a.get_ok(Some("w.service"), &url);
        let logged = enf.wait_for_connection(|v| v["pid"] == pid).is_some();
        assert_eq!(logged, captured, "port {port} captured={captured}");
    }
    // The metrics endpoint on loopback is reachable from a captured workload: loopback is never captured.
    a.get_ok(Some("w.service"), "http://127.0.0.1:15020/healthz");
}

#[test]
fn stopped_enforcer_refuses_captured_connects() {
    let (mut tb, a, b, enf) = two_nodes("stopped");
    tb.stop(enf.pid).expect("stop enforcer");
    let url = format!("http://{}:8080/?must-not-arrive", b.ipv4);
    let (_, out) = a
        .exec(
            Some("client.service"),
            &["curl", "-sS", "-o", "/dev/null", &url],
        )
        .expect("curl");
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl must fail to connect (exit 7): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, out) = a
        .exec(
            Some("client.service"),
            &["python3", "-c", PY_CLIENT, &b.ipv6, "8080"],
        )
        .expect("py");
    // The kernel refuses the connect itself (EPERM): the agent's listener is gone.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PermissionError"),
        "{out:?}"
    );
    assert!(
        !tb.server_log(&b, "http").contains("/must-not-arrive"),
        "nothing may bypass the stopped agent"
    );
}

#[test]
fn enforcer_restart_takes_over_capture() {
    let (mut tb, a, b, enf) = two_nodes("restart");
    tb.stop(enf.pid).expect("stop");
    let cfg = tb.dir.join("a.toml");
    let enf2 = tb.start_enforcer(&a, &cfg).expect("restart");
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = a.get_ok(Some("client.service"), &url);
    assert_captured(&enf2, pid, "client.service", &format!("{}:8080", b.ipv4));
    let links = std::fs::read_dir(format!(
        "/sys/fs/bpf/enforcer/v2/{}/links",
        tb.node_instance(&a)
    ))
    .expect("pinned links")
    .count();
    assert_eq!(links, 8, "exactly one set of pinned links after a restart");
}

/// `enforcer detach` removes the pins, and the pins are what hold the
/// programs attached (the agent keeps no link of its own). The attack:
/// detached under a running agent — by mistake, or by a script that
/// "uninstalls" — the capture was gone while the agent ran on and reported
/// ready, and the workloads' connections went direct: no identity, no
/// mTLS, no policy (before: detach succeeded and the next connection was
/// not captured). Now it refuses while an agent of that config runs, and
/// detaches once it is stopped; with its pins gone under it, the agent
/// says it captures nothing, is not ready and takes back the slice's mark.
#[test]
fn detach_refuses_while_an_agent_of_its_config_runs() {
    let (mut tb, a, b, enf) = two_nodes("detachrun");
    let cfg = tb.dir.join("a.toml");
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", tb.node_instance(&a));
    let run_dir = tb.dir.join("run");
    let detach = |force: bool| {
        let mut cmd = std::process::Command::new(enforcer_tests::enforcer_bin());
        // The testbed's runtime directory, not the host's /run/enforcer.
        cmd.args(["detach", "--config"])
            .arg(&cfg)
            .env("RUNTIME_DIRECTORY", &run_dir);
        if force {
            cmd.arg("--force");
        }
        cmd.output().expect("enforcer detach")
    };
    let out = detach(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is running") && err.contains("stop it first"),
        "detach with the agent running must refuse, naming why: {out:?}"
    );
    assert!(std::path::Path::new(&pins).exists(), "the pins are kept");
    // The capture is still in place: the next connection is the agent's.
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = a.get_ok(Some("client.service"), &url);
    assert_captured(&enf, pid, "client.service", &format!("{}:8080", b.ipv4));
    // The agent saw a check, not a failed handover (its log is written by
    // a thread of its own: waited for).
    let log = || std::fs::read_to_string(&enf.log).unwrap_or_default();
    enforcer_tests::wait_for("the agent's line for the check", || {
        log().contains("a process asked whether this agent runs")
    });
    assert!(!log().contains("handover failed"), "{}", log());
    // Stopped, it detaches.
    tb.stop(enf.pid).expect("stop the agent");
    let out = detach(false);
    assert!(
        out.status.success(),
        "detach with the agent stopped: {out:?}"
    );
    assert!(!std::path::Path::new(&pins).exists(), "the pins are gone");

    // Pins gone under a running agent (removed by hand here; `detach
    // --force` removes them too): the agent notices that it captures
    // nothing, is not ready, and takes back the mark `enforced.slice`
    // asserts (before: it stayed ready, and the mark stayed).
    std::fs::create_dir_all(&run_dir).expect("the agent's runtime directory");
    let run = run_dir.to_str().expect("utf-8 path").to_owned();
    let enf = tb
        .start_enforcer_env(&a, &cfg, None, &[("RUNTIME_DIRECTORY", &run)])
        .expect("the agent again");
    let mark = run_dir.join("capture-attached");
    assert!(
        std::fs::read_to_string(&mark).is_ok_and(|t| t.contains(&format!("pins {pins}"))),
        "the agent writes its mark, naming its pins, once attached"
    );
    assert_eq!(
        a.http_get(enf.metrics_addr, "/readyz").expect("readyz").0,
        200
    );
    for pin in std::fs::read_dir(format!("{pins}/links")).expect("link pins") {
        std::fs::remove_file(pin.expect("pin").path()).expect("remove a link pin");
    }
    enforcer_tests::wait_for("the agent to say it is not ready", || {
        a.http_get(enf.metrics_addr, "/readyz")
            .is_ok_and(|(status, _)| status == 503)
    });
    enforcer_tests::wait_for("the agent's line saying why it is not ready", || {
        std::fs::read_to_string(&enf.log)
            .unwrap_or_default()
            .contains("the kernel programs are detached")
    });
    enforcer_tests::wait_for("the agent to take its mark back", || !mark.exists());
    let m = enf.metrics().expect("metrics");
    assert_eq!(
        enforcer_tests::sum_metric(&m, "enforcer_ready", &[]),
        0.0,
        "{m}"
    );
    // `--force` detaches under it without asking.
    let out = detach(true);
    assert!(out.status.success(), "detach --force: {out:?}");
    assert!(!std::path::Path::new(&pins).exists(), "the pins are gone");
}

#[test]
fn detach_works_from_a_config_that_no_longer_loads() {
    // An agent that cannot start on its config (a key an upgrade refuses, a
    // typo since it started) leaves its pins, and so its programs, attached:
    // uninstalling must not depend on the rest of the file. Before, detach
    // refused with the config's error and left them (as this suite's own
    // cleanup did after a test that broke a config on purpose).
    let (mut tb, a, _b, enf) = two_nodes("detachbroken");
    let cfg = tb.dir.join("a.toml");
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", tb.node_instance(&a));
    let run_dir = tb.dir.join("run");
    let detach = || {
        std::process::Command::new(enforcer_tests::enforcer_bin())
            .args(["detach", "--config"])
            .arg(&cfg)
            .env("RUNTIME_DIRECTORY", &run_dir)
            .output()
            .expect("enforcer detach")
    };
    tb.stop(enf.pid).expect("stop the agent");
    assert!(std::path::Path::new(&pins).exists(), "the agent pinned");
    let text = std::fs::read_to_string(&cfg).expect("a.toml");
    // Not TOML at all: nothing can be read, so nothing is removed, and the
    // error says how to remove the pins by hand.
    std::fs::write(&cfg, format!("{text}\n[capture\n")).expect("a.toml");
    let out = detach();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("by hand") && err.contains("rm -r"),
        "detach of a file that is not TOML must fail, saying what to do: {out:?}"
    );
    assert!(std::path::Path::new(&pins).exists(), "nothing was removed");
    // TOML with a table no release knows: detached by its node_name,
    // capture.bpffs and identity.state_dir, with a warning naming why.
    std::fs::write(&cfg, format!("{text}\n[no_such_table]\nkey = 1\n")).expect("a.toml");
    // The runtime directory holds another instance's mark (an agent of the
    // host under another node_name, still attached): kept.
    std::fs::create_dir_all(&run_dir).expect("runtime directory");
    let mark = run_dir.join("capture-attached");
    std::fs::write(
        &mark,
        "/sys/fs/cgroup/enforced.slice\npins /sys/fs/bpf/enforcer/v2/another-node\n",
    )
    .expect("mark");
    let out = detach();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "detach of a config that no longer loads: {out:?}"
    );
    assert!(
        err.contains("warning") && err.contains("no_such_table") && err.contains("node_name"),
        "detach says the file did not load and what it went by: {err}"
    );
    assert!(!std::path::Path::new(&pins).exists(), "the pins are gone");
    assert!(
        mark.exists() && String::from_utf8_lossy(&out.stdout).contains("another-node"),
        "another instance's mark is kept, saying whose it is: {out:?}"
    );
    // Its own mark (as the agent wrote it) goes, also with nothing pinned.
    std::fs::write(&mark, format!("/sys/fs/cgroup/x\npins {pins}\n")).expect("mark");
    let out = detach();
    assert!(out.status.success(), "{out:?}");
    assert!(!mark.exists(), "its own mark is removed: {out:?}");
}

#[test]
fn detach_by_name_needs_no_config() {
    // A package purged, the config gone: detach by the instance's name, with
    // the same refusal under a running agent.
    let (mut tb, a, _b, enf) = two_nodes("detachname");
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", tb.node_instance(&a));
    let (name, state) = (tb.node_instance(&a), tb.dir.join("a-state"));
    let (run_dir, cfg) = (tb.dir.join("run"), tb.dir.join("a.toml"));
    let detach = || {
        std::process::Command::new(enforcer_tests::enforcer_bin())
            .args(["detach", "--node-name", &name, "--state-dir"])
            .arg(&state)
            .env("RUNTIME_DIRECTORY", &run_dir)
            .output()
            .expect("enforcer detach")
    };
    let out = detach();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is running"),
        "refused under the running agent: {out:?}"
    );
    assert!(std::path::Path::new(&pins).exists(), "the pins are kept");
    tb.stop(enf.pid).expect("stop the agent");
    std::fs::remove_file(&cfg).expect("the config gone");
    let out = detach();
    assert!(out.status.success(), "detach by name: {out:?}");
    assert!(!std::path::Path::new(&pins).exists(), "the pins are gone");
}

#[test]
fn enforcer_inside_captured_subtree_does_not_capture_itself() {
    let (_tb, a, b, enf) = two_nodes_with("self", "", Some("enforcer.service"));
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = a.get_ok(Some("client.service"), &url);
    assert_captured(&enf, pid, "client.service", &format!("{}:8080", b.ipv4));
    assert_eq!(
        enf.closed_connections().len(),
        1,
        "the agent's own upstream connect must not loop back into it"
    );
}

#[test]
fn direct_connection_to_outbound_listener_is_refused() {
    let (_tb, a, _b, enf) = two_nodes("direct");
    // Not captured (outside the subtree): garbage straight to the listener.
    let (_, out) = a
        .exec(None, &["python3", "-c", "import socket; s=socket.create_connection(('127.0.0.1',15001)); s.sendall(b'\\x00garbage'*100); print(s.recv(10))"])
        .expect("python");
    assert!(
        !out.status.success() || stdout(&out).contains("b''"),
        "{out:?}"
    );
    let line = enf
        .wait_for_connection(|v| v["outcome"] == "no_original_destination")
        .expect("refusal logged");
    assert_eq!(line["bytes_sent"], 0);
    assert_eq!(
        enf.metric(
            "enforcer_connections_closed_total",
            &[("outcome", "no_original_destination")]
        )
        .expect("metrics"),
        1.0
    );
}

#[test]
fn readyz_and_capture_map_metrics() {
    let (_tb, a, _b, enf) = two_nodes("ready");
    assert_eq!(
        a.http_get(enf.metrics_addr, "/readyz").expect("readyz").0,
        200
    );
    assert_eq!(
        a.http_get(enf.metrics_addr, "/healthz").expect("healthz").0,
        200
    );
    assert_eq!(a.http_get(enf.metrics_addr, "/nope").expect("404").0, 404);
    let m = enf.metrics().expect("metrics");
    for name in [
        "enforcer_capture_map_entries{",
        "enforcer_active_connections",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    // aws-lc's random generator is seeded from CPU jitter (≈ 20 ms) on its
    // first use: before the agent serves, not in a connection's handshake.
    let lines = enf.log_lines();
    let at = |message: &str| lines.iter().position(|l| l["message"] == message);
    match (at("random generator seeded"), at("enforcer ready")) {
        (Some(seeded), Some(ready)) => assert!(seeded < ready, "seeded after ready"),
        other => panic!("no seeding before ready in the agent's log: {other:?}"),
    }
}

#[test]
fn captured_cgroup_in_another_netns_is_not_redirected() {
    // A process of a's captured subtree that lives in another network namespace
    // (a container with its own netns): the agent has no listener there, so the
    // kernel must leave it alone instead of redirecting it into nothing.
    let (_tb, a, b, enf) = two_nodes("othernetns");
    let foreign = Node {
        netns: b.netns.clone(),
        ..a.clone()
    };
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = foreign.get_ok(Some("container.service"), &url);
    assert!(enf.closed_connections().iter().all(|v| v["pid"] != pid));
    // While the same cgroup in the agent's netns is captured.
    let pid = a.get_ok(Some("container.service"), &url);
    assert_captured(&enf, pid, "container.service", &format!("{}:8080", b.ipv4));
}

#[test]
fn excluded_cidr_inside_captured_range_goes_direct() {
    let (_tb, a, b, enf) = two_nodes_with(
        "exclcidr",
        "cidrs = [\"10.10.0.0/24\", \"fd10::/64\"]\nexclude_cidrs = [\"10.10.0.2/32\"]",
        None,
    );
    let url4 = format!("http://{}:8080/", b.ipv4);
    let pid4 = a.get_ok(Some("w.service"), &url4);
    let url6 = format!("http://[{}]:8080/", b.ipv6);
    let pid6 = a.get_ok(Some("w.service"), &url6);
    assert_captured(&enf, pid6, "w.service", &format!("[{}]:8080", b.ipv6));
    assert!(
        enf.closed_connections().iter().all(|v| v["pid"] != pid4),
        "10.10.0.2 is excluded and must not be captured"
    );
}

/// Connects to HOST:PORT, sends a GET naming PATH and prints what happened.
const PY_ATTACK: &str = r#"
import socket, sys, os
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("PID", os.getpid())
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n\r\n")
    print("CONNECTED", s.recv(100)[:12])
except OSError as e:
    print("REFUSED", e.errno)
"#;

#[test]
fn dead_agents_recycled_pid_is_still_captured() {
    // The attack: after the agent is SIGKILLed, a workload in the captured
    // cgroup forks until it is given the agent's pid, then connects anywhere
    // uncaptured. Self-exclusion by pid let it through.
    let (mut tb, a, b, enf) = two_nodes_with("pidrecycle", "", Some("enforcer.service"));
    let agent_pid = enf.pid;
    tb.kill(agent_pid).expect("SIGKILL the agent");
    let out = a
        .exec_as_pid(
            "attacker.service",
            agent_pid,
            &["python3", "-c", PY_ATTACK, &b.ipv4, "8080", "/pid-recycled"],
        )
        .expect("attacker with the dead agent's pid");
    let text = stdout(&out);
    assert!(
        text.contains(&format!("PID {agent_pid}")),
        "the attacker must hold the agent's old pid: {text}"
    );
    assert!(
        text.contains("REFUSED 1"),
        "the connect must fail closed (EPERM): {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server saw nothing: wait for a request that does arrive (from
    // outside the captured subtree) before asserting the attack's absence.
    a.exec(
        None,
        &["curl", "-sS", &format!("http://{}:8080/marker", b.ipv4)],
    )
    .expect("curl");
    assert!(tb.wait_server_log(&b, "http", "/marker"));
    assert!(
        !tb.server_log(&b, "http").contains("/pid-recycled"),
        "the attacker's request reached the server"
    );
}

#[test]
fn workload_listening_on_the_dead_agents_port_receives_nothing() {
    // The attack: with the agent down, an unprivileged process binds the
    // outbound listener's loopback port and so receives every captured
    // connect of every other workload on the node, in plaintext.
    let (mut tb, a, b, enf) = two_nodes("squat15001");
    tb.kill(enf.pid).expect("SIGKILL the agent");
    let squatter = r#"
import socket, sys
l = socket.socket(); l.bind(("127.0.0.1", 15001)); l.listen(16)
print("LISTENING", flush=True)
l.settimeout(20)
try:
    c, _ = l.accept()
    print("STOLE", c.recv(200), flush=True)
except socket.timeout:
    pass
"#;
    let cmd = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        // Debian's interpreter: a per-user one (pyenv) is not readable by nobody.
        "/usr/bin/python3",
        "-u",
        "-c",
        squatter,
    ];
    tb.spawn(&a, Some("squatter.service"), "squatter", &cmd)
        .expect("squatter");
    assert!(
        tb.wait_server_log(&a, "squatter", "LISTENING"),
        "squatter did not bind: {}",
        tb.server_log(&a, "squatter")
    );
    let (_, out) = a
        .exec(
            Some("victim.service"),
            &["python3", "-c", PY_ATTACK, &b.ipv4, "8080", "/secret"],
        )
        .expect("victim");
    assert!(
        stdout(&out).contains("REFUSED 1"),
        "a captured connect must be refused, not handed to the squatter: {}",
        stdout(&out)
    );
    assert!(
        !tb.server_log(&a, "squatter").contains("STOLE"),
        "the squatter received a captured connection: {}",
        tb.server_log(&a, "squatter")
    );
}

#[test]
fn v4_mapped_ipv6_connect_is_captured_like_ipv4() {
    let (_tb, a, b, enf) = two_nodes("v4mapped");
    let mapped = format!("::ffff:{}", b.ipv4);
    let (pid, out) = a
        .exec(
            Some("dual.service"),
            &["python3", "-c", PY_CLIENT, &mapped, "8080"],
        )
        .expect("python");
    let text = stdout(&out);
    assert!(
        text.contains("STATUS HTTP/1.0 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("PEER {mapped} 8080")),
        "getpeername must show the original v4-mapped peer: {text}"
    );
    assert_captured(&enf, pid, "dual.service", &format!("{}:8080", b.ipv4));
}

#[test]
fn destination_that_aborts_resets_the_workload_connection_instead_of_closing_it() {
    // The failure: the destination resets the connection mid-answer; the
    // agent ended the workload's side with a clean FIN, so a download that
    // broke looked complete.
    let (mut tb, a, b, enf) = two_nodes("abort");
    let (pid, out) = tb
        .aborted_download(&b, None, &a, "client.service", 9400)
        .expect("aborted download");
    let text = stdout(&out);
    assert!(
        text.starts_with("RESET"),
        "the workload must see the reset, not a clean end: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = enf.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "error", "{line}");
}

#[test]
fn an_agent_retires_the_pins_of_another_layout_version() {
    // The failure: an agent of a release with another `LAYOUT_VERSION`
    // (its pins under `enforcer/v<N>/<node>`) left its programs attached
    // when it stopped, as every agent does (fail closed). The next agent,
    // of this release, attached its own beside them. The old connect
    // program, attached first, runs first: it redirected every captured
    // connect and recorded it in its own maps, which this agent does not
    // read, so every captured connection was refused. Here the previous
    // release's pins are this release's, moved to a `v1` directory: still
    // attached, with maps of their own.
    let (mut tb, a, b, enf) = two_nodes("layoutbump");
    tb.stop(enf.pid).expect("stop");
    let instance = tb.node_instance(&a);
    let pins = enforcer_tests::OtherLayoutPins::moved_from_v2(&instance);
    let other = pins.0.clone();
    assert!(
        other.join("links").join("enf_connect4").exists(),
        "the other version's connect program is pinned, hence attached"
    );
    let cfg = tb.dir.join("a.toml");
    let enf2 = tb
        .start_enforcer(&a, &cfg)
        .expect("the agent of this release");
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = a.get_ok(Some("client.service"), &url);
    assert_captured(&enf2, pid, "client.service", &format!("{}:8080", b.ipv4));
    assert!(
        !other.exists(),
        "the other version's pins are retired: {:?}",
        std::fs::read_dir(&other).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    let retired = enf2.log_lines().into_iter().any(|l| {
        l["message"] == "retired the kernel programs of another layout version" && l["version"] == 1
    });
    assert!(retired, "the agent says what it retired");
}

/// Sends one datagram to `argv[1]`:`argv[2]` each way — `sendto` on an
/// unconnected socket, `connect` then `send` — tagged `argv[3]`; prints
/// `SENT <how>` or `REFUSED <how> <errno>`.
const PY_UDP_CLIENT: &str = r#"
import errno, socket, sys
host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
for how in ("sendto", "connect"):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    msg = ("%s %s %d" % (tag, how, port)).encode()
    try:
        if how == "sendto":
            s.sendto(msg, (host, port))
        else:
            s.connect((host, port))
            s.send(msg)
        print("SENT", how, flush=True)
    except OSError as e:
        print("REFUSED", how, errno.errorcode.get(e.errno, e.errno), flush=True)
"#;

/// UDP receivers on the ports given (IPv6 and IPv4): prints `GOT <datagram>`.
const PY_UDP_SERVER: &str = r#"
import socket, sys, threading
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", port))
    socks.append(s)
def serve(s):
    while True:
        print("GOT", s.recv(2048).decode(), flush=True)
for s in socks:
    threading.Thread(target=serve, args=(s,)).start()
print("READY", flush=True)
"#;

/// Runs [`PY_UDP_CLIENT`] on `node` (in `unit`; outside the captured
/// subtree with `None`) to `host`:`port`; its output.
fn udp_send(node: &Node, unit: Option<&str>, host: &str, port: u16, tag: &str) -> String {
    let (_, out) = node
        .exec(
            unit,
            &["python3", "-c", PY_UDP_CLIENT, host, &port.to_string(), tag],
        )
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn udp_to_a_captured_destination_is_refused_but_on_its_pass_ports() {
    // The attack: the agent relays TCP only, and UDP from a captured
    // workload went wherever it was sent — QUIC (HTTP/3) to a model's API
    // past every per-request decision, token budget and audit line, or to
    // any UDP service of the mesh with no identity (before: every send
    // below reached b). Now UDP to a destination the capture rules cover
    // is refused (EPERM) on a connect and on a send, but on
    // `capture.udp_pass_ports` (DNS by default); `capture.udp = "pass"`
    // lets it through as before.
    let (mut tb, a, b, enf) = two_nodes("udp");
    tb.spawn(
        &b,
        None,
        "udp",
        &["python3", "-u", "-c", PY_UDP_SERVER, "9999", "53"],
    )
    .expect("UDP receivers on b");
    assert!(
        tb.wait_server_log(&b, "udp", "READY"),
        "{}",
        tb.server_log(&b, "udp")
    );
    for host in [b.ipv4.to_string(), b.ipv6.to_string()] {
        let out = udp_send(&a, Some("client.service"), &host, 9999, "captured");
        assert_eq!(
            out, "REFUSED sendto EPERM\nREFUSED connect EPERM\n",
            "UDP from a captured workload to {host}:9999"
        );
        let out = udp_send(&a, Some("client.service"), &host, 53, "dns");
        assert_eq!(out, "SENT sendto\nSENT connect\n", "{host}:53 passes");
    }
    // Outside the captured subtree, UDP goes as ever.
    let out = udp_send(&a, None, &b.ipv4.to_string(), 9999, "outside");
    assert_eq!(out, "SENT sendto\nSENT connect\n");
    assert!(
        tb.wait_server_log(&b, "udp", "GOT outside connect 9999"),
        "{}",
        tb.server_log(&b, "udp")
    );
    let log = tb.server_log(&b, "udp");
    assert!(
        log.contains("GOT dns sendto 53") && log.contains("GOT dns connect 53"),
        "{log}"
    );
    assert!(
        !log.contains("captured"),
        "a refused datagram arrived: {log}"
    );
    assert_eq!(
        enf.metric("enforcer_udp_refused_total", &[]).ok(),
        Some(4.0),
        "each refusal counted (two addresses, two ways)"
    );

    // `udp = "pass"`: as before.
    let (mut tb, a, b, _enf) = two_nodes_with("udppass", "udp = \"pass\"\n", None);
    tb.spawn(
        &b,
        None,
        "udp",
        &["python3", "-u", "-c", PY_UDP_SERVER, "9999"],
    )
    .expect("UDP receiver on b");
    assert!(
        tb.wait_server_log(&b, "udp", "READY"),
        "{}",
        tb.server_log(&b, "udp")
    );
    let out = udp_send(
        &a,
        Some("client.service"),
        &b.ipv4.to_string(),
        9999,
        "passed",
    );
    assert_eq!(out, "SENT sendto\nSENT connect\n");
    assert!(
        tb.wait_server_log(&b, "udp", "GOT passed connect 9999"),
        "{}",
        tb.server_log(&b, "udp")
    );
}

#[test]
fn no_port_is_left_uncaptured_by_default() {
    // The attack: the default left ports 22 and 15008 uncaptured, at every
    // destination: a captured workload reached any host's ssh (a tunnel,
    // `ssh -D`, to anywhere, undecided and unaudited) and anything an
    // outside host served on 15008 (before: neither connection below was
    // seen by the agent). Now nothing is excluded by default.
    let (mut tb, a, b, enf) = two_nodes("noexcl");
    for port in [22u16, 15008] {
        tb.start_server(
            &b,
            &format!("outside-{port}"),
            &["python3", "-m", "http.server", &port.to_string()],
            port,
        )
        .expect("a server on b");
        let pid = a.get_ok(
            Some("client.service"),
            &format!("http://{}:{port}/", b.ipv4),
        );
        assert!(
            enf.wait_for_connection(|v| v["pid"] == pid).is_some(),
            "port {port}: a captured workload's connection went around the agent"
        );
    }
}
