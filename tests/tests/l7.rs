//! Per-request policy (L7, DESIGN §1.7) end to end: two real agents; on b an
//! MCP server of the official `mcp` SDK and an HTTP server, declared `mcp`
//! and `http`; on a the support and admin agents, with the official `mcp`
//! client, curl and Python's http.client. b's agent, the last before the
//! servers, decides each request.
use std::{fs, path::PathBuf};

use enforcer_tests::{MESH, Node, Pair, entry, json_lines_of, llm_pair, sum_metric, wait_for};
use serde_json::Value;

const TD: &str = "ai.example.org";
const SUPPORT: &str = "spiffe://ai.example.org/agent/support";
const ADMIN: &str = "spiffe://ai.example.org/agent/admin";

/// The test policy: connections between the agents and the servers are
/// allowed; MCP tools per agent and, for search, per collection; HTTP in
/// OPA-Envoy's terms (GET, except blocked prefixes; POST /upload for the
/// admin only).
const POLICY: &str = r#"package enforcer.authz

import rego.v1

support := "spiffe://ai.example.org/agent/support"
admin := "spiffe://ai.example.org/agent/admin"

default allow := false

allow if {
	not input.attributes
	input.source.spiffe_id in {support, admin}
}

tools := {support: {"search_docs"}, admin: {"search_docs", "delete_doc"}}

collections := {support: {"support-docs"}, admin: {"support-docs", "hr"}}

allow if {
	input.mcp.method == "tools/call"
	input.mcp.tool in tools[input.attributes.source.principal]
	arguments_ok
}

arguments_ok if input.mcp.listing

arguments_ok if input.mcp.tool == "delete_doc"

arguments_ok if {
	input.mcp.tool == "search_docs"
	object.get(input.mcp.arguments, "collection", "support-docs") in collections[input.attributes.source.principal]
}

reason := "this agent may not use that tool" if {
	input.mcp.method == "tools/call"
	not input.mcp.tool in tools[input.attributes.source.principal]
} else := "this agent may not search that collection" if {
	input.mcp.method == "tools/call"
	not arguments_ok
}

blocked if {
	some prefix in data.blocked_prefixes
	startswith(input.attributes.request.http.path, prefix)
}

blocked if startswith(input.attributes.request.http.host, "admin.")

allow if {
	input.attributes.request.http.method == "GET"
	not blocked
}

allow if {
	input.attributes.request.http.method == "POST"
	input.parsed_path == ["upload"]
	input.attributes.source.principal == admin
}

# Written as for OPA-Envoy, where a JSON body that does not parse fails the
# check: rules that allow when a body field is absent are safe there.
allow if {
	input.attributes.request.http.method == "POST"
	input.parsed_path == ["orders"]
	not input.parsed_body.priority == "urgent"
}

reason := "only GET is allowed here" if {
	input.protocol == "http"
	input.attributes.request.http.method != "GET"
	not allow
} else := "blocked path" if {
	input.protocol == "http"
	blocked
}
"#;

fn helper(name: &str) -> String {
    format!("{}/helpers/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Nodes a and b; b declares 8001 and 8003 `mcp` and 8002 `http` (bodies
/// seen up to 1 KiB); both run the test policy from one directory.
/// An l7 test's policy directory, removed when the test ends (passed or
/// failed).
struct PolicyDir(PathBuf);

impl std::ops::Deref for PolicyDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn l7_pair(test: &str) -> (Pair, PolicyDir) {
    let dir = PolicyDir(
        std::env::temp_dir().join(format!("enforcer-{test}-policy-{}", std::process::id())),
    );
    fs::create_dir_all(&*dir).expect("policy dir");
    fs::write(dir.join("policy.rego"), POLICY).expect("policy");
    fs::write(
        dir.join("data.json"),
        r#"{"blocked_prefixes": ["/blocked"]}"#,
    )
    .expect("data");
    let source = dir.display().to_string();
    let pair = llm_pair(test, TD, |tb, n| {
        let policy = tb.policy_section(n, &source);
        if n.name == "a" {
            (
                String::new(),
                format!(
                    "{}\n{}\n{MESH}\n{policy}",
                    entry(SUPPORT, "systemd:unit:support-agent.service"),
                    entry(ADMIN, "systemd:unit:admin-agent.service"),
                ),
            )
        } else {
            (
                String::new(),
                format!(
                    "{}\n{}\n{MESH}\n{policy}\n[l7]\nmax_body_bytes = 1024\nupgrades = [\"websocket\", \"x-test\"]\n\n[[l7.destinations]]\nports = [8001, 8003]\nprotocol = \"mcp\"\n\n[[l7.destinations]]\nports = [8002, 8004, 8005]\nprotocol = \"http\"\n",
                    entry("spiffe://ai.example.org/mcp/docs", "systemd:unit:mcp.service"),
                    entry("spiffe://ai.example.org/api", "systemd:unit:api.service"),
                ) + &entry(SUPPORT, "systemd:unit:local-agent.service"),
            )
        }
    })
    .expect("two nodes");
    (pair, dir)
}

/// Starts hypercorn (`asgi_echo.py`, server log "asgi") on b's 8004.
fn start_asgi(m: &mut Pair) {
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "asgi",
        &["python3", "-u", &helper("asgi_echo.py"), "8004"],
        8004,
    )
    .expect("hypercorn server (pip install hypercorn: cargo xtask setup)");
}

/// Runs the Python `script` as the support agent on a; its JSON lines,
/// `n` of them.
fn support_client(m: &Pair, script: &str, n: usize) -> Vec<Value> {
    let (_, out) =
        m.a.exec(Some("support-agent.service"), &["python3", "-c", script])
            .expect("client");
    let r = json_lines(&out);
    assert_eq!(r.len(), n, "{}", String::from_utf8_lossy(&out.stderr));
    r
}

fn json_out(out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Every JSON line a helper printed.
/// `enforcer_l7_server_connections_replaced_total` at the test's `http`
/// server, for `why`.
fn replaced(metrics: &str, why: &str) -> f64 {
    sum_metric(
        metrics,
        "enforcer_l7_server_connections_replaced_total",
        &[("destination", "spiffe://ai.example.org/api"), ("why", why)],
    )
}

/// b's kept server connections replaced so far: `retired` and `closed`.
fn assert_replaced(m: &Pair, retired: f64, closed: f64) {
    let metrics = m.eb.metrics().expect("metrics");
    assert_eq!(
        (replaced(&metrics, "retired"), replaced(&metrics, "closed")),
        (retired, closed),
        "{metrics}"
    );
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    enforcer_tests::json_lines(&String::from_utf8_lossy(&out.stdout))
}

/// curl POSTs `body` as JSON to b's MCP server on 8001 from the support
/// agent, with the extra `headers`; the answer's JSON.
fn mcp_post(m: &Pair, headers: &[&str], body: &str) -> Value {
    let url = format!("http://{}:8001/mcp", m.b.ipv4);
    let mut cmd = vec![
        "curl",
        "-sS",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
    ];
    for h in headers {
        cmd.extend(["-H", h]);
    }
    cmd.extend(["--data", body, &url]);
    let (_, out) = m.a.exec(Some("support-agent.service"), &cmd).expect("curl");
    json_out(&out)
}

/// The metric's sum over the series with `labels` is at least `min`.
fn assert_at_least(metrics: &str, name: &str, labels: &[(&str, &str)], min: f64) {
    let sum = sum_metric(metrics, name, labels);
    assert!(sum >= min, "{name} {labels:?} = {sum} < {min}:\n{metrics}");
}

/// The official client's calls; `mode` is the SDK's (`auto`: the
/// 2026-07-28 protocol, `legacy`: the initialize handshake and sessions).
fn mcp_call(node: &Node, unit: &str, mode: &str, url: &str, calls: &[String]) -> Value {
    let mut cmd = vec![
        "python3".to_owned(),
        helper("mcp_call.py"),
        format!("--mode={mode}"),
        url.to_owned(),
    ];
    cmd.extend(calls.iter().cloned());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (_, out) = node.exec(Some(unit), &cmd).expect("mcp client");
    json_out(&out)
}

#[test]
fn mcp_tool_calls_are_decided_per_identity_and_arguments_and_lists_filtered() {
    let (mut m, _policy) = l7_pair("l7-mcp");
    let mcp = helper("mcp_tools.py");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-sse",
        &["python3", "-u", &mcp, "8001"],
        8001,
    )
    .expect("MCP server (SSE answers)");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-json",
        &["python3", "-u", &mcp, "8003", "json"],
        8003,
    )
    .expect("MCP server (JSON answers)");

    // Both protocol eras of the official SDK: 2026-07-28 (server/discover,
    // per-request envelopes, Mcp-Method/Mcp-Name headers, no session) and the
    // initialize handshake with Mcp-Session-Id; answers as SSE and as JSON.
    for (port, log, mode) in [
        (8001, "mcp-sse", "auto"),
        (8001, "mcp-sse", "legacy"),
        (8003, "mcp-json", "auto"),
        (8003, "mcp-json", "legacy"),
    ] {
        let url = format!("http://{}:{port}/mcp", m.b.ipv4);
        let support = mcp_call(
            &m.a,
            "support-agent.service",
            mode,
            &url,
            &[
                r#"search_docs={"query": "reset password"}"#.into(),
                r#"search_docs={"query": "salaries", "collection": "hr"}"#.into(),
                format!(r#"delete_doc={{"doc_id": "support-{port}-{mode}"}}"#),
            ],
        );
        let version = support["protocol_version"].as_str().unwrap_or("");
        assert!(
            if mode == "auto" {
                version >= "2026-07-28"
            } else {
                version < "2026-07-28"
            },
            "{port} {mode}: negotiated {version:?}: {support}"
        );
        // The list shows only what the support agent may call.
        assert_eq!(
            support["tools"],
            serde_json::json!(["search_docs"]),
            "{port}: {support}"
        );
        let calls = &support["calls"];
        assert_eq!(calls[0]["ok"], true, "{port}: {support}");
        assert!(
            calls[0]["text"].as_str().unwrap_or("").contains("found"),
            "{support}"
        );
        assert_eq!(calls[1]["ok"], false, "{port}: {support}");
        assert!(
            calls[1]["text"]
                .as_str()
                .unwrap_or("")
                .contains("denied by policy: this agent may not search that collection"),
            "{port}: {support}"
        );
        assert_eq!(calls[2]["ok"], false, "{port}: {support}");
        assert!(
            calls[2]["text"]
                .as_str()
                .unwrap_or("")
                .contains("denied by policy: this agent may not use that tool"),
            "{port}: {support}"
        );

        let admin = mcp_call(
            &m.a,
            "admin-agent.service",
            mode,
            &url,
            &[format!(r#"delete_doc={{"doc_id": "admin-{port}-{mode}"}}"#)],
        );
        assert_eq!(
            admin["tools"],
            serde_json::json!(["delete_doc", "search_docs"]),
            "{port}: {admin}"
        );
        assert_eq!(admin["calls"][0]["ok"], true, "{port}: {admin}");
        assert!(
            admin["calls"][0]["text"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("deleted admin-{port}-{mode}")),
            "{admin}"
        );
        // The admin's call reached the server after the denied ones were
        // refused: those never did.
        assert!(
            m.tb.wait_server_log(
                &m.b,
                log,
                &format!("CALL delete_doc {{\"doc_id\": \"admin-{port}-{mode}\"}}")
            ),
            "{}",
            m.tb.server_log(&m.b, log)
        );
        let seen = m.tb.server_log(&m.b, log);
        assert!(
            !seen.contains(&format!("support-{port}-{mode}")),
            "a denied call reached the server: {seen}"
        );
        assert!(
            !seen.contains("\"hr\""),
            "a denied search reached the server: {seen}"
        );
        assert!(seen.contains("CALL search_docs"), "{seen}");
    }

    // Invalid JSON is answered -32700 by the agent; the server never sees it.
    let body = mcp_post(&m, &[], "{not json");
    assert_eq!(body["error"]["code"], -32700, "{body}");
    assert_eq!(body["id"], Value::Null, "{body}");

    // 2026-07-28 routing headers that name another tool than the body: the
    // agent refuses (-32020, its own message) instead of letting anything
    // after it route on a name that was not decided.
    let body = mcp_post(
        &m,
        &[
            "mcp-protocol-version: 2026-07-28",
            "mcp-method: tools/call",
            "mcp-name: delete_doc",
        ],
        r#"{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "search_docs", "arguments": {"query": "mismatch"}}}"#,
    );
    assert_eq!(body["error"]["code"], -32020, "{body}");
    assert_eq!(body["id"], 9, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|e| e.starts_with("Header mismatch: the Mcp-Name header")),
        "{body}"
    );

    // One decision-log line per decided call, with the verified caller, the
    // tool and its arguments, and the request id.
    let audit = m.tb.audit(&m.b);
    let denied_delete = |doc: &str| {
        audit
            .iter()
            .find(|l| {
                l["input"]["mcp"]["tool"] == "delete_doc"
                    && l["input"]["mcp"]["arguments"]["doc_id"] == doc
                    && l["input"]["attributes"]["source"]["principal"] == SUPPORT
            })
            .unwrap_or_else(|| panic!("no audit line for the support agent's {doc}: {audit:?}"))
            .clone()
    };
    let denied = denied_delete("support-8001-legacy");
    assert_eq!(denied["result"], false, "{denied}");
    assert_eq!(
        denied["reason"], "this agent may not use that tool",
        "{denied}"
    );
    assert_eq!(denied["input"]["protocol"], "mcp", "{denied}");
    assert!(
        denied["request_id"]
            .as_str()
            .is_some_and(|r| r.contains('.')),
        "{denied}"
    );
    assert!(
        denied["input"]["mcp"]["session"].as_str().is_some(),
        "no session id: {denied}"
    );
    let modern = denied_delete("support-8001-auto");
    assert_eq!(modern["result"], false, "{modern}");
    assert_eq!(
        modern["input"]["mcp"]["protocol_version"], "2026-07-28",
        "{modern}"
    );
    assert_eq!(
        modern["input"]["attributes"]["request"]["http"]["headers"]["mcp-name"], "delete_doc",
        "{modern}"
    );

    // Each listed item is decided as the call it names, with the list
    // request's session or protocol version (hidden from the support agent).
    let listing = |pred: &dyn Fn(&Value) -> bool| {
        audit.iter().any(|l| {
            l["input"]["mcp"]["listing"] == true
                && l["input"]["mcp"]["tool"] == "delete_doc"
                && l["input"]["attributes"]["source"]["principal"] == SUPPORT
                && l["result"] == false
                && pred(&l["input"]["mcp"])
        })
    };
    assert!(
        listing(&|mcp| mcp["protocol_version"] == "2026-07-28"),
        "{audit:?}"
    );
    assert!(listing(&|mcp| mcp["session"].is_string()), "{audit:?}");

    let metrics = m.eb.metrics().expect("metrics");
    assert_at_least(
        &metrics,
        "enforcer_mcp_calls_total",
        &[("tool", "delete_doc"), ("result", "deny")],
        2.0,
    );
    assert_at_least(
        &metrics,
        "enforcer_mcp_calls_total",
        &[("tool", "delete_doc"), ("result", "allow")],
        2.0,
    );
    assert_at_least(
        &metrics,
        "enforcer_http_requests_total",
        &[("protocol", "mcp"), ("result", "bad_request")],
        1.0,
    );
}

/// The raw-socket probe: sends `bytes` to b:8002 (the first `@` replaced by
/// `pad` bytes) and returns its report.
fn raw_padded(m: &Pair, bytes: &[u8], pad: usize) -> Value {
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                &helper("http_probe.py"),
                "raw",
                &m.b.ipv4.to_string(),
                "8002",
                &bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                &pad.to_string(),
            ],
        )
        .expect("probe");
    json_out(&out)
}

fn raw(m: &Pair, bytes: &[u8]) -> Value {
    raw_padded(m, bytes, 0)
}

#[test]
fn http_requests_are_decided_one_by_one_with_opa_envoy_input() {
    let (mut m, policy) = l7_pair("l7-http");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "api",
        &["python3", "-u", &helper("http_echo.py"), "8002"],
        8002,
    )
    .expect("HTTP server");
    let b = m.b.ipv4.to_string();
    let probe = helper("http_probe.py");

    // Keep-alive: a denied request answers 403 and the connection serves the next.
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                &probe,
                "keepalive",
                &b,
                "8002",
                "DELETE:/items/1",
                "GET:/items/1?x=1&x=2",
                "POST:/upload",
            ],
        )
        .expect("probe");
    let lines: Vec<Value> = json_lines(&out);
    assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines[0]["status"], 403, "{lines:?}");
    let denial: Value =
        serde_json::from_str(lines[0]["body"].as_str().unwrap_or("")).expect("JSON denial");
    assert_eq!(denial["reason"], "only GET is allowed here", "{denial}");
    assert_eq!(lines[1]["status"], 200, "{lines:?}");
    assert_eq!(lines[2]["status"], 403, "{lines:?}");
    assert!(
        lines.iter().all(|l| l["same_connection"] == true),
        "{lines:?}"
    );

    // The same on b itself: the same-node path decides each request too.
    let (_, out) =
        m.b.exec(
            Some("local-agent.service"),
            &[
                "python3",
                &probe,
                "keepalive",
                &b,
                "8002",
                "DELETE:/local/1",
                "GET:/local/2",
            ],
        )
        .expect("probe");
    let local: Vec<Value> = json_lines(&out);
    assert_eq!(local.len(), 2, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(local[0]["status"], 403, "{local:?}");
    assert_eq!(local[1]["status"], 200, "{local:?}");
    assert_eq!(local[1]["same_connection"], true, "{local:?}");

    // A body over the bound streams through whole, seen truncated by policy;
    // Expect: 100-continue is honoured.
    let big = "a".repeat(4096);
    let (_, out) =
        m.a.exec(
            Some("admin-agent.service"),
            &[
                "curl",
                "-sS",
                "-H",
                "Expect: 100-continue",
                "-H",
                "content-type: text/plain",
                "--data-binary",
                &big,
                &format!("http://{b}:8002/upload"),
            ],
        )
        .expect("curl");
    let echoed = json_out(&out);
    assert_eq!(echoed["len"], 4096, "{echoed}");

    // A client that dies half-way through a streamed body: the server's
    // connection is reset too, never closed as if the request were complete.
    m.a.exec(
        Some("admin-agent.service"),
        &["python3", &probe, "abort", &b, "8002", "/upload?abort=1"],
    )
    .expect("probe");
    wait_for("the server to see the aborted upload end", || {
        let log = m.tb.server_log(&m.b, "api");
        log.contains("RESET /upload?abort=1") || log.contains("SHORT /upload?abort=1")
    });
    let seen = m.tb.server_log(&m.b, "api");
    assert!(
        seen.contains("RESET /upload?abort=1") && !seen.contains("SHORT /upload?abort=1"),
        "the server read a clean end of an aborted request: {seen}"
    );

    // A request smuggled behind one with both Content-Length and
    // Transfer-Encoding: the first is read by its Transfer-Encoding (and
    // decided: denied here), the connection closed after its answer, the
    // second never read.
    let r = raw(
        &m,
        b"GET /smuggle-a HTTP/1.1\r\nHost: b\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert_eq!(r["closed"], true, "CL+TE: the connection stayed open: {r}");
    assert_eq!(
        r["answer"]
            .as_str()
            .unwrap_or("")
            .matches("HTTP/1.1")
            .count(),
        1,
        "CL+TE: {r}"
    );
    // Malformed requests: 400 (431 for a huge header block), the connection
    // closed, nothing forwarded.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad chunk size",
            b"POST /smuggle-b HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "obs-fold",
            b"GET /smuggle-c HTTP/1.1\r\nHost: b\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "oversized headers",
            b"GET /smuggle-d HTTP/1.1\r\nHost: b\r\nX-Big: @\r\n\r\n".to_vec(),
            "431",
        ),
    ];
    for (what, bytes, status) in cases {
        let r = raw_padded(&m, &bytes, 70_000);
        assert!(
            r["status_line"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {r}"
        );
        assert_eq!(r["closed"], true, "{what}: the connection stayed open: {r}");
    }
    // A last allowed request; once the server has it, none of the above can still come.
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", &probe, "keepalive", &b, "8002", "GET:/final"],
        )
        .expect("probe");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\": 200"));
    assert!(m.tb.wait_server_log(&m.b, "api", "REQ GET /final"));
    let seen = m.tb.server_log(&m.b, "api");
    for path in ["/smuggled", "/smuggle-b", "/smuggle-c", "/smuggle-d"] {
        assert!(!seen.contains(path), "{path} reached the server: {seen}");
    }
    assert!(
        !seen.contains("DELETE"),
        "a denied request reached the server: {seen}"
    );
    assert!(seen.contains("REQ GET /local/2"), "{seen}");
    assert!(seen.contains("REQ POST /upload 4096"), "{seen}");

    // The audit lines: OPA-Envoy's input, secrets redacted.
    let audit_path = m.tb.audit_log(&m.b);
    enforcer_tests::settle_logs();
    let text = fs::read_to_string(&audit_path).unwrap_or_default();
    assert!(
        !text.contains("TOPSECRET-TOKEN-42"),
        "a bearer token reached the audit log"
    );
    let audit = json_lines_of(&audit_path);
    let get = audit
        .iter()
        .find(|l| l["input"]["attributes"]["request"]["http"]["path"] == "/items/1?x=1&x=2")
        .unwrap_or_else(|| panic!("no audit line for the GET: {audit:?}"));
    let http = &get["input"]["attributes"]["request"]["http"];
    assert_eq!(http["method"], "GET", "{get}");
    assert_eq!(http["headers"]["authorization"], "[redacted]", "{get}");
    assert_eq!(
        get["input"]["parsed_path"],
        serde_json::json!(["items", "1"]),
        "{get}"
    );
    assert_eq!(
        get["input"]["parsed_query"],
        serde_json::json!({"x": ["1", "2"]}),
        "{get}"
    );
    assert_eq!(
        get["input"]["attributes"]["source"]["principal"], SUPPORT,
        "{get}"
    );
    assert_eq!(get["input"]["truncated_body"], false, "{get}");
    assert_eq!(get["result"], true, "{get}");
    let upload = audit
        .iter()
        .find(|l| l["input"]["truncated_body"] == true)
        .unwrap_or_else(|| panic!("no audit line with a truncated body: {audit:?}"));
    assert_eq!(
        upload["input"]["attributes"]["source"]["principal"], ADMIN,
        "{upload}"
    );
    assert_eq!(upload["input"]["parsed_body"], Value::Null, "{upload}");

    // A reload applies to the next request of a connection already open.
    let gate = m.tb.dir.join("reload-gate");
    m.tb.spawn(
        &m.a,
        Some("support-agent.service"),
        "gate",
        &[
            "python3",
            "-u",
            &probe,
            "gate",
            &b,
            "8002",
            "/reload-probe",
            &gate.display().to_string(),
        ],
    )
    .expect("gate probe");
    wait_for("the first request", || {
        m.tb.server_log(&m.a, "gate").contains("\"status\": 200")
    });
    let reloads = || {
        fs::read_to_string(&m.eb.log)
            .unwrap_or_default()
            .matches("policy reloaded")
            .count()
    };
    let before = reloads();
    fs::write(
        policy.join("data.json"),
        r#"{"blocked_prefixes": ["/blocked", "/reload-probe"]}"#,
    )
    .expect("data");
    wait_for("b's agent to reload", || reloads() > before);
    fs::write(&gate, "go").expect("gate");
    wait_for("the second request", || {
        m.tb.server_log(&m.a, "gate").lines().count() >= 2
    });
    let second: Value =
        serde_json::from_str(m.tb.server_log(&m.a, "gate").lines().nth(1).unwrap_or(""))
            .expect("second answer");
    assert_eq!(second["status"], 403, "{second}");
    assert_eq!(second["same_connection"], true, "{second}");

    let metrics = m.eb.metrics().expect("metrics");
    assert_at_least(
        &metrics,
        "enforcer_http_requests_total",
        &[("protocol", "http"), ("result", "deny")],
        3.0,
    );
    assert_at_least(
        &metrics,
        "enforcer_http_requests_total",
        &[("protocol", "http"), ("result", "bad_request")],
        1.0,
    );
}

#[test]
fn h2c_websocket_connect_and_pipelined_requests_are_decided_one_by_one() {
    let (mut m, _policy) = l7_pair("l7-h2ws");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "api",
        &["python3", "-u", &helper("http_echo.py"), "8002"],
        8002,
    )
    .expect("HTTP/1.1 server");
    start_asgi(&mut m);
    let b = m.b.ipv4.to_string();

    // Pipelining: three requests in one write; each is decided in order and
    // answered in order, the denied one in its place.
    let r = raw(
        &m,
        b"GET /p1 HTTP/1.1\r\nHost: b\r\n\r\nGET /blocked/p2 HTTP/1.1\r\nHost: b\r\n\r\nGET /p3 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    let answer = r["answer"].as_str().unwrap_or("");
    // (A body does not end in CRLF: the next status line follows it.)
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answer.get(i + 9..i + 12))
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{answer}");
    let p1 = answer.find("\"/p1\"").unwrap_or(usize::MAX);
    let p3 = answer.find("\"/p3\"").unwrap_or(0);
    assert!(p1 < p3, "answers in request order: {answer}");
    assert!(m.tb.wait_server_log(&m.b, "api", "REQ GET /p3 0"));
    assert!(
        !m.tb.server_log(&m.b, "api").contains("/blocked"),
        "{}",
        m.tb.server_log(&m.b, "api")
    );

    // h2c with prior knowledge (httpx): an allowed and a denied request on
    // one HTTP/2 connection; the server is spoken to in HTTP/2 as well.
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "python3",
                &helper("http_probe.py"),
                "h2",
                &b,
                "8004",
                "/h2/one",
                "/blocked/h2",
            ],
        )
        .expect("h2 probe");
    let lines: Vec<Value> = json_lines(&out);
    assert_eq!(lines.len(), 2, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines[0]["http_version"], "HTTP/2", "{lines:?}");
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let served: Value =
        serde_json::from_str(lines[0]["body"].as_str().unwrap_or("")).expect("the server's JSON");
    assert_eq!(served["http_version"], "2", "{served}");
    assert_eq!(lines[1]["status"], 403, "{lines:?}");
    let denial: Value =
        serde_json::from_str(lines[1]["body"].as_str().unwrap_or("")).expect("the denial's JSON");
    assert_eq!(denial["reason"], "blocked path", "{denial}");
    assert!(m.tb.wait_server_log(&m.b, "asgi", "REQ 2 GET /h2/one 0"));
    let audit = m.tb.audit(&m.b);
    let h2 = audit
        .iter()
        .find(|l| l["input"]["attributes"]["request"]["http"]["path"] == "/blocked/h2")
        .expect("an audit line for the denied HTTP/2 request");
    assert_eq!(
        h2["input"]["attributes"]["request"]["http"]["protocol"], "HTTP/2",
        "{h2}"
    );
    assert_eq!(h2["result"], false, "{h2}");
    let one = audit
        .iter()
        .find(|l| l["input"]["attributes"]["request"]["http"]["path"] == "/h2/one")
        .expect("an audit line for the allowed HTTP/2 request");
    assert_eq!(one["conn_id"], h2["conn_id"], "one connection: {one} {h2}");

    // WebSocket: the upgrade is decided like any GET, then tunnelled (the
    // messages go both ways); an upgrade to a blocked path is refused 403
    // and never reaches the server.
    let ws = |path: &str| {
        let (_, out) =
            m.a.exec(
                Some("support-agent.service"),
                &[
                    "python3",
                    &helper("ws_probe.py"),
                    &format!("ws://{b}:8004{path}"),
                    "hello",
                    "again",
                ],
            )
            .expect("websocket client (pip install websockets: cargo xtask setup)");
        json_out(&out)
    };
    let open = ws("/ws/chat");
    assert_eq!(
        open["answers"],
        serde_json::json!(["echo: hello", "echo: again"]),
        "{open}"
    );
    let refused = ws("/blocked/ws");
    assert_eq!(refused["refused"], 403, "{refused}");
    assert!(
        refused["body"]
            .as_str()
            .is_some_and(|b| b.contains("blocked path")),
        "{refused}"
    );
    assert!(m.tb.wait_server_log(&m.b, "asgi", "WS MSG again"));

    // A tunnel that breaks after the upgrade (the server aborts it) is reset
    // to the client, not closed as if it had ended: over HBONE from a, and
    // on b itself (the same-node path).
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "upgrade-abort",
        &["python3", "-u", &helper("upgrade_abort.py"), "8005"],
        8005,
    )
    .expect("upgrade-abort server");
    let upgrade = "GET /up HTTP/1.1\r\nHost: b\r\nUpgrade: x-test\r\nConnection: Upgrade\r\n\r\n";
    let hex: String = upgrade.bytes().map(|c| format!("{c:02x}")).collect();
    for (node, unit) in [
        (&m.a, "support-agent.service"),
        (&m.b, "local-agent.service"),
    ] {
        let (_, out) = node
            .exec(
                Some(unit),
                &["python3", &helper("http_probe.py"), "raw", &b, "8005", &hex],
            )
            .expect("probe");
        let r = json_out(&out);
        let answer = r["answer"].as_str().unwrap_or("");
        assert!(
            answer.starts_with("HTTP/1.1 101") && answer.ends_with("hello"),
            "{unit}: {r}"
        );
        assert_eq!(
            r["reset"], true,
            "{unit}: a broken tunnel must reach the client as a reset: {r}"
        );
    }

    // CONNECT is a request like any other: this policy allows only GET, so
    // the tunnel is refused 403 and the server never sees it.
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-p",
                "-x",
                &format!("http://{b}:8004"),
                "-w",
                "%{http_connect}",
                "http://198.51.100.7:80/",
            ],
        )
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = m.tb.server_log(&m.b, "asgi");
    assert!(!log.contains("/blocked"), "{log}");
    assert!(!log.contains("CONNECT"), "{log}");
    let connect = audit.iter().chain(m.tb.audit(&m.b).iter()).any(|l| {
        l["input"]["attributes"]["request"]["http"]["method"] == "CONNECT" && l["result"] == false
    });
    assert!(connect, "the CONNECT was decided and audited");
}

#[test]
fn an_mcp_list_answer_the_filter_cannot_read_is_cut_not_passed() {
    // The failure: on an SSE answer, an event whose JSON serde_json refuses
    // passed unfiltered. The official SDK's client parses `NaN` (pydantic),
    // so a server that put one in its tools/list answer showed the support
    // agent delete_doc, which its policy hides. Now such an answer is cut
    // (a JSON answer that cannot be read was already refused with 502).
    // The server is the SDK's, its answers changed on the way out
    // (mcp_tools.py's `nan` mode).
    let (mut m, _policy) = l7_pair("l7-mcpnan");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-nan",
        &["python3", "-u", &helper("mcp_tools.py"), "8001", "nan"],
        8001,
    )
    .expect("MCP server (lists with NaN)");
    let url = format!("http://{}:8001/mcp", m.b.ipv4);
    let mcp_call = helper("mcp_call.py");
    for mode in ["auto", "legacy"] {
        let (_, out) =
            m.a.exec(
                Some("support-agent.service"),
                &["python3", &mcp_call, &format!("--mode={mode}"), &url],
            )
            .expect("mcp client");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !said.contains("delete_doc"),
            "{mode}: the support agent was shown a tool its policy hides: {said}"
        );
        assert!(
            !out.status.success(),
            "{mode}: the list should have failed, not come back empty or filtered by luck: {said}"
        );
    }
    // b's agent said why, for the SSE answer (the legacy handshake's).
    enforcer_tests::settle_logs();
    let cut =
        m.eb.log_lines()
            .iter()
            .filter(|l| {
                l["message"] == "an MCP event could not be read to filter it; the answer is cut"
            })
            .count();
    assert!(cut >= 1, "b's agent never said it cut an answer");
}

#[test]
fn an_mcp_server_that_compresses_has_its_lists_filtered_not_passed() {
    // The failure: the SDK's client (httpx) accepts gzip, and a server that
    // compresses (here the SDK's own behind Starlette's GZipMiddleware, as
    // behind a compressing proxy) answered in gzip. The filter read the
    // compressed bytes: not JSON, not SSE events it could see into. Now the
    // agent asks the server for `identity` on every request whose answer it
    // reads, so the list is filtered; a server that compresses anyway has
    // its answer decoded and filtered (it was refused, never passed unread,
    // before the agent decoded answers).
    let (mut m, _policy) = l7_pair("l7-mcpgzip");
    let mcp_tools = helper("mcp_tools.py");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-gzip",
        &["python3", "-u", &mcp_tools, "8001", "gzip"],
        8001,
    )
    .expect("MCP server (gzip when accepted)");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-gzip-always",
        &["python3", "-u", &mcp_tools, "8003", "gzip-always"],
        8003,
    )
    .expect("MCP server (gzip always)");
    let mcp_call = helper("mcp_call.py");
    let run = |port: u16, mode: &str| {
        let url = format!("http://{}:{port}/mcp", m.b.ipv4);
        let (_, out) =
            m.a.exec(
                Some("support-agent.service"),
                &[
                    "python3",
                    &mcp_call,
                    &format!("--mode={mode}"),
                    &url,
                    r#"search_docs={"query": "refunds"}"#,
                ],
            )
            .expect("mcp client");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out, said)
    };
    // A server that compresses when asked (asked for identity, it answers
    // plainly) and one that compresses whatever it is asked (decoded):
    // either way the list is filtered and the call answered.
    for mode in ["legacy", "auto"] {
        for (port, server) in [(8001, "gzip when asked"), (8003, "gzip always")] {
            let (out, said) = run(port, mode);
            assert!(out.status.success(), "{mode}, {server}: {said}");
            let v = json_out(&out);
            assert_eq!(
                v["tools"],
                serde_json::json!(["search_docs"]),
                "{mode}, {server}: the support agent must see only what it may call: {said}"
            );
            assert_eq!(v["calls"][0]["ok"], true, "{mode}, {server}: {said}");
        }
    }
    // The server was asked for identity and made to answer in gzip; the
    // agent refused nothing.
    assert!(
        m.tb.server_log(&m.b, "mcp-gzip-always")
            .contains("FORCED gzip, asked for: identity"),
        "{}",
        m.tb.server_log(&m.b, "mcp-gzip-always")
    );
    enforcer_tests::settle_logs();
    let lines = m.eb.log_lines();
    assert!(
        !lines
            .iter()
            .any(|l| l["message"] == "an MCP list answer could not be filtered; refused"),
        "b's agent refused an answer it can decode"
    );
}

#[test]
fn request_bodies_policy_cannot_read_are_refused_not_decided_blind() {
    // The failures: a JSON body that did not parse, or a compressed one,
    // was decided as if it had no body. OPA-Envoy fails the check on such
    // a body, so a policy written for it (`not input.parsed_body.priority
    // == "urgent"`) was safe there and let both through here — to a server
    // whose parser reads `NaN` (Python's) or that decompresses
    // (Express's body-parser, tower-http's RequestDecompressionLayer).
    // Now the first is refused 400. A compressed one is decoded, decided
    // on what it says, and forwarded decoded — the server reads the bytes
    // policy read —, over HTTP/1.1 and HTTP/2; one in a coding enforcer
    // does not decode is refused 415, one that decodes past the body
    // bound 413, one that does not decode 400. None of the refused reaches
    // the server, and after a 403, 400 (NaN) or 415 the connection serves
    // the next request.
    let (mut m, _policy) = l7_pair("l7-bodies");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "api",
        &["python3", "-u", &helper("http_echo.py"), "8002"],
        8002,
    )
    .expect("HTTP server");
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp",
        &["python3", "-u", &helper("mcp_tools.py"), "8001", "json"],
        8001,
    )
    .expect("MCP server");
    start_asgi(&mut m);
    let client = format!(
        r#"
import gzip, http.client, json, zlib
def conn():
    return http.client.HTTPConnection("{b}", 8002, timeout=10)
c = conn()
def post(path, body, on=None, **headers):
    h = on or c
    h.request("POST", path, body=body, headers=dict({{"content-type": "application/json"}}, **headers))
    r = h.getresponse()
    print(json.dumps({{"status": r.status, "body": r.read().decode(), "sock": id(h.sock)}}), flush=True)
post("/orders", b'{{"priority": "low"}}')
post("/orders", b'{{"priority": "urgent"}}')
post("/orders", b'{{"priority": "urgent", "score": NaN}}')
post("/orders", gzip.compress(b'{{"priority": "urgent"}}'), **{{"content-encoding": "gzip"}})
post("/orders", gzip.compress(b'{{"priority": "low", "n": 1}}'), **{{"content-encoding": "gzip"}})
post("/orders", gzip.compress(zlib.compress(b'{{"priority": "low", "n": 2}}')), **{{"content-encoding": "deflate, gzip"}})
post("/orders", b'{{"priority": "urgent"}}', **{{"content-encoding": "compress"}})
c.request("GET", "/items/2")
r = c.getresponse()
print(json.dumps({{"status": r.status, "body": r.read().decode(), "sock": id(c.sock)}}), flush=True)
# 1 KiB of gzip that decodes to 64 KiB (the bound is 1 KiB), and gzip
# that does not decode: each on a connection of its own.
post("/orders", gzip.compress(b'{{"priority": "low", "pad": "' + b" " * 65536 + b'"}}'), on=conn(), **{{"content-encoding": "gzip"}})
post("/orders", gzip.compress(b'{{"priority": "low"}}')[:-6], on=conn(), **{{"content-encoding": "gzip"}})
m = http.client.HTTPConnection("{b}", 8001, timeout=10)
def rpc(message, coding="gzip"):
    m.request("POST", "/mcp", body=gzip.compress(json.dumps(message).encode()),
              headers={{"content-type": "application/json", "content-encoding": coding,
                       "accept": "application/json, text/event-stream"}})
    r = m.getresponse()
    print(json.dumps({{"status": r.status, "body": r.read().decode(), "sock": 0}}), flush=True)
rpc({{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {{"name": "delete_doc", "arguments": {{"doc_id": "7"}}}}}})
rpc({{"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {{"protocolVersion": "2025-06-18", "capabilities": {{}}, "clientInfo": {{"name": "t", "version": "1"}}}}}})
rpc({{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {{"name": "search_docs", "arguments": {{"query": "x"}}}}}}, coding="dcb")
# The same over h2c (curl, prior knowledge) to hypercorn.
import subprocess
for body in [b'{{"priority": "low", "n": 3}}', b'{{"priority": "urgent"}}']:
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "content-type: application/json",
                          "-H", "content-encoding: gzip", "--data-binary", "@-", "-w", "\n%{{http_code}}",
                          "http://{b}:8004/orders"], input=gzip.compress(body), capture_output=True)
    text, _, status = out.stdout.decode().rpartition("\n")
    print(json.dumps({{"status": int(status or 0), "body": text, "sock": 1, "err": out.stderr.decode()}}), flush=True)
# Chunked: the body is forwarded decoded with its length, not chunked.
h = conn()
gz = gzip.compress(b'{{"priority": "low", "n": 4}}')
h.request("POST", "/orders?chunked", body=iter([gz[:7], gz[7:]]), encode_chunked=True,
          headers={{"content-type": "application/json", "content-encoding": "gzip"}})
r = h.getresponse()
print(json.dumps({{"status": r.status, "body": r.read().decode(), "sock": 2}}), flush=True)
"#,
        b = m.b.ipv4
    );
    let r = support_client(&m, &client, 16);
    let statuses: Vec<&Value> = r.iter().map(|x| &x["status"]).collect();
    assert_eq!(
        statuses,
        [
            200, 403, 400, 403, 200, 200, 415, 200, 413, 400, 200, 200, 415, 200, 403, 200
        ],
        "{r:?}"
    );
    let body = |i: usize| r[i]["body"].as_str().unwrap_or_default().to_owned();
    assert!(body(2).contains("the JSON body does not parse"), "{r:?}");
    // The server read the decoded bodies, plain: no coding named, the
    // length of the JSON itself.
    let served = |i: usize| serde_json::from_str::<Value>(&body(i)).expect("echo answer");
    for (i, json) in [
        (4, r#"{"priority": "low", "n": 1}"#),
        (5, r#"{"priority": "low", "n": 2}"#),
        (15, r#"{"priority": "low", "n": 4}"#),
    ] {
        assert_eq!(served(i)["coding"], Value::Null, "{r:?}");
        assert_eq!(served(i)["body"], json, "{r:?}");
    }
    assert!(
        body(6).contains("content-encoding compress")
            && body(6).contains("gzip, deflate, br and zstd"),
        "{r:?}"
    );
    assert!(
        body(8).contains("larger than 1024 bytes") && body(8).contains("request_too_large"),
        "{r:?}"
    );
    assert!(body(9).contains("does not decode"), "{r:?}");
    assert!(r[..8].iter().all(|x| x["sock"] == r[0]["sock"]), "{r:?}");
    // The compressed call of a tool the support agent may not use is
    // denied with the policy's reason; the compressed initialize reaches
    // the server, which parses it.
    assert!(
        body(10).contains("this agent may not use that tool") && body(10).contains("\"id\":1"),
        "{r:?}"
    );
    assert!(body(11).contains("serverInfo"), "{r:?}");
    // At an MCP destination a refusal is a JSON-RPC error.
    let refused: Value = serde_json::from_str(&body(12)).expect("JSON-RPC error");
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("content-encoding dcb")),
        "{refused}"
    );
    // Over HTTP/2 too: decided decoded, served the decoded length.
    assert_eq!(served(13)["http_version"], "2", "{r:?}");
    assert_eq!(
        served(13)["len"],
        r#"{"priority": "low", "n": 3}"#.len(),
        "{r:?}"
    );
    // Only the allowed requests reached the servers.
    enforcer_tests::settle_logs();
    let api = m.tb.server_log(&m.b, "api");
    assert_eq!(api.matches("REQ POST /orders").count(), 4, "{api}");
    let asgi = m.tb.server_log(&m.b, "asgi");
    assert_eq!(asgi.matches("POST /orders").count(), 1, "{asgi}");
    // Policy saw the request as the server got it: the decoded length,
    // neither the coding nor the client's chunked framing.
    let audit = m.tb.audit(&m.b);
    let chunked = audit
        .iter()
        .find(|l| l["input"]["attributes"]["request"]["http"]["path"] == "/orders?chunked")
        .unwrap_or_else(|| panic!("no decision line for the chunked request: {audit:?}"));
    let http = &chunked["input"]["attributes"]["request"]["http"];
    assert_eq!(
        http["headers"]["content-length"],
        r#"{"priority": "low", "n": 4}"#.len().to_string(),
        "{http}"
    );
    assert!(
        http["headers"].get("content-encoding").is_none()
            && http["headers"].get("transfer-encoding").is_none(),
        "{http}"
    );
    assert_eq!(
        http["size"],
        r#"{"priority": "low", "n": 4}"#.len(),
        "{http}"
    );
    let mcp = m.tb.server_log(&m.b, "mcp");
    assert!(!mcp.contains("CALL"), "{mcp}");
}

#[test]
fn paths_are_decided_as_the_server_reads_them() {
    // The failure: policy read the path as sent, the server as it decodes
    // it. `/%62locked/x`, `/public/%2e%2e/blocked/x` and `//blocked/x` were
    // not under the policy's blocked prefix `/blocked`, and reached a
    // server (hypercorn here: it decodes `%62`) that served `/blocked/x`.
    // Now the path is normalized (RFC 3986, slashes merged, as Istio's
    // pathNormalization) before the decision, and the server gets that
    // path.
    let (mut m, _policy) = l7_pair("l7-paths");
    start_asgi(&mut m);
    let client = format!(
        r#"
import http.client, json
c = http.client.HTTPConnection("{b}", 8004, timeout=10)
for path in ["/%62locked/x", "/public/%2e%2e/blocked/x", "//blocked/x", "/public/./docs/../items%7e",
             "/a{{b}}"]:
    c.request("GET", path)
    r = c.getresponse()
    print(json.dumps({{"path": path, "status": r.status, "body": r.read().decode()}}), flush=True)
"#,
        b = m.b.ipv4
    );
    let r = support_client(&m, &client, 5);
    for x in &r[..3] {
        assert_eq!(x["status"], 403, "{x}");
        assert!(
            x["body"]
                .as_str()
                .is_some_and(|b| b.contains("blocked path")),
            "{x}"
        );
    }
    // Allowed, and the server got the path policy saw.
    assert_eq!(r[3]["status"], 200, "{}", r[3]);
    let served: Value = serde_json::from_str(r[3]["body"].as_str().unwrap_or("")).expect("JSON");
    assert_eq!(served["path"], "/public/items~", "{served}");
    // Not a path: refused, not guessed at.
    assert_eq!(r[4]["status"], 400, "{}", r[4]);
    assert!(
        r[4]["body"]
            .as_str()
            .is_some_and(|b| b.contains("not an RFC 3986 path")),
        "{}",
        r[4]
    );
    enforcer_tests::settle_logs();
    let log = m.tb.server_log(&m.b, "asgi");
    assert!(!log.contains("/blocked"), "{log}");
    // The decision lines name the normalized path.
    let audit = m.tb.audit(&m.b);
    let denied = audit
        .iter()
        .filter(|l| l["input"]["attributes"]["request"]["http"]["path"] == "/blocked/x")
        .count();
    assert_eq!(denied, 3, "{audit:?}");
}

#[test]
fn the_host_decided_is_the_host_the_server_gets() {
    // The failure: policy read the request's target authority, the server
    // its Host header. `GET http://public.example/x` with `Host:
    // admin.example` was decided as public.example and served by the
    // server as admin.example (a virtual host the policy blocks); an HTTP/2
    // request's `host` header went to the server beside its `:authority`.
    // Now the server gets one Host, the one decided; two Host headers, or
    // an HTTP/2 host that differs from :authority, are refused 400.
    let (mut m, _policy) = l7_pair("l7-host");
    start_asgi(&mut m);
    let client = format!(
        r#"
import json, socket
import h2.config, h2.connection

def h1(head):
    s = socket.create_connection(("{b}", 8004), timeout=10)
    s.sendall(head.encode())
    buf = b""
    while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < int(
            ([l.split(b":")[1] for l in buf.split(b"\r\n") if l.lower().startswith(b"content-length:")] or [b"0"])[0]):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    status = int(buf.split(b" ", 2)[1]) if buf else 0
    print(json.dumps({{"status": status, "body": buf.split(b"\r\n\r\n", 1)[-1].decode()}}), flush=True)

h1("GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\n\r\n")
h1("GET /x HTTP/1.1\r\nHost: public.example\r\nHost: admin.example\r\n\r\n")
h1("GET /x HTTP/1.1\r\nHost: admin.example\r\n\r\n")

s = socket.create_connection(("{b}", 8004), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
c.initiate_connection()
c.send_headers(1, [(":method", "GET"), (":authority", "public.example"), (":scheme", "http"),
                   (":path", "/x"), ("host", "admin.example")], end_stream=True)
s.sendall(c.data_to_send())
out, done = {{}}, False
while not done:
    d = s.recv(65536)
    if not d:
        break
    for e in c.receive_data(d):
        if isinstance(e, h2.events.ResponseReceived):
            out["status"] = int(dict(e.headers)[b":status"])
        elif isinstance(e, h2.events.DataReceived):
            out["body"] = out.get("body", "") + e.data.decode()
            c.acknowledge_received_data(len(e.data), e.stream_id)
        elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    s.sendall(c.data_to_send())
print(json.dumps(out), flush=True)
"#,
        b = m.b.ipv4
    );
    let r = support_client(&m, &client, 4);
    // Allowed as public.example, and served as public.example.
    assert_eq!(r[0]["status"], 200, "{}", r[0]);
    let served: Value = serde_json::from_str(r[0]["body"].as_str().unwrap_or("")).expect("JSON");
    assert_eq!(served["host"], "public.example", "{served}");
    // Two Host headers: refused.
    assert_eq!(r[1]["status"], 400, "{}", r[1]);
    assert!(
        r[1]["body"]
            .as_str()
            .is_some_and(|b| b.contains("more than one Host")),
        "{}",
        r[1]
    );
    // The policy's own rule on hosts holds.
    assert_eq!(r[2]["status"], 403, "{}", r[2]);
    // HTTP/2: host and :authority differ: refused.
    assert_eq!(r[3]["status"], 400, "{}", r[3]);
    assert!(
        r[3]["body"]
            .as_str()
            .is_some_and(|b| b.contains("differs from :authority")),
        "{}",
        r[3]
    );
    enforcer_tests::settle_logs();
    let log = m.tb.server_log(&m.b, "asgi");
    assert!(!log.contains("admin.example"), "{log}");
}

#[test]
fn an_h2c_upgrade_is_not_a_way_past_policy() {
    // The failure: `Upgrade: h2c` on an allowed request was decided as
    // that request and, once the server (hypercorn) answered 101, the
    // connection was tunnelled: the client then spoke HTTP/2 to the server
    // and its next requests (`/blocked/x` here) were never decided (the
    // "h2c smuggling" of reverse proxies). Now only WebSocket upgrades pass;
    // an h2c one is taken off the request, which is answered as HTTP/1.1.
    let (mut m, _policy) = l7_pair("l7-h2c-up");
    start_asgi(&mut m);
    let client = format!(
        r#"
import base64, json, socket
import h2.config, h2.connection, h2.events
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
settings = base64.urlsafe_b64encode(c.initiate_upgrade_connection()).rstrip(b"=").decode()
s = socket.create_connection(("{b}", 8004), timeout=10)
s.sendall(("GET /items/1 HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           "Upgrade: h2c\r\nHTTP2-Settings: %s\r\n\r\n" % settings).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    d = s.recv(65536)
    if not d:
        break
    buf += d
head, rest = buf.split(b"\r\n\r\n", 1)
status = int(head.split(b" ", 2)[1])
print(json.dumps({{"status": status}}), flush=True)
if status == 101:
    # The tunnel: HTTP/2 to the server, past the agent.
    c.send_headers(3, [(":method", "GET"), (":authority", "api"), (":scheme", "http"),
                       (":path", "/blocked/x")], end_stream=True)
    s.sendall(c.data_to_send())
    got, events = None, c.receive_data(rest)
    while got is None:
        for e in events:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3:
                got = int(dict(e.headers)[b":status"])
        if got is None:
            d = s.recv(65536)
            if not d:
                break
            events = c.receive_data(d)
    print(json.dumps({{"status": got, "smuggled": True}}), flush=True)
else:
    print(json.dumps({{"status": status, "smuggled": False}}), flush=True)
"#,
        b = m.b.ipv4
    );
    let r = support_client(&m, &client, 2);
    assert_eq!(
        r[0]["status"], 200,
        "answered as HTTP/1.1, not upgraded: {r:?}"
    );
    assert_eq!(r[1]["smuggled"], false, "{r:?}");
    enforcer_tests::settle_logs();
    let log = m.tb.server_log(&m.b, "asgi");
    assert!(log.contains("REQ 1.1 GET /items/1"), "{log}");
    assert!(!log.contains("/blocked"), "{log}");
}

#[test]
fn a_list_call_whose_id_the_server_rewrites_is_still_filtered() {
    // The failure: list answers sent as JSON were matched to their calls by
    // the id's JSON text. The TypeScript SDK's server (most MCP servers
    // are built with it) reads an id of `1.0` or `2e0` as the number 1 or 2
    // and answers with that: the answer matched no list call, and the
    // support agent was shown delete_doc, which its policy hides. Now any
    // answer to a POST that carried a list call is filtered by its shape.
    // Then the official Python client against that server, both eras.
    let (mut m, _policy) = l7_pair("l7-mcp-ids");
    let server = format!("{}/node/mcp_server.mjs", env!("CARGO_MANIFEST_DIR"));
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-ts",
        &["node", &server, "8003", "json"],
        8003,
    )
    .expect("the TypeScript SDK's MCP server (node; `cargo xtask setup` installs tests/node)");
    // The bodies as sent (the ids' text matters).
    let client = format!(
        r#"
import http.client, json
call = '{{"jsonrpc": "2.0", "id": %s, "method": "tools/list"}}'
for body in [call % "1", call % "1.0", call % "2e0", "[%s]" % (call % "1.0")]:
    c = http.client.HTTPConnection("{b}", 8003, timeout=10)
    c.request("POST", "/mcp", body=body.encode(),
              headers={{"content-type": "application/json", "accept": "application/json, text/event-stream"}})
    r = c.getresponse()
    text = r.read().decode()
    try:
        v = json.loads(text)
        tools = [sorted(t["name"] for t in a["result"]["tools"]) for a in (v if isinstance(v, list) else [v])]
    except Exception as e:
        tools = repr(e)
    print(json.dumps({{"sent": body, "status": r.status, "tools": tools, "body": text[:300]}}), flush=True)
"#,
        b = m.b.ipv4
    );
    let r = support_client(&m, &client, 4);
    for x in &r {
        assert_eq!(x["status"], 200, "{x}");
        assert_eq!(
            x["tools"],
            serde_json::json!([["search_docs"]]),
            "the list must be filtered: {x}"
        );
    }
    // The official Python client against the TypeScript server (SSE
    // answers): the list filtered, calls decided by tool and arguments.
    m.tb.start_server_in(
        &m.b,
        Some("mcp.service"),
        "mcp-ts-sse",
        &["node", &server, "8001"],
        8001,
    )
    .expect("the TypeScript SDK's MCP server (SSE answers)");
    let url = format!("http://{}:8001/mcp", m.b.ipv4);
    for mode in ["auto", "legacy"] {
        let v = mcp_call(
            &m.a,
            "support-agent.service",
            mode,
            &url,
            &[
                r#"search_docs={"query": "reset password"}"#.into(),
                r#"search_docs={"query": "salaries", "collection": "hr"}"#.into(),
                r#"delete_doc={"doc_id": "d1"}"#.into(),
            ],
        );
        assert_eq!(
            v["tools"],
            serde_json::json!(["search_docs"]),
            "{mode}: {v}"
        );
        let ok: Vec<&Value> = v["calls"]
            .as_array()
            .map(|c| c.iter().map(|c| &c["ok"]).collect())
            .unwrap_or_default();
        assert_eq!(ok, [true, false, false], "{mode}: {v}");
        assert!(
            v["calls"][2]["text"]
                .as_str()
                .is_some_and(|t| t.contains("this agent may not use that tool")),
            "{mode}: {v}"
        );
    }
    enforcer_tests::settle_logs();
    let log = m.tb.server_log(&m.b, "mcp-ts-sse");
    assert_eq!(log.matches("CALL search_docs").count(), 2, "{log}");
    assert!(
        !log.contains("CALL delete_doc") && !log.contains("\"hr\""),
        "{log}"
    );
}

/// The client of `a_reused_server_connection_that_closes_unanswered_*`:
/// one keep-alive connection to b:8005, seven requests (a second's pause
/// before the last); a JSON line each.
const PY_SEVEN_REQUESTS: &str = r#"
import http.client, json, sys, time
c = http.client.HTTPConnection(sys.argv[1], 8005, timeout=10)
for method, path, body, pause in [("GET", "/one", None, 0), ("GET", "/two", None, 0),
                                  ("POST", "/orders", b"{}", 0), ("GET", "/three", None, 0),
                                  ("GET", "/four", None, 0), ("GET", "/five", None, 0),
                                  ("POST", "/orders", b"{}", 1)]:
    time.sleep(pause)
    headers = {"content-type": "application/json"} if body else {}
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        print(json.dumps({"path": path, "status": r.status, "body": r.read().decode()}), flush=True)
    except Exception as e:
        print(json.dumps({"path": path, "error": repr(e)}), flush=True)
"#;

#[test]
fn a_reused_server_connection_that_closes_unanswered_is_retried_only_when_safe() {
    // The failure: a server's keep-alive timeout fires as the next request
    // arrives (uvicorn closes idle connections after 5 s), so the reused
    // connection is reset with the request unread. The client's own
    // connection, through enforcer, is still open: the request got a 502
    // where a direct client would have retried it on a new connection.
    // A request that cannot have been processed twice (GET) is now sent
    // again on a new connection; a POST is not (RFC 9110 §9.2.2) and still
    // gets the 502, once.
    let (mut m, _policy) = l7_pair("l7-kaerace");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "race",
        &["python3", "-u", &helper("keepalive_race.py"), "8005"],
        8005,
    )
    .expect("keep-alive race server");
    let b = m.b.ipv4.to_string();
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", PY_SEVEN_REQUESTS, &b],
        )
        .expect("client");
    let r = json_lines(&out);
    let log = m.tb.server_log(&m.b, "race");
    assert_eq!(
        r.len(),
        7,
        "{r:?} {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r[0]["status"], 200, "{r:?}");
    assert_eq!(r[0]["body"], "conn 1 GET /one", "{r:?}");
    assert_eq!(
        r[1]["status"], 200,
        "a GET whose reused connection closed unanswered is sent again: {r:?}\n{log}"
    );
    assert_eq!(r[1]["body"], "conn 2 GET /two", "{r:?}");
    assert_eq!(
        r[2]["status"], 502,
        "a POST is never sent twice: {r:?}\n{log}"
    );
    assert!(
        r[2]["body"]
            .as_str()
            .is_some_and(|b| b.contains("reset by peer") && b.contains("not sent again")),
        "the 502 says what happened: {r:?}"
    );
    assert_eq!(
        r[3]["status"], 200,
        "the client's connection serves on: {r:?}"
    );
    assert_eq!(r[3]["body"], "conn 3 GET /three", "{r:?}");
    // A server that answers, but not in HTTP, is not asked again.
    assert_eq!(r[4]["status"], 502, "{r:?}");
    // A connection the server closed while idle (its timer, nothing in
    // flight) is replaced before the next request: a POST goes through.
    assert_eq!(r[5]["body"], "conn 4 GET /five", "{r:?}");
    assert_eq!(
        (r[6]["status"].as_u64(), r[6]["body"].as_str()),
        (Some(200), Some("conn 5 POST /orders")),
        "{r:?}\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with("READY")).collect();
    assert_eq!(
        lines,
        [
            "ANSWER 1 GET /one",
            "DROP 1 GET /two",
            "ANSWER 2 GET /two",
            "DROP 2 POST /orders",
            "ANSWER 3 GET /three",
            "GARBAGE 3 GET /four",
            "ANSWER 4 GET /five",
            "IDLE-CLOSE 4",
            "ANSWER 5 POST /orders",
        ],
        "what the server saw: the POST once, never answered; the GET answered in garbage once"
    );
    // Counted: the GET once (the POST was not sent again).
    let metrics = m.eb.metrics().expect("metrics");
    let retried = |why| {
        sum_metric(
            &metrics,
            "enforcer_l7_upstream_retries_total",
            &[("destination", "spiffe://ai.example.org/api"), ("why", why)],
        )
    };
    assert_eq!(
        (retried("closed"), retried("unprocessed")),
        (1.0, 0.0),
        "{metrics}"
    );
    // The connection closed idle, unannounced, is counted as such (the
    // sign of a server timeout below l7.server_idle_ms).
    assert_replaced(&m, 0.0, 1.0);
    // b's agent says why the GET was sent again.
    wait_for("b's agent to log the retry", || {
        m.eb.log_lines().iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|s| s.contains("sent again on a new connection"))
        })
    });
}

#[test]
fn an_http2_server_going_away_has_its_unprocessed_requests_sent_again() {
    // The same race over h2c: the server's GOAWAY (its idle timeout, a
    // graceful restart) says the second request, above its last stream
    // id, was not processed; enforcer's kept HTTP/2 connection to it
    // failed that request with a 502.
    let (mut m, _policy) = l7_pair("l7-h2away");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "goaway",
        &["python3", "-u", &helper("h2_goaway.py"), "8005"],
        8005,
    )
    .expect("h2c server");
    let b = m.b.ipv4.to_string();
    // httpx over h2c (prior knowledge), one connection; directly against
    // this server it gets both answers, itself sending /two again.
    let script = r#"
import httpx, json, sys
with httpx.Client(http1=False, http2=True, timeout=10) as c:
    for method, p in [("GET", "/one"), ("GET", "/two"), ("POST", "/orders")]:
        try:
            r = c.request(method, "http://%s:8005%s" % (sys.argv[1], p),
                          json={} if method == "POST" else None)
            print(json.dumps({"status": r.status_code, "body": r.text, "version": r.http_version}))
        except Exception as e:
            print(json.dumps({"error": repr(e)}))
"#;
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", script, &b],
        )
        .expect("httpx client");
    let r = json_lines(&out);
    let log = m.tb.server_log(&m.b, "goaway");
    assert_eq!(
        r.len(),
        3,
        "{r:?} {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r[0]["body"], "conn 1 GET /one", "{r:?}");
    assert_eq!(r[0]["version"], "HTTP/2", "{r:?}");
    assert_eq!(
        (r[1]["status"].as_u64(), r[1]["body"].as_str()),
        (Some(200), Some("conn 2 GET /two")),
        "the GET the server went away on is sent again on a new connection: {r:?}\nserver: {log}"
    );
    // A POST too: the GOAWAY says the server did not process it.
    assert_eq!(
        (r[2]["status"].as_u64(), r[2]["body"].as_str()),
        (Some(200), Some("conn 3 POST /orders")),
        "{r:?}\nserver: {log}"
    );
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "ANSWER 1 GET /one",
            "GOAWAY 1 GET /two",
            "ANSWER 2 GET /two",
            "GOAWAY 2 POST /orders",
            "ANSWER 3 POST /orders",
        ],
        "what the server saw"
    );
    let metrics = m.eb.metrics().expect("metrics");
    assert_eq!(
        sum_metric(
            &metrics,
            "enforcer_l7_upstream_retries_total",
            &[("why", "unprocessed")]
        ),
        2.0,
        "the GET and the POST, counted: {metrics}"
    );
}

#[test]
fn a_server_connection_closed_before_the_first_request_is_not_used() {
    // The failure: the connection b's agent opens to the server when the
    // client connects waits, unused, for the client's first request; a
    // server that closes connections that send nothing (a header or idle
    // timeout) had closed it. The session found it closed, dialed a new
    // one, and then gave up before sending on it (two tries, both spent on
    // connecting): the POST was answered 502 "the server closed every
    // connection before answering", and never reached the server.
    let (mut m, _policy) = l7_pair("l7-freshclose");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "fresh",
        &[
            "python3",
            "-u",
            &helper("keepalive_race.py"),
            "8005",
            "fresh-close",
        ],
        8005,
    )
    .expect("server");
    let b = m.b.ipv4.to_string();
    // Connects, waits for the server to have closed the connection b's
    // agent opened, then POSTs.
    let script = r#"
import http.client, json, sys, time
c = http.client.HTTPConnection(sys.argv[1], 8005, timeout=10)
c.connect()
deadline = time.time() + 10
while "FRESH-CLOSE 1" not in open(sys.argv[2]).read() and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.2)
c.request("POST", "/orders", body=b"{}", headers={"content-type": "application/json"})
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}), flush=True)
"#;
    let log_path = m.tb.dir.join("b-fresh.log").display().to_string();
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", script, &b, &log_path],
        )
        .expect("client");
    let r = json_lines(&out);
    let log = m.tb.server_log(&m.b, "fresh");
    assert_eq!(
        r.len(),
        1,
        "{r:?} {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        (r[0]["status"].as_u64(), r[0]["body"].as_str()),
        (Some(200), Some("conn 2 POST /orders")),
        "the POST goes to a connection the server has not closed: {r:?}\n{log}"
    );
}

/// Starts `keepalive_race.py` in `mode` on b's 8005 (server log `mode`),
/// then POSTs `/orders` on one client connection from a, waiting each of
/// `pauses` (seconds) before a request: each answer's status, body and
/// `Keep-Alive` header as the client got it, and the server's log.
fn posts_after_pauses(m: &mut Pair, mode: &str, pauses: &[f64]) -> (Vec<Value>, String) {
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        mode,
        &["python3", "-u", &helper("keepalive_race.py"), "8005", mode],
        8005,
    )
    .expect("server");
    let script = r#"
import http.client, json, sys, time
c = http.client.HTTPConnection(sys.argv[1], 8005, timeout=10)
for pause in json.loads(sys.argv[2]):
    time.sleep(pause)
    c.request("POST", "/orders", body=b"{}", headers={"content-type": "application/json"})
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(),
                      "keep_alive": r.getheader("keep-alive")}), flush=True)
"#;
    let n = pauses.len();
    let pauses = serde_json::to_string(pauses).expect("json");
    let (_, out) =
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", script, &m.b.ipv4.to_string(), &pauses],
        )
        .expect("client");
    let r = json_lines(&out);
    let log = m.tb.server_log(&m.b, mode);
    assert_eq!(
        r.len(),
        n,
        "{r:?} {}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    (r, log)
}

#[test]
fn a_kept_connection_is_not_used_past_the_servers_keep_alive_hint() {
    // A server that says `Keep-Alive: timeout=2` (Node.js's does, with 5)
    // closes the connection 2 s after an answer; a POST sent as it does
    // would get a 502 (see the race test above), so the session stops
    // using the connection before then (after 1 s) and dials. This server
    // never closes a connection itself: which one answered shows whether
    // the session kept it. Two requests at once, then one well past the
    // hint's margin and within its timeout.
    let (mut m, _policy) = l7_pair("l7-kahint");
    let (r, log) = posts_after_pauses(&mut m, "hint", &[0.0, 0.0, 1.6]);
    let bodies: Vec<&str> = r.iter().filter_map(|v| v["body"].as_str()).collect();
    assert_eq!(
        bodies,
        [
            "conn 1 POST /orders",
            "conn 1 POST /orders",
            "conn 2 POST /orders"
        ],
        "kept while the hint allows, then a new connection: {r:?}\n{log}"
    );
    assert!(
        r.iter().all(|v| v["keep_alive"].is_null()),
        "the hint is hop-by-hop, not passed to the client: {r:?}"
    );
    assert_replaced(&m, 1.0, 0.0);
}

#[test]
fn a_kept_connection_is_not_used_past_server_idle_ms() {
    // uvicorn (which runs the Python MCP SDK's servers) closes a kept
    // connection 5 s after its last answer and sends no `Keep-Alive` hint;
    // a POST that arrives as it does is reset unanswered, and may not be
    // sent again (RFC 9110 §9.2.2): the client would get a 502. This
    // server makes that moment certain (it drops a request that comes 5 s
    // or more after its last answer, unread); the session stops using a
    // connection `l7.server_idle_ms` (4 s by default) after its last
    // answer and dials instead.
    let (mut m, _policy) = l7_pair("l7-idle");
    let (r, log) = posts_after_pauses(&mut m, "idle", &[0.0, 0.0, 5.5]);
    assert_eq!(
        r.iter()
            .map(|v| (v["status"].as_u64(), v["body"].as_str()))
            .collect::<Vec<_>>(),
        [
            (Some(200), Some("conn 1 POST /orders")),
            (Some(200), Some("conn 1 POST /orders")),
            (Some(200), Some("conn 2 POST /orders")),
        ],
        "kept for two requests in a row, a new connection after 5.5 s idle: {r:?}\n{log}"
    );
    assert!(
        !log.contains("DROP"),
        "no request crossed the server's idle close: {log}"
    );
    assert_replaced(&m, 1.0, 0.0);
}

#[test]
fn a_server_connection_closed_as_announced_is_not_counted_as_an_unannounced_close() {
    // A server that answers with `Connection: close` and closes: the
    // client's own connection serves on (the header is hop-by-hop), the
    // session dials for each request, and counts those connections
    // retired, not closed, so `closed` stays the sign of a server timeout
    // below l7.server_idle_ms.
    let (mut m, _policy) = l7_pair("l7-close");
    let (r, log) = posts_after_pauses(&mut m, "close", &[0.0, 0.0, 0.0]);
    let bodies: Vec<&str> = r.iter().filter_map(|v| v["body"].as_str()).collect();
    assert_eq!(
        bodies,
        [
            "conn 1 POST /orders",
            "conn 2 POST /orders",
            "conn 3 POST /orders"
        ],
        "{r:?}\n{log}"
    );
    assert_replaced(&m, 2.0, 0.0);
}

#[test]
fn a_client_that_leaves_before_its_answer_ends_its_request_at_the_server() {
    // A caller that gives up (closes, or shuts its sending side, as nc -N
    // does) while the server works on its request: the server sees its
    // connection end then, as nginx and Envoy pass it on, so a model stops
    // generating for a caller that left — not after it has answered. A
    // guard of docs/policy.md's "taken as gone".
    let (mut m, _policy) = l7_pair("l7-leave");
    m.tb.start_server_in(
        &m.b,
        Some("api.service"),
        "slow",
        &["python3", "-u", &helper("slow_answer.py"), "8005"],
        8005,
    )
    .expect("server");
    let b = m.b.ipv4.to_string();
    for (n, how) in [(1, "close"), (2, "shutdown")] {
        let script = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8005))
s.sendall(b"GET /slow HTTP/1.1\r\nHost: b\r\n\r\n")
time.sleep(0.5)
if sys.argv[2] == "close":
    s.close()
else:
    s.shutdown(socket.SHUT_WR)
    print(repr(s.recv(65536)))
"#;
        m.a.exec(
            Some("support-agent.service"),
            &["python3", "-c", script, &b, how],
        )
        .expect("client");
        let gone = format!("CLIENT-GONE EOF {n}");
        let answered = format!("ANSWERED {n}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let log = loop {
            let log = m.tb.server_log(&m.b, "slow");
            if log.contains(&gone)
                || log.contains(&answered)
                || std::time::Instant::now() > deadline
            {
                break log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            log.contains(&gone) && !log.contains(&answered),
            "{how}: the server should see the connection end before its answer: {log}"
        );
    }
}
