//! Workload identity and SPIFFE mutual TLS between nodes (HBONE), end to end:
//! two real agents, real workloads in their own cgroups, real TLS on the veth.
use std::time::{Duration, Instant};

use enforcer_tests::{MESH, Node, Pair, Testbed, entry, llm_pair, llm_pair_env};
use serde_json::Value;

const TD: &str = "ai.example.org";
const AGENT_ID: &str = "spiffe://ai.example.org/agent/support";
const LLM_ID: &str = "spiffe://ai.example.org/llm";
/// A workload that takes a port another identity served.
const SQUAT_ID: &str = "spiffe://ai.example.org/squatter";
/// Nodes a and b sharing one CA; an HTTP server registered as the LLM on b
/// (port 8080, in b/llm.service); the support agent's unit registered on a.
fn mesh(test: &str, extra_identity_a: &str) -> Pair {
    mesh_with(test, extra_identity_a, "")
}

/// Like [`mesh`], with raw TOML appended to b's config (after its `[mesh]`).
fn mesh_with(test: &str, extra_identity_a: &str, tail_b: &str) -> Pair {
    mesh_nodes(test, extra_identity_a, "", tail_b)
}

/// Like [`mesh_with`], with extra `[identity]` keys for b too.
fn mesh_nodes(test: &str, extra_identity_a: &str, extra_identity_b: &str, tail_b: &str) -> Pair {
    llm_pair(test, TD, |_, n| {
        if n.name == "a" {
            (
                extra_identity_a.to_owned(),
                format!(
                    "{}\n{MESH}",
                    entry(AGENT_ID, "systemd:unit:support-agent.service")
                ),
            )
        } else {
            (
                extra_identity_b.to_owned(),
                format!(
                    "{}\n{MESH}{tail_b}",
                    entry(LLM_ID, "systemd:unit:llm.service")
                ),
            )
        }
    })
    .expect("two nodes")
}

/// Seconds since midnight of an RFC 3339 log timestamp (`…T10:00:01.5Z`).
fn seconds_of_day(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The support agent on a gets 200 from the LLM on b (b:8080).
fn assert_support_agent_reaches_llm(m: &Pair) {
    m.a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8080/", m.b.ipv4),
    );
}

fn curl(node: &Node, unit: &str, url: &str) -> (u32, std::process::Output) {
    node.exec(
        Some(unit),
        &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url],
    )
    .expect("curl")
}

#[test]
fn a_to_b_is_mutual_tls_between_workload_identities() {
    let mut m = mesh("mtls", "");
    let marker = "ENFORCER-PLAINTEXT-MARKER-7f3a";
    // Watch the wire between the nodes.
    let pcap = m.tb.dir.join("veth.pcap");
    let pcap_s = pcap.display().to_string();
    let tcpdump =
        m.tb.spawn(
            &m.a,
            None,
            "tcpdump",
            &[
                // Immediate mode: packets are written as they come, not when
                // a ring block fills or times out (~1 s), which a quick test
                // would stop tcpdump before.
                "tcpdump",
                "--immediate-mode",
                "-i",
                "to-b",
                "-U",
                "-s",
                "0",
                "-w",
                &pcap_s,
                "tcp",
            ],
        )
        .expect("tcpdump (install: apt-get install tcpdump)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.tb.server_log(&m.a, "tcpdump").contains("listening on") {
        assert!(
            Instant::now() < deadline,
            "tcpdump did not start: {}",
            m.tb.server_log(&m.a, "tcpdump")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for url in [
        format!("http://{}:8080/?{marker}", m.b.ipv4),
        format!("http://[{}]:8080/?{marker}-v6", m.b.ipv6),
    ] {
        let (pid, out) = curl(&m.a, "support-agent.service", &url);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let a_line = m.ea.connection_line(|v| v["pid"] == pid);
        assert_eq!(a_line["src_spiffe_id"], AGENT_ID, "{a_line}");
        assert_eq!(a_line["dst_spiffe_id"], LLM_ID, "{a_line}");
        assert_eq!(a_line["mtls"], true, "{a_line}");
        assert_eq!(a_line["outcome"], "ok", "{a_line}");
    }
    assert!(
        m.tb.wait_server_log(&m.b, "llm", marker),
        "the server must get the request"
    );

    // b's agent logs the client's verified SPIFFE ID.
    let b_line =
        m.eb.connection_line(|v| v["direction"] == "inbound" && v["outcome"] == "ok");
    assert_eq!(b_line["src_spiffe_id"], AGENT_ID, "{b_line}");
    assert_eq!(b_line["authenticated"], true, "{b_line}");
    assert_eq!(b_line["dst_spiffe_id"], LLM_ID, "{b_line}");
    assert!(
        b_line["bytes_received"].as_u64().unwrap_or(0) > 0,
        "{b_line}"
    );

    // The bytes on the veth are TLS: the marker never appears, port 15008 does.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0) <= 1000
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    m.tb.stop(tcpdump).expect("stop tcpdump");
    let wire = std::fs::read(&pcap).expect("pcap");
    assert!(
        wire.len() > 1000,
        "capture too small ({} bytes): nothing crossed the veth?",
        wire.len()
    );
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "plaintext marker seen on the wire between the nodes"
    );
    let port = 15008u16.to_be_bytes();
    assert!(
        wire.windows(2).any(|w| w == port),
        "no traffic to port 15008 captured"
    );
}

#[test]
fn workload_without_identity_is_refused_for_mesh_destinations() {
    let m = mesh("noid", "");
    let (pid, out) = curl(
        &m.a,
        "unregistered.service",
        &format!("http://{}:8080/?no-identity", m.b.ipv4),
    );
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    let line = m.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "no_identity", "{line}");
    assert!(line["src_spiffe_id"].is_null(), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !m.tb.server_log(&m.b, "llm").contains("no-identity"),
        "nothing may reach the server"
    );
}

#[test]
fn bad_clients_on_the_hbone_port_are_rejected_with_a_reason() {
    let m = mesh("reject", "");
    let ca_dir = m.tb.dir.join("ca-shared");
    let (cert, key) = (ca_dir.join("ca.pem"), ca_dir.join("ca.key"));
    let probe = concat!(env!("CARGO_MANIFEST_DIR"), "/helpers/hbone_probe.py");
    let run = |mode: &str| -> String {
        let (_, out) =
            m.a.exec(
                None,
                &[
                    "python3",
                    probe,
                    mode,
                    &m.b.ipv4,
                    "15008",
                    &cert.display().to_string(),
                    &key.display().to_string(),
                ],
            )
            .expect("probe");
        assert!(
            out.status.success(),
            "probe {mode} crashed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // Control: a valid SVID from the shared CA completes the handshake.
    assert_eq!(run("valid"), "handshake ok");
    for (mode, reason) in [
        ("other-ca", "unknown_ca"),
        ("expired", "expired"),
        ("foreign-td", "untrusted_trust_domain"),
        ("two-sans", "multiple_uri_sans"),
        ("no-cert", "no_client_certificate"),
        ("plain-http", "not_tls"),
        ("random", "not_tls"),
    ] {
        let before =
            m.eb.metric("enforcer_hbone_rejected_total", &[("reason", reason)])
                .expect("metrics");
        let result = run(mode);
        assert!(
            !result.starts_with("handshake ok"),
            "{mode} must be rejected, got: {result}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after =
                m.eb.metric("enforcer_hbone_rejected_total", &[("reason", reason)])
                    .expect("metrics");
            if after == before + 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: rejection with reason {reason} not counted:\n{}",
                std::fs::read_to_string(&m.eb.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            m.eb.log_lines()
                .iter()
                .any(|v| v["message"] == "HBONE connection rejected" && v["reason"] == reason),
            "{mode}: no log line with reason {reason}"
        );
    }
}

#[test]
fn svid_renewal_mid_transfer_loses_no_byte() {
    // 4 s SVIDs, renewed every 2 s, during a ~6 s paced transfer of 6 MiB.
    let mut m = mesh("renew", "svid_ttl_secs = 4\n");
    let server = r#"
import hashlib, socket, sys, time
srv = socket.socket(socket.AF_INET6); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 9000)); srv.listen(1)
while True:
    c, _ = srv.accept()
    h = hashlib.sha256()
    try:
        for i in range(96):
            chunk = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB
            h.update(chunk); c.sendall(chunk); time.sleep(0.06)
        print("SENT", h.hexdigest(), flush=True)
    except OSError:
        pass  # the testbed's readiness probe connects and leaves
    c.close()
"#;
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "bulk",
        &["python3", "-c", server],
        9000,
    )
    .expect("bulk server");
    let client = r#"
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], 9000)); h = hashlib.sha256(); n = 0
while True:
    d = s.recv(1 << 16)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest())
"#;
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", client, &m.b.ipv4],
        )
        .expect("client");
    let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        m.tb.wait_server_log(&m.b, "bulk", "SENT"),
        "server never finished"
    );
    let sent = m.tb.server_log(&m.b, "bulk");
    let sent_hash = sent
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("SENT "))
        .expect("hash")
        .to_owned();
    assert_eq!(
        got,
        format!("{} {sent_hash}", 96 * 65536),
        "bytes lost or altered across SVID renewal"
    );
    let renewals =
        m.ea.log_lines()
            .into_iter()
            .filter(|v| v["message"] == "SVID renewed" && v["spiffe_id"] == AGENT_ID)
            .count();
    assert!(
        renewals >= 1,
        "the source SVID was not renewed during the transfer"
    );
    // Renewed at half of its real validity (2 s), never on every tick: the
    // 60 s backdating of not_before is no part of the lifetime.
    let times: Vec<f64> =
        m.ea.log_lines()
            .into_iter()
            .filter(|v| {
                (v["message"] == "SVID renewed" || v["message"] == "SVID issued")
                    && v["spiffe_id"] == AGENT_ID
            })
            .filter_map(|v| v["timestamp"].as_str().and_then(seconds_of_day))
            .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1.5,
            "a 4 s SVID was renewed {:.2} s after the previous one: {times:?}",
            pair[1] - pair[0]
        );
    }
    // A new connection after renewal works on a fresh HBONE connection.
    assert_support_agent_reaches_llm(&m);
}

#[test]
fn federated_trust_domain_is_accepted_only_when_configured() {
    let (mut tb, a, b) = Testbed::linked_pair("fed").expect("two linked nodes");
    let ca_a = tb.shared_ca("a", "a.example.org").expect("ca a");
    let ca_b = tb.shared_ca("b", "b.example.org").expect("ca b");
    let dir = tb.dir.clone();
    let bundle = |n: &str| dir.join(format!("ca-{n}/ca.pem")).display().to_string();
    let fed = |td: &str, path: String| {
        format!("[[identity.federation]]\ntrust_domain = \"{td}\"\nbundle = \"{path}\"\n")
    };
    tb.start_server_in(
        &b,
        Some("llm.service"),
        "llm",
        &["python3", "-m", "http.server", "8080", "--bind", "::"],
        8080,
    )
    .expect("server");
    let url = format!("http://{}:8080/", b.ipv4);

    // First without federation on b: b does not know a.example.org.
    let cfg_b = tb
        .enforcer_config_with(
            &b,
            "",
            &ca_b,
            &format!(
                "{}{MESH}",
                entry("spiffe://b.example.org/llm", "systemd:unit:llm.service")
            ),
        )
        .expect("cfg b");
    let eb = tb.start_enforcer(&b, &cfg_b).expect("enforcer b");
    let cfg_a = tb
        .enforcer_config_with(
            &a,
            "",
            &ca_a,
            &format!(
                "{}{}{MESH}",
                fed("b.example.org", bundle("b")),
                entry(
                    "spiffe://a.example.org/agent",
                    "systemd:unit:support-agent.service"
                )
            ),
        )
        .expect("cfg a");
    let ea = tb.start_enforcer(&a, &cfg_a).expect("enforcer a");
    let (pid, out) = curl(&a, "support-agent.service", &url);
    assert_ne!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "b must refuse an unlisted trust domain"
    );
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "tunnel_failed", "{line}");
    // a finished its side of the handshake; b's refusal arrives as a TLS
    // alert, and a reports it as such (not as an HTTP/2 or socket error).
    let failed = ea
        .log_lines()
        .into_iter()
        .find(|v| v["message"] == "HBONE tunnel failed")
        .expect("a logs the failed tunnel");
    assert_eq!(failed["reason"], "alert_received", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("CertificateUnknown")),
        "{failed}"
    );
    assert!(
        eb.log_lines()
            .iter()
            .any(|v| v["message"] == "HBONE connection rejected"
                && v["reason"] == "untrusted_trust_domain"),
        "b must log the untrusted trust domain"
    );

    // `enforcer ca export-bundle` hands out exactly the CA certificate b uses.
    let exported = std::process::Command::new(enforcer_tests::enforcer_bin())
        .args(["ca", "export-bundle", "--config"])
        .arg(&cfg_b)
        .output()
        .expect("export-bundle");
    assert!(exported.status.success(), "{exported:?}");
    assert_eq!(
        String::from_utf8_lossy(&exported.stdout),
        std::fs::read_to_string(bundle("b")).expect("ca-b")
    );

    // Then b federates with a.example.org: accepted, with a's ID verified.
    tb.stop(eb.pid).expect("stop b");
    let cfg_b = tb
        .enforcer_config_with(
            &b,
            "",
            &ca_b,
            &format!(
                "{}{}{MESH}",
                fed("a.example.org", bundle("a")),
                entry("spiffe://b.example.org/llm", "systemd:unit:llm.service")
            ),
        )
        .expect("cfg b");
    let eb = tb.start_enforcer(&b, &cfg_b).expect("enforcer b again");
    let pid = a.get_ok(Some("support-agent.service"), &url);
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(
        line["dst_spiffe_id"], "spiffe://b.example.org/llm",
        "{line}"
    );
    let inbound = eb.connection_line(|v| v["direction"] == "inbound" && v["outcome"] == "ok");
    assert_eq!(
        inbound["src_spiffe_id"], "spiffe://a.example.org/agent",
        "{inbound}"
    );
}

/// Node a (of a linked pair) with its agent and an HTTP server on 8081
/// (`llm.service`, both families); the support agent and the LLM registered,
/// `tail` appended to the config.
fn local_llm(test: &str, tail: &str) -> (Testbed, Node, enforcer_tests::Enforcer) {
    let (mut tb, a, _b) = Testbed::linked_pair(test).expect("two linked nodes");
    let ca = tb.shared_ca("shared", TD).expect("ca");
    tb.start_server_in(
        &a,
        Some("llm.service"),
        "llm",
        &["python3", "-m", "http.server", "8081", "--bind", "::"],
        8081,
    )
    .expect("server on a");
    let entries = format!(
        "{}{}{MESH}\n{tail}",
        entry(AGENT_ID, "systemd:unit:support-agent.service"),
        entry(LLM_ID, "systemd:unit:llm.service")
    );
    let cfg = tb.enforcer_config_with(&a, "", &ca, &entries).expect("cfg");
    let ea = tb.start_enforcer(&a, &cfg).expect("enforcer a");
    (tb, a, ea)
}

#[test]
fn same_node_connection_carries_both_identities_and_stays_local() {
    let (_tb, a, ea) = local_llm("samenode", "");
    let url = format!("http://{}:8081/", a.ipv4);
    let pid = a.get_ok(Some("support-agent.service"), &url);
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["same_node"], true, "{line}");
    assert_eq!(line["mtls"], false, "{line}");
    assert_eq!(line["src_spiffe_id"], AGENT_ID, "{line}");
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");
    assert_eq!(
        ea.metric(
            "enforcer_connections_opened_total",
            &[("direction", "inbound")]
        )
        .expect("metrics"),
        0.0,
        "a same-node connection must not loop through the agent's HBONE listener"
    );
    // A workload without identity may not reach one that has one.
    let (pid, out) = curl(&a, "stranger.service", &url);
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "no_identity", "{line}");
}

#[test]
fn plaintext_from_outside_the_mesh_strict_refused_permissive_audited() {
    let tail = "[[mesh.inbound]]\nports = [8080]\nmode = \"strict\"\n\n[[mesh.inbound]]\nports = [8082]\nmode = \"permissive\"\n";
    let mut m = mesh_with("plaintext", "", tail);
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "open",
        &["python3", "-u", "-m", "http.server", "8082", "--bind", "::"],
        8082,
    )
    .expect("permissive server");
    let get = |url: &str| {
        // Outside a's captured subtree: plain TCP from another node, no mesh.
        m.a.exec(
            None,
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
        )
        .expect("curl")
        .1
    };
    // strict: refused, audited
    let out = get(&format!("http://{}:8080/?plaintext-strict", m.b.ipv4));
    assert_ne!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "strict port must refuse plaintext"
    );
    let line =
        m.eb.connection_line(|v| v["outcome"] == "plaintext_refused");
    assert_eq!(line["authenticated"], false, "{line}");
    assert_eq!(line["plaintext_mode"], "strict", "{line}");
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
    assert!(!m.tb.server_log(&m.b, "llm").contains("plaintext-strict"));
    // permissive: forwarded, audited as unauthenticated (IPv4 and IPv6)
    for url in [
        format!("http://{}:8082/?plain-ok", m.b.ipv4),
        format!("http://[{}]:8082/?plain-ok6", m.b.ipv6),
    ] {
        let out = get(&url);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line =
        m.eb.connection_line(|v| v["plaintext_mode"] == "permissive" && v["outcome"] == "ok");
    assert_eq!(line["authenticated"], false, "{line}");
    assert!(line["src_spiffe_id"].is_null(), "{line}");
    assert!(line["bytes_received"].as_u64().unwrap_or(0) > 0, "{line}");
    // The mesh path to the strict port still works.
    m.a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8080/?via-mesh", m.b.ipv4),
    );
    // With b's agent down, the strict port stays closed to plaintext (kernel drop).
    m.tb.stop(m.eb.pid).expect("stop b");
    let out = get(&format!("http://{}:8080/?agent-down", m.b.ipv4));
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        !m.tb.server_log(&m.b, "llm").contains("agent-down"),
        "strict port reached while the agent was down"
    );
}

#[test]
fn spire_provider_issues_per_workload_svids_that_the_peer_accepts() {
    // SPIRE itself cannot be installed here: node a gets its identities from
    // the in-test Delegated Identity server (tests/helpers/spire), which signs
    // with the CA that node b trusts.
    let (mut tb, a, b) = Testbed::linked_pair("spire").expect("two linked nodes");
    let ca = tb.shared_ca("shared", TD).expect("ca");
    let ca_dir = tb.dir.join("ca-shared");
    let entries = tb.dir.join("spire-entries.json");
    std::fs::write(
        &entries,
        format!("[{{\"spiffe_id\": \"{AGENT_ID}\", \"selectors\": [\"systemd:unit:support-agent.service\", \"unix:uid:0\"]}}]"),
    )
    .expect("entries");
    let socket = tb.dir.join("spire-admin.sock");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helpers/spire/fake_spire_agent.py"
    );
    let paths = [
        &socket,
        &ca_dir.join("ca.pem"),
        &ca_dir.join("ca.key"),
        &entries,
    ]
    .map(|p| p.display().to_string());
    tb.spawn(
        &a,
        None,
        "spire",
        &[
            "python3", "-u", script, &paths[0], &paths[1], &paths[2], &paths[3], "2",
        ],
    )
    .expect("fake SPIRE agent (needs: pip install grpcio grpcio-tools cryptography)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tb.server_log(&a, "spire").contains("LISTENING") {
        assert!(
            Instant::now() < deadline,
            "fake SPIRE agent did not start: {}",
            tb.server_log(&a, "spire")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tb.start_server_in(
        &b,
        Some("llm.service"),
        "llm",
        &["python3", "-m", "http.server", "8080", "--bind", "::"],
        8080,
    )
    .expect("server");
    let cfg_b = tb
        .enforcer_config_with(
            &b,
            "",
            &ca,
            &format!("{}{MESH}", entry(LLM_ID, "systemd:unit:llm.service")),
        )
        .expect("cfg b");
    let eb = tb.start_enforcer(&b, &cfg_b).expect("enforcer b");
    let spire_identity = format!(
        "provider = \"spire\"\nspire_socket = \"{}\"\ntrust_domain = \"{TD}\"\n",
        socket.display()
    );
    let cfg_a = tb
        .enforcer_config_with(&a, "", &spire_identity, MESH)
        .expect("cfg a");
    let ea = tb
        .start_enforcer(&a, &cfg_a)
        .expect("enforcer a (spire provider)");
    let url = format!("http://{}:8080/", b.ipv4);

    let pid = a.get_ok(Some("support-agent.service"), &url);
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["src_spiffe_id"], AGENT_ID, "{line}");
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
    let inbound = eb.connection_line(|v| v["direction"] == "inbound" && v["outcome"] == "ok");
    assert_eq!(
        inbound["src_spiffe_id"], AGENT_ID,
        "b verified the SPIRE-issued SVID: {inbound}"
    );
    let spire_log = tb.server_log(&a, "spire");
    assert!(
        spire_log.lines().any(|l| l.starts_with("SUBSCRIBE")
            && l.contains("systemd:unit:support-agent.service")
            && l.contains("unix:uid:0")),
        "the agent must ask SPIRE with the workload's attested selectors:\n{spire_log}"
    );

    // SPIRE has no entry for this workload: no identity, refused.
    let (pid, out) = curl(&a, "stranger.service", &url);
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(
        ea.connection_line(|v| v["pid"] == pid)["outcome"],
        "no_identity"
    );
    assert!(tb.server_log(&a, "spire").contains("DENIED"));
    // SPIRE's "no identity" is remembered (30 s): the same workload's next
    // connection is refused without asking SPIRE again (before, each
    // connection of an unidentified workload opened a SPIRE stream).
    let (pid, out) = curl(&a, "stranger.service", &url);
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(
        ea.connection_line(|v| v["pid"] == pid)["outcome"],
        "no_identity"
    );
    let denied = tb
        .server_log(&a, "spire")
        .lines()
        .filter(|l| l.starts_with("DENIED"))
        .count();
    assert_eq!(denied, 1, "SPIRE asked once for the unidentified workload");

    // Streamed updates: the server rotates every 2 s; the agent takes them and keeps working.
    std::thread::sleep(Duration::from_millis(2500));
    let received = ea
        .log_lines()
        .iter()
        .filter(|v| v["message"] == "SVID received from SPIRE" && v["spiffe_id"] == AGENT_ID)
        .count();
    assert!(
        received >= 2,
        "rotated SVIDs must be streamed to the agent (got {received})"
    );
    let (_, out) = curl(&a, "support-agent.service", &url);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "after rotation: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hbone_connections_are_pooled_per_source_and_destination() {
    let m = mesh("pool", "");
    let url = format!("http://{}:8080/", m.b.ipv4);
    let mut reused = vec![];
    for _ in 0..3 {
        let pid = m.a.get_ok(Some("support-agent.service"), &url);
        reused.push(m.ea.connection_line(|v| v["pid"] == pid)["hbone_reused"].clone());
    }
    assert_eq!(
        reused,
        vec![Value::Bool(false), Value::Bool(true), Value::Bool(true)],
        "one TLS connection, three streams"
    );
    // Another destination port is another workload, so another connection:
    // nothing listens on b:8081, so b has no certificate to present.
    let (pid, _) = curl(
        &m.a,
        "support-agent.service",
        &format!("http://{}:8081/", m.b.ipv4),
    );
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == pid)["outcome"],
        "tunnel_failed"
    );
}

#[test]
fn registration_entries_reload_without_restart_and_bad_edits_are_rejected() {
    let mut m = mesh("reload", "");
    let url = format!("http://{}:8080/", m.b.ipv4);
    let (pid, _) = curl(&m.a, "late-agent.service", &url);
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == pid)["outcome"],
        "no_identity"
    );

    let cfg = m.tb.dir.join("a.toml");
    let original = std::fs::read_to_string(&cfg).expect("config");
    // A broken edit is rejected; the entries in force stay.
    std::fs::write(&cfg, format!("{original}\n[[identity.entries]]\nspiffe_id = \"not a spiffe id\"\nselectors = [\"unix:uid:0\"]\n")).expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.ea.log_lines().iter().any(|v| {
        v["message"] == "config change rejected; the previous registration entries stay in force"
    }) {
        assert!(
            Instant::now() < deadline,
            "a broken config must be rejected with a log line"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (pid, out) = curl(&m.a, "support-agent.service", &url);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "existing entries keep working"
    );
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == pid)["src_spiffe_id"],
        AGENT_ID
    );

    // A valid edit applies without a restart (entries are re-read every second).
    std::fs::write(
        &cfg,
        format!(
            "{original}\n{}",
            entry(
                "spiffe://ai.example.org/agent/late",
                "systemd:unit:late-agent.service"
            )
        ),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m
        .ea
        .log_lines()
        .iter()
        .any(|v| v["message"] == "registration entries reloaded")
    {
        assert!(Instant::now() < deadline, "entries not reloaded within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = m.a.get_ok(Some("late-agent.service"), &url);
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == pid)["src_spiffe_id"],
        "spiffe://ai.example.org/agent/late"
    );
    let inbound =
        m.eb.connection_line(|v| v["src_spiffe_id"] == "spiffe://ai.example.org/agent/late");
    assert_eq!(inbound["outcome"], "ok");
    m.tb.stop(m.ea.pid).expect("stop");
}

#[test]
fn port_squatter_on_loopback_never_lends_its_identity_to_the_real_server() {
    // The attack: the real server listens on [fd10::2]:9300; another
    // workload listens on 127.0.0.1:9300. Attesting "the owner of port 9300"
    // made the agent present and decide on the squatter's identity while
    // the bytes went to the real server.
    let mut m = mesh_with(
        "squat",
        "",
        &format!(
            "{}{}",
            entry(SQUAT_ID, "systemd:unit:squatter.service"),
            entry(AGENT_ID, "systemd:unit:support-agent.service")
        ),
    );
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "real",
        &[
            "python3",
            "-u",
            "-m",
            "http.server",
            "9300",
            "--bind",
            &m.b.ipv6,
        ],
        9300,
    )
    .expect("real server");
    m.tb.spawn(
        &m.b,
        Some("squatter.service"),
        "squatter",
        &[
            "python3",
            "-u",
            "-m",
            "http.server",
            "9300",
            "--bind",
            "127.0.0.1",
        ],
    )
    .expect("squatter");
    assert!(m.tb.wait_server_log(&m.b, "squatter", "Serving HTTP"));

    // Across nodes: the identity a's agent verified, and b's decision.
    let url = format!("http://[{}]:9300/across", m.b.ipv6);
    let (pid, out) = curl(&m.a, "support-agent.service", &url);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{out:?}");
    let line = m.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
    let inbound = m.eb.connection_line(|v| {
        v["direction"] == "inbound" && v["dst"] == format!("[{}]:9300", m.b.ipv6)
    });
    assert_eq!(inbound["dst_spiffe_id"], LLM_ID, "{inbound}");
    assert!(m.tb.wait_server_log(&m.b, "real", "/across"));

    // Same node: a client on b reaches the real server as the real server.
    let url = format!("http://[{}]:9300/same-node", m.b.ipv6);
    let (pid, _) = curl(&m.b, "support-agent.service", &url);
    let line = m.eb.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["same_node"], true, "{line}");
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
    assert!(m.tb.wait_server_log(&m.b, "real", "/same-node"));
    assert!(!m.tb.server_log(&m.b, "squatter").contains("GET /"));
}

/// Runs `helpers/hbone_attack.py MODE` from `from` (outside any captured
/// cgroup) against the HBONE port of `target`, with a certificate of the
/// pair's shared CA where the mode needs one. Returns stdout and stderr.
fn hbone_attack(m: &Pair, from: &Node, target: &Node, mode: &str, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/helpers/hbone_attack.py");
    let ca = m.tb.dir.join("ca-shared");
    let (cert, key) = (
        ca.join("ca.pem").display().to_string(),
        ca.join("ca.key").display().to_string(),
    );
    let mut cmd = vec!["python3", script, mode, &target.ipv4, "15008", &cert, &key];
    cmd.extend_from_slice(args);
    let (_, out) = from
        .exec(None, &cmd)
        .expect("hbone_attack.py (needs: pip install h2 cryptography; `cargo xtask setup` does)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn client_whose_certificate_expires_gets_goaway_and_no_new_stream() {
    // The attack: a client keeps its HBONE connection and opens new CONNECT
    // streams after its certificate's notAfter (they were answered 200).
    let m = mesh("expiring", "");
    let dst = format!("{}:8080", m.b.ipv4);
    let out = hbone_attack(&m, &m.a, &m.b, "expiring", &[&dst, "3"]);
    assert!(out.contains("FIRST 200"), "{out}");
    assert!(
        out.contains("GOAWAY"),
        "the server must send GOAWAY at the client certificate's notAfter: {out}"
    );
    let second = out
        .lines()
        .find(|l| l.starts_with("SECOND"))
        .unwrap_or_default();
    assert!(
        !second.is_empty() && !second.contains("200"),
        "a stream after notAfter must be refused: {out}"
    );
}

#[test]
fn pooled_connection_is_not_reused_past_the_server_certificate() {
    // b's SVIDs live 4 s. A pooled HBONE connection from a keeps b's first
    // certificate; after its notAfter a must open a new connection (where b
    // presents its renewed SVID) instead of reusing the expired one.
    let m = mesh_nodes("srvexpiry", "", "svid_ttl_secs = 4\n", "");
    let url = format!("http://{}:8080/", m.b.ipv4);
    let first = m.a.get_ok(Some("support-agent.service"), &url);
    let (again, _) = curl(&m.a, "support-agent.service", &url);
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == again)["hbone_reused"],
        true,
        "within the certificate's validity the connection is pooled"
    );
    let started = m.ea.connection_line(|v| v["pid"] == first);
    assert_eq!(started["hbone_reused"], false);
    std::thread::sleep(Duration::from_millis(4500));
    let late = m.a.get_ok(Some("support-agent.service"), &url);
    let line = m.ea.connection_line(|v| v["pid"] == late);
    assert_eq!(
        line["hbone_reused"], false,
        "a connection whose server certificate expired must not be reused: {line}"
    );
}

#[test]
fn http2_limits_refuse_excess_streams_and_huge_headers_and_others_are_served() {
    // The attack: one authenticated connection opened 3 000 concurrent
    // streams and sent a 1 MB header block.
    let m = mesh("h2limits", "");
    let dst = format!("{}:8080", m.b.ipv4);
    let out = hbone_attack(&m, &m.a, &m.b, "streams", &[&dst, "150"]);
    let counts: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("OK "))
        .map(|l| {
            l.split(" REFUSED ")
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(counts.len(), 2, "{out}");
    assert!(counts[0] <= 100, "more than 100 concurrent streams: {out}");
    assert!(counts[1] >= 50, "excess streams must be refused: {out}");

    let out = hbone_attack(&m, &m.a, &m.b, "headers", &[&dst, "1000000"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("BIG") && !l.contains("200")),
        "a 1 MB header block must be refused: {out}"
    );
    assert!(
        out.contains("OTHER 200"),
        "other connections keep being served: {out}"
    );
    // The agent's own clients are served all the same.
    assert_support_agent_reaches_llm(&m);
}

#[test]
fn server_name_cycling_is_answered_with_an_alert_and_rate_limited() {
    // The attack: a client cycles through server names (ports) to make the
    // agent look up a workload on every handshake, before authenticating.
    let m = mesh("sncycle", "");
    // From b itself, so that a's own traffic keeps its address's budget.
    let out = hbone_attack(&m, &m.b, &m.b, "cycle", &["20000", "200"]);
    assert!(
        out.contains("SEEN TLSV1_UNRECOGNIZED_NAME"),
        "a name with no workload behind it gets unrecognized_name: {out}"
    );
    let limited =
        m.eb.metric(
            "enforcer_hbone_rejected_total",
            &[("reason", "rate_limited")],
        )
        .expect("metrics");
    let looked_up =
        m.eb.metric(
            "enforcer_hbone_rejected_total",
            &[("reason", "no_server_identity")],
        )
        .expect("metrics");
    assert!(limited > 0.0, "no lookup was refused: {out}");
    assert!(looked_up < 200.0, "every name was looked up: {looked_up}");
    assert_support_agent_reaches_llm(&m);
}

#[test]
fn stream_budget_per_connection_refuses_and_counts_the_excess() {
    let m = mesh_with("budget", "", "max_streams_per_connection = 3\n");
    let dst = format!("{}:8080", m.b.ipv4);
    let out = hbone_attack(&m, &m.a, &m.b, "streams", &[&dst, "6"]);
    assert!(out.contains("OK 3 REFUSED 3"), "{out}");
    assert_eq!(
        m.eb.metric(
            "enforcer_hbone_streams_refused_total",
            &[("reason", "stream_budget")]
        )
        .expect("metrics"),
        3.0
    );
    // The client is told to go away and its next connection is served.
    assert_support_agent_reaches_llm(&m);
}

#[test]
fn destination_that_aborts_across_nodes_resets_the_source_workload() {
    // The failure: b's workload resets the connection mid-answer; b's agent
    // resets the HBONE stream, and a's agent ended the source workload's side
    // with a clean FIN — a broken transfer that looked complete.
    let mut m = mesh("abortmesh", "");
    let (pid, out) =
        m.tb.aborted_download(
            &m.b,
            Some("llm.service"),
            &m.a,
            "support-agent.service",
            9400,
        )
        .expect("aborted download");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("RESET"),
        "the source workload must see the reset, not a clean end: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = m.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["mtls"], true, "{line}");
    assert_eq!(line["outcome"], "error", "{line}");
}

#[test]
fn workload_swapped_in_behind_a_pooled_connection_is_refused() {
    // The attack: a's pooled HBONE connection to b:9500 presented the LLM's
    // identity. The LLM stops and a workload of another identity takes its
    // port; a new stream on the pooled connection must not reach it under
    // the identity the connection presented.
    let mut m = mesh_with(
        "swapped",
        "",
        &entry(SQUAT_ID, "systemd:unit:squatter.service"),
    );
    let cmd = ["python3", "-u", "-m", "http.server", "9500", "--bind", "::"];
    let real =
        m.tb.start_server_in(&m.b, Some("llm.service"), "real", &cmd, 9500)
            .expect("real server");
    let url = format!("http://{}:9500/", m.b.ipv4);
    let first = m.a.get_ok(Some("support-agent.service"), &url);
    assert_eq!(
        m.ea.connection_line(|v| v["pid"] == first)["dst_spiffe_id"],
        LLM_ID
    );

    m.tb.stop(real).expect("stop the real server");
    m.tb.start_server_in(&m.b, Some("squatter.service"), "squatter", &cmd, 9500)
        .expect("squatter");
    let (late, out) = curl(&m.a, "support-agent.service", &format!("{url}?swapped"));
    let line = m.ea.connection_line(|v| v["pid"] == late);
    assert_eq!(
        line["hbone_reused"], true,
        "the attack needs the pooled connection: {line}"
    );
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "{line}");
    let refused =
        m.eb.connection_line(|v| v["direction"] == "inbound" && v["outcome"] == "no_identity");
    assert!(refused["dst_spiffe_id"].is_null(), "{refused}");
    assert!(
        !m.tb.server_log(&m.b, "squatter").contains("swapped"),
        "the request reached the swapped-in workload"
    );
}

#[test]
fn more_concurrent_connections_than_one_hbone_connection_carries_are_all_served() {
    // b allows 4 streams per HBONE connection; a workload holds 10
    // connections to one destination open at once. The pool must open more
    // HBONE connections instead of queueing streams behind the limit.
    let mut m = mesh_with("manyconns", "", "max_concurrent_streams = 4\n");
    let echo = r#"
import socket, threading
srv = socket.socket(socket.AF_INET6); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 9600)); srv.listen(64)
def serve(c):
    while True:
        d = c.recv(100)
        if not d: break
        c.sendall(d)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"#;
    m.tb.start_server_in(
        &m.b,
        Some("llm.service"),
        "echo",
        &["python3", "-c", echo],
        9600,
    )
    .expect("echo server");
    let client = r#"
import socket, sys
# One after another, each answered before the next opens (so each finds the
# pooled connections), all held open until the end.
conns, ok = [], 0
for i in range(10):
    try:
        c = socket.create_connection((sys.argv[1], 9600), timeout=5)
        c.sendall(b"ping%d" % i)
        ok += c.recv(100) == b"ping%d" % i
        conns.append(c)
    except OSError as e:
        print("connection", i, "failed:", e, file=sys.stderr)
        break
print("ECHOED", ok)
"#;
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", client, &m.b.ipv4],
        )
        .expect("client");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ECHOED 10",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The client has exited; its 10 connections are logged as they close,
    // which under load can be after it returns: wait for all 10 lines.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while m.ea.closed_connections().len() < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let closed = m.ea.closed_connections();
    assert!(closed.len() >= 10, "{closed:?}");
    let dialed = closed.iter().filter(|v| v["hbone_reused"] == false).count();
    assert!(
        dialed >= 3,
        "10 streams at 4 per connection need 3 connections, dialed {dialed}"
    );
}

/// An identity the rogue peer switches to.
const SWAPPED_ID: &str = "spiffe://ai.example.org/swapped-in";

/// The attack: a peer node presents the identity policy allows (the LLM)
/// on the first HBONE connection, refuses the CONNECT there as unprocessed
/// (REFUSED_STREAM, which a client answers by sending the stream once more
/// on another connection), and presents another identity on that second
/// connection. The resent stream must not go to an identity that policy
/// never decided on: the agent refuses it (`peer_changed`), the rogue peer
/// sees no CONNECT on its second connection.
#[test]
fn a_resent_stream_never_goes_to_a_peer_that_changed_identity() {
    let (mut tb, a, b) = Testbed::linked_pair("peerswap").expect("testbed");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let policy = tb.dir.join("swap-policy");
    std::fs::create_dir_all(&policy).expect("policy dir");
    std::fs::write(
        policy.join("policy.rego"),
        format!(
            "package enforcer.authz\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.destination.spiffe_id == \"{LLM_ID}\"\n"
        ),
    )
    .expect("policy");
    let tail = format!(
        "{}\n{MESH}\n{}",
        entry(AGENT_ID, "systemd:unit:support-agent.service"),
        tb.policy_section(&a, &policy.display().to_string())
    );
    let config = tb.enforcer_config_with(&a, "", &ca, &tail).expect("config");
    let ea = tb.start_enforcer(&a, &config).expect("a's agent");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/helpers/hbone_swap.py");
    let ca_dir = tb.dir.join("ca-shared");
    let (ca_cert, ca_key) = (
        ca_dir.join("ca.pem").display().to_string(),
        ca_dir.join("ca.key").display().to_string(),
    );
    tb.start_server(
        &b,
        "rogue",
        &[
            "python3", "-u", script, &b.ipv4, "15008", &ca_cert, &ca_key, LLM_ID, SWAPPED_ID,
        ],
        15008,
    )
    .expect("hbone_swap.py (needs: pip install h2 cryptography; `cargo xtask setup` does)");

    let url = format!("http://{}:8080/", b.ipv4);
    let (_, out) = a
        .exec(
            Some("support-agent.service"),
            &["curl", "-sS", "--max-time", "5", &url],
        )
        .expect("curl");
    assert!(!out.status.success(), "{out:?}");
    // The event: a's agent refused the resent stream, naming the change.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Some(l) = ea
            .log_lines()
            .into_iter()
            .find(|l| l["reason"] == "peer_changed")
        {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no peer_changed refusal in a's log; rogue peer: {}",
            tb.server_log(&b, "rogue")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(LLM_ID) && error.contains(SWAPPED_ID),
        "{refused}"
    );
    let log = tb.server_log(&b, "rogue");
    assert!(
        log.contains("REFUSED 1"),
        "the first try was refused: {log}"
    );
    assert!(
        log.contains(&format!("CONN 2 {SWAPPED_ID}")),
        "the second try met the swapped identity: {log}"
    );
    assert!(
        !log.contains("CONNECT 2"),
        "the stream went to an identity policy never decided on: {log}"
    );
    let line = ea
        .wait_for_connection(|v| v["outcome"] == "tunnel_failed")
        .expect("the connection's closing line");
    assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
}

/// A directory removed when this is dropped, also when the test fails.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT), also when
/// the test fails in between, so the testbed can stop it.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The script a workload runs: connects to b:8080, sends a request, and
/// then, `ask`: reads the answer and prints its status line; `exec`:
/// replaces itself with `argv[3]`, keeping the connection; `fork-thread-exec`:
/// the same from a forked child (which never exec'd) by a second thread
/// (whose exec ends the child's first thread); `compat-exec`: the same
/// through the 32-bit system call (`int 0x80`, `execve` = 11), which the
/// `syscalls:` tracepoints do not see; `stalled-exec`: a second thread's
/// `execve` is held inside the kernel (its last argument on a page that a
/// userfaultfd serves only later) while the first thread connects and
/// writes, so the connect comes after the exec began and before it
/// replaced the program. The process that connects prints `PID <pid>`
/// first.
const PY_CONNECT_THEN: &str = r#"
import ctypes, mmap, os, socket, struct, sys, threading
mode, trusted = sys.argv[2], sys.argv[3:4]
script = "import time; time.sleep(3)"
if mode == "fork-thread-exec":
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        sys.exit(0)
def connect():
    print("PID", os.getpid(), flush=True)
    s = socket.create_connection((sys.argv[1], 8080))
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    return s
if mode == "stalled-exec":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    page_size = mmap.PAGESIZE
    uffd = libc.syscall(323, os.O_CLOEXEC)  # userfaultfd
    assert uffd >= 0, ("userfaultfd", ctypes.get_errno())
    api = ctypes.create_string_buffer(struct.pack("QQQ", 0xAA, 0, 0), 24)
    assert libc.ioctl(uffd, 0xC018AA3F, api) == 0, ("UFFDIO_API", ctypes.get_errno())
    page = libc.mmap(None, page_size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    reg = ctypes.create_string_buffer(struct.pack("QQQQ", page, page_size, 1, 0), 32)
    assert libc.ioctl(uffd, 0xC020AA00, reg) == 0, ("UFFDIO_REGISTER", ctypes.get_errno())
    path = ctypes.create_string_buffer(trusted[0].encode())
    dash_c = ctypes.create_string_buffer(b"-c")
    argv = (ctypes.c_void_p * 4)(ctypes.addressof(path), ctypes.addressof(dash_c), page, None)
    envp = (ctypes.c_void_p * 1)(None)
    threading.Thread(target=lambda: libc.execve(path, argv, envp), daemon=True).start()
    event = os.read(uffd, 32)  # the exec thread is held in execve
    assert event[0] == 0x12, event
    s = connect()
    os.set_inheritable(s.fileno(), True)
    text = ctypes.create_string_buffer(script.encode().ljust(page_size, b"\0"), page_size)
    copy = ctypes.create_string_buffer(struct.pack("QQQQq", page, ctypes.addressof(text), page_size, 0, 0), 40)
    assert libc.ioctl(uffd, 0xC028AA03, copy) == 0, ("UFFDIO_COPY", ctypes.get_errno())
    threading.Event().wait(10)
    sys.exit("the exec did not replace this program")
s = connect()
if mode == "ask":
    print(s.recv(4096).split(b"\r\n")[0].decode(), flush=True)
    sys.exit(0)
os.set_inheritable(s.fileno(), True)
go = lambda: os.execv(trusted[0], [trusted[0], "-c", script])
if mode == "exec":
    go()
if mode == "compat-exec":
    mem = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,  # MAP_32BIT
                    prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    assert base + 4096 < 2**32, hex(base)
    ptrs, at = [], 0x400
    for a in (trusted[0], "-c", script):
        mem[at:at + len(a) + 1] = a.encode() + b"\0"
        ptrs.append(base + at)
        at += len(a) + 1
    mem[0x100:0x110] = struct.pack("4I", *ptrs, 0)
    mem[0x200:0x204] = struct.pack("I", 0)
    code = (b"\xb8\x0b\x00\x00\x00" + b"\xbb" + struct.pack("I", ptrs[0])
            + b"\xb9" + struct.pack("I", base + 0x100) + b"\xba" + struct.pack("I", base + 0x200)
            + b"\xcd\x80\xc3")  # mov eax, 11; mov ebx/ecx/edx; int 0x80; ret
    mem[0:len(code)] = code
    sys.exit(f"the 32-bit execve failed: {ctypes.CFUNCTYPE(ctypes.c_int)(base)()}")
t = threading.Thread(target=go)
t.start()
t.join()
"#;

#[test]
fn a_workload_that_execs_a_trusted_binary_after_connecting_does_not_get_its_identity() {
    exec_attacks("execrace", &[], "sched:sched_prepare_exec");
}

/// The same attacks with the probes of kernels before 6.10, which have no
/// `sched_prepare_exec` (the system calls' tracepoints).
#[test]
fn a_workload_that_execs_a_trusted_binary_after_connecting_does_not_get_its_identity_on_older_kernels()
 {
    exec_attacks(
        "execrace-sys",
        &[("ENFORCER_EXEC_PROBE", "syscalls")],
        "syscalls:sys_enter_execve",
    );
}

/// A trusted executable in a directory removed on drop: python3 with 4 KiB
/// of zeros more, so that its digest is its own; its path and digest.
fn trusted_python(test: &str) -> (TempDir, std::path::PathBuf, String) {
    let python = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 (cargo xtask setup installs it)");
    let python = std::path::PathBuf::from(String::from_utf8_lossy(&python.stdout).trim());
    let dir = TempDir(std::env::temp_dir().join(format!(
        "enforcer-exec-trusted-{test}-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let trusted = dir.0.join("trusted-python");
    std::fs::copy(&python, &trusted).expect("copying python3");
    let len = std::fs::metadata(&trusted).expect("copy").len();
    std::fs::File::options()
        .write(true)
        .open(&trusted)
        .and_then(|f| f.set_len(len + 4096))
        .expect("a distinct executable");
    let digest = sha256sum(&trusted);
    (dir, trusted, digest)
}

/// Nodes a and b: a gives the support agent's identity to the executable
/// `exe` names (`unix:sha256:…`, `unix:path:…`) in tool.service (a's agent
/// started with `env`), b the LLM's to llm.service.
fn trusted_exe_pair(test: &str, exe: &str, env: &[(&str, &str)]) -> Pair {
    llm_pair_env(
        test,
        TD,
        |_, n| {
            if n.name == "a" {
                let selectors = format!("[\"systemd:unit:tool.service\", \"{exe}\"]");
                (
                    String::new(),
                    format!(
                        "[[identity.entries]]\nspiffe_id = \"{AGENT_ID}\"\nselectors = {selectors}\n\n{MESH}"
                    ),
                )
            } else {
                (
                    String::new(),
                    format!("{}\n{MESH}", entry(LLM_ID, "systemd:unit:llm.service")),
                )
            }
        },
        env,
    )
    .expect("two nodes")
}

/// A file's SHA-256, hex, by coreutils' sha256sum.
fn sha256sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils)");
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(digest.len(), 64, "sha256sum: {digest:?}");
    digest
}

/// [`PY_CONNECT_THEN`]'s attacks against a's agent started with `env`,
/// whose log says it follows execs with `probes`.
fn exec_attacks(test: &str, env: &[(&str, &str)], probes: &str) {
    // The attack: the support agent's identity is given to one executable
    // (its digest) in tool.service. Another program in that unit connects,
    // writes its request, then execs the trusted executable, keeping the
    // socket. The agent attests the connection from /proc/<pid>/exe when
    // it accepts it: by then the process runs the trusted executable, and
    // the request written by the other program went out under the trusted
    // identity. (a's agent is stopped while the workload connects and
    // execs, so its attestation comes after the exec every time, not just
    // when the race is won.)
    // Removed on drop, also when the test fails.
    let (_dir, trusted, digest) = trusted_python(test);
    let trusted_s = trusted.display().to_string();
    let mut m = trusted_exe_pair(test, &format!("unix:sha256:{digest}"), env);
    assert!(
        m.ea.log_lines()
            .iter()
            .any(|l| l["message"] == "exec probes attached" && l["probes"] == probes),
        "a's agent follows execs with {probes}"
    );
    let b_ip = m.b.ipv4.to_string();
    let from_agent = |v: &Value| v["src_spiffe_id"] == AGENT_ID;
    // The trusted executable itself has the identity.
    let (_, out) =
        m.a.exec(
            Some("tool.service"),
            &[&trusted_s, "-c", PY_CONNECT_THEN, &b_ip, "ask"],
        )
        .expect("the trusted executable");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("HTTP/")),
        "the trusted executable's request was answered: {out:?}"
    );
    m.eb.wait_for_connection(from_agent)
        .expect("b saw the trusted executable's connection as the support agent");
    let before =
        m.eb.closed_connections()
            .iter()
            .filter(|v| from_agent(v))
            .count();
    // The attack, with a's agent stopped until the exec is done: from the
    // process itself, and from a forked child's second thread.
    for mode in ["exec", "fork-thread-exec", "compat-exec", "stalled-exec"] {
        let a_before = m.ea.closed_connections().len();
        let stopped = Stopped::new(m.ea.pid);
        let log = format!("attacker-{mode}");
        m.tb.spawn(
            &m.a,
            Some("tool.service"),
            &log,
            &["python3", "-c", PY_CONNECT_THEN, &b_ip, mode, &trusted_s],
        )
        .expect("the attacker");
        // Connected and written; its exec is done when /proc says so.
        let mut pid = None;
        enforcer_tests::wait_for("the attacker to exec the trusted executable", || {
            let text = m.tb.server_log(&m.a, &log);
            // The script ends (and says why) where its exec cannot run: a
            // kernel without the 32-bit system calls (CONFIG_IA32_EMULATION,
            // `ia32_emulation=1`), or no userfaultfd (CONFIG_USERFAULTFD).
            assert!(
                !text.contains("failed") && !text.contains("Error"),
                "{mode}: the attacker could not run: {text}"
            );
            pid = pid.or_else(|| {
                text.lines()
                    .find_map(|l| l.strip_prefix("PID ")?.trim().parse::<u32>().ok())
            });
            pid.is_some_and(|p| {
                std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == trusted)
            })
        });
        drop(stopped);
        // a's agent has ended the attacker's connection (whatever it decided).
        let last = m.ea.connection_after(a_before);
        std::thread::sleep(Duration::from_millis(500));
        let after =
            m.eb.closed_connections()
                .iter()
                .filter(|v| from_agent(v))
                .count();
        assert_eq!(
            after, before,
            "{mode}: a connection made by another program reached b as the support agent: {last}"
        );
        assert_eq!(last["outcome"], "no_identity", "{mode}: {last}");
    }
    assert!(
        m.ea.log_lines().iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|s| s.contains("exec'd (or its pid was reused) after it connected"))),
        "a's agent says why the executable was not attested"
    );
    assert_eq!(
        m.ea.metric("enforcer_execs_after_connect_total", &[]).ok(),
        Some(4.0),
        "every attack counted"
    );
}

/// A shell script (the next argument, then its `$0`) run as nobody.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "sh",
    "-c",
];

/// A cgroup of `node` (`user@65534.service`) delegated to nobody, as systemd
/// delegates a user's manager: the directory and its `cgroup.procs`,
/// `cgroup.subtree_control` and `cgroup.threads` are nobody's.
fn delegated_to_nobody(node: &Node) -> std::path::PathBuf {
    let dir = node.workload_cgroup("user@65534.service").expect("cgroup");
    for f in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        std::os::unix::fs::chown(dir.join(f), Some(65534), Some(65534))
            .expect("delegating the cgroup");
    }
    dir
}

#[test]
fn a_workload_that_names_its_own_cgroups_does_not_get_the_identity_of_the_names() {
    // The attack: systemd hands some units a cgroup subtree of their own
    // (`Delegate=`: every user's manager, user@<uid>.service, rootless
    // container runtimes), and its unprivileged owner may make cgroups
    // below it with any name. A process there made
    // `user@65534.service/tool.service` (or `docker-<id>.scope`), moved
    // itself in and connected: the agent read the innermost unit (and every
    // container id on the path) and gave it the identity registered for the
    // system unit tool.service (and for that container).
    const CONTAINER: &str = "4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";
    const CONTAINER_ID: &str = "spiffe://ai.example.org/container/app";
    let mut m = llm_pair("cgnames", TD, |_, n| {
        if n.name == "a" {
            (
                String::new(),
                format!(
                    "{}\n{}\n{MESH}",
                    entry(AGENT_ID, "systemd:unit:tool.service"),
                    entry(CONTAINER_ID, &format!("container:id:{CONTAINER}"))
                ),
            )
        } else {
            (
                String::new(),
                format!("{}\n{MESH}", entry(LLM_ID, "systemd:unit:llm.service")),
            )
        }
    })
    .expect("two nodes");
    let url = format!("http://{}:8080/v1/models", m.b.ipv4);
    // The real unit and the real container have their identities.
    for (unit, id) in [
        ("tool.service", AGENT_ID),
        (&*format!("docker-{CONTAINER}.scope"), CONTAINER_ID),
    ] {
        let (code, _) = m.a.http_status(Some(unit), &url);
        assert_ne!(code, "000", "{unit}: answered through b");
        m.eb.wait_for_connection(|v| v["src_spiffe_id"] == id)
            .unwrap_or_else(|| panic!("b saw {unit}'s connection as {id}"));
    }
    let delegated = delegated_to_nobody(&m.a);
    let seen_by_b = |m: &Pair| {
        m.eb.closed_connections()
            .iter()
            .filter(|v| v["src_spiffe_id"] == AGENT_ID || v["src_spiffe_id"] == CONTAINER_ID)
            .count()
    };
    let before = seen_by_b(&m);
    for name in ["tool.service", &*format!("docker-{CONTAINER}.scope")] {
        let a_before = m.ea.closed_connections().len();
        let script = format!(
            "mkdir \"$0/{name}\" && echo $$ > \"$0/{name}/cgroup.procs\" && exec curl -sS -o /dev/null -w '%{{http_code}}' {url}"
        );
        let (_, out) =
            m.a.exec(
                Some("user@65534.service"),
                &[AS_NOBODY, &[&*script, &*delegated.display().to_string()]].concat(),
            )
            .expect("the attacker");
        assert!(
            delegated.join(name).join("cgroup.procs").exists(),
            "{name}: the unprivileged owner made its cgroup: {out:?}"
        );
        let last = m.ea.connection_after(a_before);
        assert!(
            last["cgroup"]
                .as_str()
                .is_some_and(|c| c.ends_with(&format!("user@65534.service/{name}"))),
            "{name}: the connection came from the cgroup it made: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            seen_by_b(&m),
            before,
            "{name}: a process in a cgroup it named reached b with that name's identity: {last}"
        );
        assert_eq!(last["outcome"], "no_identity", "{name}: {last}");
    }
    // The same on the server's side: a listener in a cgroup its owner
    // named llm.service was presented to clients with the LLM's identity.
    let b_delegated = delegated_to_nobody(&m.b);
    m.tb.spawn(
        &m.b,
        Some("user@65534.service"),
        "squatter",
        &[
            AS_NOBODY,
            &[
            "mkdir \"$0/llm.service\" && echo $$ > \"$0/llm.service/cgroup.procs\" && exec /usr/bin/python3 -u -m http.server --directory /tmp 8081",
            &b_delegated.display().to_string(),
            ],
        ]
        .concat(),
    )
    .expect("the squatter");
    assert!(
        m.tb.wait_server_log(&m.b, "squatter", "Serving HTTP"),
        "the squatter listens: {}",
        m.tb.server_log(&m.b, "squatter")
    );
    let a_before = m.ea.closed_connections().len();
    let (code, _) =
        m.a.http_status(Some("tool.service"), &format!("http://{}:8081/", m.b.ipv4));
    let last = m.ea.connection_after(a_before);
    assert_ne!(
        last["dst_spiffe_id"], LLM_ID,
        "a listener in a cgroup its owner named was presented as the LLM (HTTP {code}): {last}"
    );
    assert_eq!(code, "000", "the squatter was not reached: {last}");
}

#[test]
fn an_executable_patched_in_place_does_not_keep_the_digest_it_had() {
    // The attack: a copy of the trusted executable (the same bytes, so the
    // same digest: the identity is given to the content) is run once and
    // its digest cached. Then it is patched in place — the same size —
    // and its mtime set back: the cache's key (device, inode, mtime in
    // seconds, size) did not change, and the patched program was attested
    // with the trusted digest.
    let (dir, trusted, digest) = trusted_python("patched");
    let copy = dir.0.join("copy");
    std::fs::copy(&trusted, &copy).expect("the copy");
    let copy_s = copy.display().to_string();
    let m = trusted_exe_pair("patched", &format!("unix:sha256:{digest}"), &[]);
    let b_ip = m.b.ipv4.to_string();
    // The agent caches the digest of a file left alone for two seconds.
    std::thread::sleep(Duration::from_millis(2200));
    let ask = |m: &Pair| {
        let a_before = m.ea.closed_connections().len();
        let (_, out) =
            m.a.exec(
                Some("tool.service"),
                &[&copy_s, "-c", PY_CONNECT_THEN, &b_ip, "ask"],
            )
            .expect("the copy");
        (out, m.ea.connection_after(a_before))
    };
    let (out, first) = ask(&m);
    assert_eq!(
        first["src_spiffe_id"], AGENT_ID,
        "the same bytes have the same identity: {first} {out:?}"
    );
    assert_eq!(
        m.ea.metric("enforcer_executable_hashes_total", &[]).ok(),
        Some(1.0),
        "the copy was hashed once"
    );
    // Patched in its padding (a different program all the same), the
    // same size, its mtime set back.
    let mtime = std::fs::metadata(&copy)
        .and_then(|m| m.modified())
        .expect("mtime");
    let len = std::fs::metadata(&copy).expect("copy").len();
    {
        use std::io::{Seek as _, Write as _};
        let mut f = std::fs::File::options()
            .write(true)
            .open(&copy)
            .expect("the copy");
        f.seek(std::io::SeekFrom::Start(len - 1)).expect("seek");
        f.write_all(b"\x01").expect("patch");
        f.set_times(std::fs::FileTimes::new().set_modified(mtime))
            .expect("mtime set back");
    }
    assert_eq!(std::fs::metadata(&copy).expect("copy").len(), len);
    assert_ne!(
        sha256sum(&copy),
        digest,
        "the patched copy is another program"
    );
    let (out, second) = ask(&m);
    assert_ne!(
        second["src_spiffe_id"], AGENT_ID,
        "the patched program was attested with the digest it had before: {second} {out:?}"
    );
    assert_eq!(second["outcome"], "no_identity", "{second}");
}

#[test]
fn a_program_in_a_mount_namespace_of_its_own_does_not_get_the_path_it_shows() {
    // The attack: the kernel gives a process's executable path as seen in
    // the process's own mount namespace, and an unprivileged user can make
    // one (`unshare -rm`) and mount a tmpfs over the trusted executable's
    // directory there. Its own program at that path was read as the
    // trusted path (unix:path) and got the identity given to it.
    let (dir, trusted, _) = trusted_python("pathns");
    let trusted_s = trusted.display().to_string();
    let m = trusted_exe_pair("pathns", &format!("unix:path:{trusted_s}"), &[]);
    let b_ip = m.b.ipv4.to_string();
    // The trusted executable itself has the identity.
    let a_before = m.ea.closed_connections().len();
    let (_, out) =
        m.a.exec(
            Some("tool.service"),
            &[&trusted_s, "-c", PY_CONNECT_THEN, &b_ip, "ask"],
        )
        .expect("the trusted executable");
    let line = m.ea.connection_after(a_before);
    assert_eq!(line["src_spiffe_id"], AGENT_ID, "{line} {out:?}");
    // nobody's python3, at the trusted path in its own mount namespace.
    let a_before = m.ea.closed_connections().len();
    let script = "unshare -rm sh -c 'mount -t tmpfs none \"$0\" && cp /usr/bin/python3 \"$0/trusted-python\" && exec \"$0/trusted-python\" -c \"$1\" \"$2\" ask' \"$0\" \"$1\" \"$2\"";
    let (_, out) =
        m.a.exec(
            Some("tool.service"),
            &[
                AS_NOBODY,
                &[
                    script,
                    &*dir.0.display().to_string(),
                    PY_CONNECT_THEN,
                    &b_ip,
                ],
            ]
            .concat(),
        )
        .expect("the attacker");
    let line = m.ea.connection_after(a_before);
    assert_eq!(line["uid"], 65534, "nobody's connection: {line} {out:?}");
    assert_ne!(
        line["src_spiffe_id"], AGENT_ID,
        "another program, shown at the trusted path in its own mount namespace, got the trusted path's identity: {line}"
    );
    assert_eq!(line["outcome"], "no_identity", "{line} {out:?}");
}

#[test]
fn a_captured_workload_reaches_a_protected_local_port_over_loopback_only_through_policy() {
    // The attack: connects to loopback were never captured and loopback
    // connections never steered, so a captured workload reached a server
    // of its own node on a protected port at 127.0.0.1 or ::1 directly —
    // no identity, no policy, no L7 decision, no audit line — where the
    // node's address was decided (before: stranger.service got 200 from
    // both loopback addresses). And 0.0.0.0 and [::], which the kernel
    // connects to this host, were captured but taken for a destination
    // outside the mesh: unattested, decided as egress (before: 200 again,
    // `same_node: false`). Now a captured connect to loopback or to the
    // unspecified address on a protected port (`[[mesh.inbound]]`) is a
    // same-node connection like any other; other loopback ports stay
    // uncaptured.
    let (mut tb, a, ea) = local_llm(
        "loopback",
        "[[mesh.inbound]]\nports = [8081]\nmode = \"strict\"\n",
    );
    tb.start_server_in(
        &a,
        Some("helper.service"),
        "helper",
        &["python3", "-m", "http.server", "8083", "--bind", "::"],
        8083,
    )
    .expect("an unprotected local server on a");
    for host in ["127.0.0.1", "[::1]", "0.0.0.0", "[::]"] {
        let url = format!("http://{host}:8081/");
        let (pid, out) = curl(&a, "stranger.service", &url);
        let line = ea
            .wait_for_connection(|v| v["pid"] == pid)
            .unwrap_or_else(|| {
                panic!("{url}: the stranger's connection went around the agent: {out:?}")
            });
        assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "{url}");
        assert_eq!(line["same_node"], true, "{line}");
        assert_eq!(line["outcome"], "no_identity", "{line}");
        let pid = a.get_ok(Some("support-agent.service"), &url);
        let line = ea.connection_line(|v| v["pid"] == pid);
        assert_eq!(line["src_spiffe_id"], AGENT_ID, "{line}");
        assert_eq!(line["dst_spiffe_id"], LLM_ID, "{line}");
        assert_eq!(line["outcome"], "ok", "{line}");
    }
    // A loopback port that is not protected is not captured.
    let pid = a.get_ok(Some("stranger.service"), "http://127.0.0.1:8083/");
    let _ = a.get_ok(
        Some("support-agent.service"),
        &format!("http://{}:8081/", a.ipv4),
    );
    ea.wait_for_connection(|v| v["orig_dst"] == format!("{}:8081", a.ipv4))
        .expect("a later connection's line");
    assert!(
        !ea.closed_connections().iter().any(|v| v["pid"] == pid),
        "an unprotected loopback port was captured"
    );
    // The unspecified address on any other port is captured as the CIDR
    // rules say (0.0.0.0/0, ::/0), as any address is: a same-node
    // connection, decided.
    for host in ["0.0.0.0", "[::]"] {
        let pid = a.get_ok(Some("stranger.service"), &format!("http://{host}:8083/"));
        let line = ea
            .wait_for_connection(|v| v["pid"] == pid)
            .unwrap_or_else(|| panic!("{host}:8083 went around the agent"));
        assert_eq!(line["same_node"], true, "{line}");
    }
}
