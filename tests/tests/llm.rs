//! LLM governance end to end (DESIGN §1.7, `protocol = "llm"`): two real
//! agents; on b an OpenAI-compatible API (the protocol-level stand-in
//! `tests/scenario/llm_server.py` — no model server can be installed here)
//! declared `llm`; on a the support, admin and batch agents calling it with
//! the official `openai` client. b's agent decides each request by model and
//! endpoint, counts the tokens, and holds the batch agent to its budget.
use std::{fs, path::PathBuf};

use enforcer_tests::{
    Declared, Enforcer, Node, Testbed, declared_pair, json_lines, sum_metric, wait_for,
};
use serde_json::{Value, json};

const TD: &str = "ai.example.org";
const SUPPORT: &str = "spiffe://ai.example.org/agent/support";
const ADMIN: &str = "spiffe://ai.example.org/agent/admin";
const BATCH: &str = "spiffe://ai.example.org/agent/batch";
const LLM_ID: &str = "spiffe://ai.example.org/llm";
const PORT: u16 = 8010;
/// The batch agent's budget: tokens per hour.
const BUDGET: u64 = 60;

const POLICY: &str = r#"package enforcer.authz

import rego.v1

support := "spiffe://ai.example.org/agent/support"
admin := "spiffe://ai.example.org/agent/admin"
batch := "spiffe://ai.example.org/agent/batch"

default allow := false

allow if {
	not input.attributes
	input.source.spiffe_id in {support, admin, batch}
}

models := {
	support: {"gpt-4o-mini"},
	admin: {"gpt-4o-mini", "gpt-4o", "text-embedding-3-small"},
	batch: {"gpt-4o-mini"},
}

inference := {"chat.completions", "completions", "responses", "embeddings"}

allow if {
	input.llm.endpoint in inference
	input.llm.model in models[input.attributes.source.principal]
	object.get(input.llm, "max_tokens", 0) <= 256
}

allow if input.llm.endpoint == "models"

allow if {
	input.llm.endpoint in {"fine_tuning", "files"}
	input.attributes.source.principal == admin
}

reason := "this agent may not use that model" if {
	input.llm.endpoint in inference
	not input.llm.model in models[input.attributes.source.principal]
} else := "max_tokens above 256" if {
	input.llm.endpoint in inference
	input.llm.max_tokens > 256
} else := "only the admin agent may fine-tune" if {
	input.llm.endpoint in {"fine_tuning", "files"}
}
"#;

fn helper(name: &str) -> String {
    format!("{}/helpers/{name}", env!("CARGO_MANIFEST_DIR"))
}

struct Setup {
    tb: Testbed,
    a: Node,
    b: Node,
    eb: Enforcer,
    b_config: PathBuf,
}

fn setup() -> Setup {
    setup_with(&[])
}

/// `setup`, the stand-in started with `server_args` too.
fn setup_with(server_args: &[&str]) -> Setup {
    let (mut tb, a, b) = Testbed::linked_pair("llm").expect("two nodes");
    let dir = tb.dir.join("llm-policy");
    fs::create_dir_all(&dir).expect("policy dir");
    fs::write(dir.join("policy.rego"), POLICY).expect("policy");
    let data =
        json!({"enforcer": {"llm": {"budgets": {BATCH: {"tokens": BUDGET, "window_secs": 3600}}}}});
    fs::write(dir.join("data.json"), data.to_string()).expect("data");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let server = format!("{}/scenario/llm_server.py", env!("CARGO_MANIFEST_DIR"));
    let port = PORT.to_string();
    let mut cmd = vec![
        "python3",
        "-u",
        &server,
        &port,
        "--chunk-ms",
        "5",
        // The stream ends 300 ms after its [DONE]: a client that stops
        // reading at [DONE] leaves before the agent sees the end.
        "--linger-ms",
        "300",
    ];
    cmd.extend_from_slice(server_args);
    tb.start_server_in(&b, Some("llm-api.service"), "llm", &cmd, PORT)
        .expect("the LLM stand-in");
    let declared = Declared {
        ca: &ca,
        policy: &dir,
        server: (LLM_ID, "llm-api.service"),
        port: PORT,
        protocol: "llm",
        clients: &[
            (SUPPORT, "support-agent.service"),
            (ADMIN, "admin-agent.service"),
            (BATCH, "batch-agent.service"),
        ],
    };
    let (eb, b_config) = declared_pair(&mut tb, &a, &b, &declared).expect("the agents");
    Setup {
        tb,
        a,
        b,
        eb,
        b_config,
    }
}

/// The agent `unit` on a makes `calls` with the official client; one result
/// per call.
fn calls(s: &Setup, unit: &str, calls: &[Value]) -> Vec<Value> {
    let url = format!("http://{}:{PORT}/v1", s.b.ipv4);
    s.a.calls(unit, &["python3".into(), helper("llm_call.py"), url], calls)
}

fn call(s: &Setup, unit: &str, c: Value) -> Value {
    calls(s, unit, &[c]).remove(0)
}

/// The JSON lines the stand-in logged (one per request it received).
fn server_log(s: &Setup) -> Vec<Value> {
    json_lines(&s.tb.server_log(&s.b, "llm"))
}

fn usage_lines(s: &Setup) -> Vec<Value> {
    s.tb.audit(&s.b)
        .into_iter()
        .filter(|v| v["type"] == "llm_usage")
        .collect()
}

/// Waits for the first usage line that `matches` (`what` names it) and
/// returns it.
fn usage_line(s: &Setup, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, || usage_lines(s).iter().any(&matches));
    usage_lines(s)
        .into_iter()
        .find(|u| matches(u))
        .unwrap_or_else(|| panic!("{what}: gone"))
}

/// Waits until `source` has `n` usage lines counted from the server's
/// `usage` (`what` names them); all of `source`'s usage lines.
fn counted_usage(s: &Setup, source: &str, n: usize, what: &str) -> Vec<Value> {
    wait_for(what, || {
        usage_lines(s)
            .iter()
            .filter(|u| u["source"] == source && u["counted_by"] == "usage")
            .count()
            == n
    });
    usage_lines(s)
        .into_iter()
        .filter(|u| u["source"] == source)
        .collect()
}

fn tokens_metric(s: &Setup, source: &str, model: &str, kind: &str) -> f64 {
    sum_metric(
        &s.eb.metrics().expect("metrics"),
        "enforcer_llm_tokens_total",
        &[("source", source), ("model", model), ("kind", kind)],
    )
}

#[test]
fn llm_requests_are_decided_by_model_metered_and_held_to_budgets() {
    let mut s = setup();

    // Allowed: plain, streamed (with and without the usage chunk), the
    // Responses API streamed, and the model list.
    let ok = calls(
        &s,
        "support-agent.service",
        &[
            json!({"op": "chat", "prompt": "count to 5"}),
            json!({"op": "chat", "prompt": "count to 7", "stream": true}),
            json!({"op": "chat", "prompt": "count to 3", "stream": true, "include_usage": true}),
            json!({"op": "responses", "prompt": "count to 4", "stream": true}),
            json!({"op": "completions", "prompt": "count to 2"}),
            json!({"op": "models"}),
        ],
    );
    for r in &ok {
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(ok[0]["text"], "1 2 3 4 5");
    assert_eq!(ok[0]["usage"]["completion_tokens"], 5);
    // The stream the client did not ask usage of reaches it unchanged: no
    // usage chunk, no `usage` member in any chunk — though the server was
    // asked for it on the client's behalf.
    assert_eq!(ok[1]["text"], "1 2 3 4 5 6 7");
    assert_eq!(ok[1]["chunks_with_usage_key"], 0, "{}", ok[1]);
    assert!(ok[1].get("usage").is_none(), "{}", ok[1]);
    let log = server_log(&s);
    let seven = log
        .iter()
        .find(|l| l["request"] == "chat" && l["completion_tokens"] == 7)
        .expect("the server got the 7-word stream");
    assert_eq!(seven["include_usage"], true, "{seven}");
    // The client that asked for usage gets it.
    assert_eq!(ok[2]["usage"]["completion_tokens"], 3, "{}", ok[2]);
    assert_eq!(ok[3]["usage"]["output_tokens"], 4, "{}", ok[3]);
    assert!(
        ok[5]["models"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("gpt-4o"))),
        "{}",
        ok[5]
    );

    // Denied with the policy's reason, in OpenAI's error shape: a model the
    // support agent may not use, too many max_tokens, fine-tuning.
    let denied = calls(
        &s,
        "support-agent.service",
        &[
            json!({"op": "chat", "model": "gpt-4o", "prompt": "count to 2"}),
            json!({"op": "chat", "prompt": "count to 2", "max_tokens": 1000}),
            json!({"op": "fine_tune"}),
        ],
    );
    for (r, reason) in denied.iter().zip([
        "this agent may not use that model",
        "max_tokens above 256",
        "only the admin agent may fine-tune",
    ]) {
        assert_eq!(r["error"], "PermissionDeniedError", "{r}");
        assert_eq!(r["status"], 403, "{r}");
        assert!(
            r["message"].as_str().is_some_and(|m| m.contains(reason)),
            "{r}"
        );
        assert_eq!(r["body"]["code"], "policy_denied", "{r}");
    }
    // The admin agent may use gpt-4o, embeddings and fine-tuning.
    let admin = calls(
        &s,
        "admin-agent.service",
        &[
            json!({"op": "chat", "model": "gpt-4o", "prompt": "count to 2"}),
            json!({"op": "embeddings", "model": "text-embedding-3-small", "prompt": "a b c"}),
            json!({"op": "fine_tune"}),
        ],
    );
    for r in &admin {
        assert_eq!(r["ok"], true, "{r}");
    }
    // None of the denied requests reached the server: its only gpt-4o
    // request is the admin's, its only fine-tuning job the admin's.
    let log = server_log(&s);
    assert_eq!(
        log.iter().filter(|l| l["model"] == "gpt-4o").count(),
        1,
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|l| l["request"] == "fine_tuning").count(),
        1
    );
    assert!(!log.iter().any(|l| l["completion_tokens"] == 1000));

    // Every token counted: the support agent's gpt-4o-mini tokens in the
    // metrics equal what the server reported, once every answer's usage
    // line is written (one per metered request: 5 for support, 2 for admin).
    wait_for("the usage lines", || usage_lines(&s).len() >= 7);
    let (prompt, completion) = log
        .iter()
        .filter(|l| l["model"] == "gpt-4o-mini" && l.get("prompt_tokens").is_some())
        .fold((0, 0), |(p, c), l| {
            (
                p + l["prompt_tokens"].as_u64().unwrap_or(0),
                c + l["completion_tokens"].as_u64().unwrap_or(0),
            )
        });
    assert_eq!(
        tokens_metric(&s, SUPPORT, "gpt-4o-mini", "prompt"),
        prompt as f64
    );
    assert_eq!(
        tokens_metric(&s, SUPPORT, "gpt-4o-mini", "completion"),
        completion as f64
    );
    assert_eq!(
        tokens_metric(&s, ADMIN, "text-embedding-3-small", "prompt"),
        3.0
    );
    let usage = usage_lines(&s);
    let streamed = usage
        .iter()
        .find(|u| u["completion_tokens"] == 7)
        .expect("the 7-word stream's usage line");
    assert_eq!(streamed["source"], SUPPORT);
    assert_eq!(streamed["counted_by"], "usage");
    assert_eq!(streamed["outcome"], "answered");
    // It follows the request's decision line, which it names.
    let lines = s.tb.audit(&s.b);
    let at = |usage: bool| {
        lines
            .iter()
            .position(|l| {
                l["decision_id"] == streamed["decision_id"] && (l["type"] == "llm_usage") == usage
            })
            .expect("the line")
    };
    assert!(at(false) < at(true));
    assert_eq!(lines[at(false)]["input"]["llm"]["stream"], true);
    assert_eq!(lines[at(false)]["input"]["llm"]["model"], "gpt-4o-mini");

    // Budgets: the batch agent (60 tokens an hour) streams a long answer;
    // the stream is cut with an error event when the running count passes
    // the budget, and the model's connection closed.
    let cut = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 200", "stream": true}),
    );
    assert_eq!(cut["ok"], false, "{cut}");
    assert_eq!(cut["error"], "APIError", "{cut}");
    assert!(
        cut["message"]
            .as_str()
            .is_some_and(|m| m.contains("budget exhausted")),
        "{cut}"
    );
    let got = cut["text"]
        .as_str()
        .unwrap_or("")
        .split_whitespace()
        .count() as u64;
    assert!(got > 0 && got <= BUDGET, "{got} numbers got through: {cut}");
    wait_for("the server to see its stream aborted", || {
        server_log(&s)
            .iter()
            .any(|l| l.get("stream_aborted").is_some())
    });
    assert!(
        !server_log(&s)
            .iter()
            .any(|l| l["stream_end"].is_string() && l["chunks"] == 200)
    );
    wait_for("the cut stream's usage line", || {
        usage_lines(&s)
            .iter()
            .any(|u| u["outcome"] == "cut_over_budget")
    });
    assert_eq!(
        s.eb.metric("enforcer_llm_streams_cut_total", &[("source", BATCH)])
            .expect("metric"),
        1.0
    );

    // Spent: the next request is refused 429 with Retry-After, and never
    // reaches the server.
    let before = server_log(&s).len();
    let spent = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 2"}),
    );
    assert_eq!(spent["error"], "RateLimitError", "{spent}");
    assert_eq!(spent["status"], 429);
    assert!(
        spent["retry_after"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|r| (1..=3600).contains(&r)),
        "{spent}"
    );
    assert!(
        spent["message"]
            .as_str()
            .is_some_and(|m| m.contains("token budget spent")),
        "{spent}"
    );
    // The support agent has no budget and goes on.
    assert_eq!(
        call(&s, "support-agent.service", json!({"op": "chat"}))["ok"],
        true
    );
    assert_eq!(server_log(&s).len(), before + 1);

    // The counters survive a restart of b's agent, and the admin endpoint
    // shows them.
    wait_for("the counters on disk", || {
        fs::read_to_string(s.tb.dir.join("b-state/llm-usage.json")).is_ok_and(|t| t.contains(BATCH))
    });
    s.tb.stop(s.eb.pid).expect("stop b's agent");
    s.eb =
        s.tb.start_enforcer(&s.b, &s.b_config)
            .expect("b's agent again");
    let (status, body) =
        s.b.http_get(s.eb.metrics_addr, "/llm/usage")
            .expect("admin");
    assert_eq!(status, 200, "{body}");
    let usage: Value = serde_json::from_str(&body).expect("JSON");
    let batch_used: u64 = usage["sources"][BATCH]["models"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|c| c["prompt"].as_u64().unwrap_or(0) + c["completion"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    assert!(batch_used > BUDGET, "{usage}");
    assert_eq!(usage["budgets"][BATCH]["tokens"], BUDGET, "{usage}");
    let again = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 2"}),
    );
    assert_eq!(again["error"], "RateLimitError", "{again}");
}

/// The tokens of every answer, whichever agent metered it, in the usage
/// lines of b's audit log: `source` → prompt + completion.
fn audited_tokens(s: &Setup, source: &str) -> u64 {
    usage_lines(s)
        .iter()
        .filter(|u| u["source"] == source)
        .map(|u| {
            u["prompt_tokens"].as_u64().unwrap_or(0) + u["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// What an agent's `/llm/usage` says `source` used in its window.
fn admin_tokens(s: &Setup, agent: &Enforcer, source: &str) -> u64 {
    let (status, body) =
        s.b.http_get(agent.metrics_addr, "/llm/usage")
            .expect("admin");
    assert_eq!(status, 200, "{body}");
    let usage: Value = serde_json::from_str(&body).expect("JSON");
    usage["sources"][source]["models"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|c| c["prompt"].as_u64().unwrap_or(0) + c["completion"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// The attack on budgets through an upgrade: an answer streaming while b's
/// agent is upgraded is metered by the old agent as it drains, after the
/// new agent read the counters. Those tokens must reach the new agent's
/// counters (and the file), or a caller's spend during every upgrade is
/// forgotten and its budget stretched.
#[test]
fn tokens_metered_by_a_draining_agent_reach_its_successor() {
    let mut s = setup();
    let before = call(
        &s,
        "support-agent.service",
        json!({"op": "chat", "prompt": "count to 5"}),
    );
    assert_eq!(before["ok"], true, "{before}");
    // A long stream (1 500 words, 5 ms apart), started before the upgrade.
    let url = format!("http://{}:{PORT}/v1", s.b.ipv4);
    let stream = json!({"op": "chat", "prompt": "count to 1500", "stream": true}).to_string();
    s.tb.spawn(
        &s.a,
        Some("support-agent.service"),
        "long-stream",
        &["python3", "-u", &helper("llm_call.py"), &url, &stream],
    )
    .expect("the streaming client");
    wait_for("the stream's decision", || {
        s.tb.audit(&s.b)
            .iter()
            .any(|l| l["input"]["llm"]["stream"] == true)
    });
    let new =
        s.tb.upgrade_enforcer(&s.eb, &s.b_config)
            .expect("upgrade b");
    assert!(
        !s.tb.server_log(&s.b, "llm").contains("stream_end"),
        "the upgrade is done while the answer streams"
    );
    wait_for("the stream to end", || {
        s.tb.server_log(&s.a, "long-stream").contains("\"ok\"")
    });
    let streamed: Value = serde_json::from_str(
        s.tb.server_log(&s.a, "long-stream")
            .lines()
            .next()
            .unwrap_or("{}"),
    )
    .expect("the client's line");
    assert_eq!(streamed["ok"], true, "{streamed}");
    let after = call(
        &s,
        "support-agent.service",
        json!({"op": "chat", "prompt": "count to 5"}),
    );
    assert_eq!(after["ok"], true, "{after}");
    // The old agent drains and exits; every answer's tokens are then in
    // the new agent's counters.
    let old = s.eb.pid;
    let status = s.tb.wait_exit(old, std::time::Duration::from_secs(30));
    assert!(
        status.is_some_and(|st| st.success()),
        "the old agent drains and exits: {status:?}"
    );
    wait_for("three usage lines", || usage_lines(&s).len() >= 3);
    let audited = audited_tokens(&s, SUPPORT);
    assert!(audited > 1500, "the stream's tokens are audited: {audited}");
    let mut counted = 0;
    for _ in 0..50 {
        counted = admin_tokens(&s, &new, SUPPORT);
        if counted == audited {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        counted, audited,
        "the new agent counts every token the audit log shows, the drained stream's included"
    );
    // And so does the file a later restart reads.
    s.tb.stop(new.pid).expect("stop b's agent");
    s.eb =
        s.tb.start_enforcer(&s.b, &s.b_config)
            .expect("b's agent again");
    assert_eq!(admin_tokens(&s, &s.eb, SUPPORT), audited);
}

/// A client that stops reading at `[DONE]` and closes — before the server
/// ends the stream (it lingers 300 ms here) — had the whole answer: its
/// usage line says `answered`, not `broken`, with the server's usage.
#[test]
fn a_client_that_leaves_after_done_had_the_whole_answer() {
    let s = setup();
    let client = format!(
        r#"
import json, socket
body = json.dumps({{"model": "gpt-4o-mini", "stream": True, "stream_options": {{"include_usage": True}},
                   "messages": [{{"role": "user", "content": "count to 6"}}]}}).encode()
c = socket.create_connection(("{}", {PORT}))
c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json\r\n"
          + b"Content-Length: %d\r\n\r\n" % len(body) + body)
buf = b""
while b"data: [DONE]" not in buf:
    d = c.recv(65536)
    if not d:
        break
    buf += d
print("DONE" if b"data: [DONE]" in buf else "NO DONE", flush=True)
c.close()
"#,
        s.b.ipv4
    );
    let (_, out) =
        s.a.exec(Some("support-agent.service"), &["python3", "-c", &client])
            .expect("client");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "DONE",
        "{out:?}"
    );
    let line = usage_line(&s, "the stream's usage line", |u| {
        u["source"] == SUPPORT && u["completion_tokens"] == 6
    });
    assert_eq!(line["counted_by"], "usage", "{line}");
    assert_eq!(line["outcome"], "answered", "{line}");
}

#[test]
fn fields_policy_cannot_read_are_refused_not_passed_unseen() {
    // The failure: `max_tokens` was read only as a JSON integer. Sent as
    // `1000.0` or `"1000"` — which pydantic-based OpenAI-compatible servers
    // read as 1000 — policy saw no max_tokens, and the support agent's cap
    // of 256 let it through. A body that is not JSON at all (`NaN`, which
    // Python's parsers take) was decided as if it named no model. Now a
    // whole float is read as its number, a field of the wrong type and an
    // unreadable body are refused (400, OpenAI's error shape), and none of
    // them reaches the server.
    let s = setup();
    let seen_before = server_log(&s).len();
    let r = calls(
        &s,
        "support-agent.service",
        &[
            json!({"op": "chat", "prompt": "count to 2", "max_tokens": 1000.0}),
            json!({"op": "chat", "prompt": "count to 2", "max_tokens": "1000"}),
        ],
    );
    assert_eq!(r[0]["status"], 403, "1000.0 is 1000: {}", r[0]);
    assert!(
        r[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_tokens above 256")),
        "{}",
        r[0]
    );
    assert_eq!(r[1]["error"], "BadRequestError", "{}", r[1]);
    assert_eq!(r[1]["status"], 400, "{}", r[1]);
    assert!(
        r[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_tokens is not a whole number")),
        "{}",
        r[1]
    );
    assert_eq!(r[1]["body"]["type"], "invalid_request_error", "{}", r[1]);
    // curl, for bodies the openai client would not send: the answer's
    // body, then its status on a line of its own.
    let url = format!("http://{}:{PORT}/v1/chat/completions", s.b.ipv4);
    let post = |body: &str| {
        let (_, out) =
            s.a.exec(
                Some("support-agent.service"),
                &[
                    "curl",
                    "-s",
                    "-H",
                    "content-type: application/json",
                    "--data",
                    body,
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A body with NaN in it.
    let said = post(
        r#"{"model": "gpt-4o-mini", "max_tokens": 4000, "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert!(said.ends_with("\n400"), "{said}");
    assert!(said.contains("request body is not JSON"), "{said}");
    // JSON, but not an object: it names no model either.
    let said = post(r#"[{"model": "gpt-4o-mini", "max_tokens": 4000}]"#);
    assert!(said.ends_with("\n400"), "{said}");
    assert!(said.contains("request body is not a JSON object"), "{said}");
    // None of them reached the server.
    enforcer_tests::settle_logs();
    assert_eq!(server_log(&s).len(), seen_before, "{:?}", server_log(&s));
}

#[test]
fn compressed_requests_are_decided_and_metered_on_what_they_say() {
    // Before, a request body in gzip was refused 415 whatever it said: a
    // client that compresses its uploads could not reach a model at all.
    // Now it is decoded, decided on the model and max_tokens it names,
    // and forwarded decoded (the server parses it; the agent's addition
    // of `stream_options.include_usage` applies to it), so a model the
    // agent may not use stays denied however the body is encoded.
    let s = setup();
    let seen_before = server_log(&s).len();
    let client = format!(
        r#"
import gzip, http.client, json
c = http.client.HTTPConnection("{b}", {PORT}, timeout=10)
def chat(body, coding="gzip"):
    c.request("POST", "/v1/chat/completions", body=gzip.compress(json.dumps(body).encode()),
              headers={{"content-type": "application/json", "content-encoding": coding}})
    r = c.getresponse()
    print(json.dumps({{"status": r.status, "body": r.read().decode()}}), flush=True)
msgs = [{{"role": "user", "content": "count to 4"}}]
chat({{"model": "gpt-4o", "messages": msgs}})
chat({{"model": "gpt-4o-mini", "max_tokens": 4000, "messages": msgs}})
chat({{"model": "gpt-4o-mini", "max_tokens": 16, "messages": msgs, "stream": True}})
chat({{"model": "gpt-4o-mini", "max_tokens": 16, "messages": msgs}}, coding="x-gzip")
# 2 MiB of prompt in a few KiB of gzip: over the 1 MiB bound once decoded.
chat({{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "a" * (2 << 20)}}]}})
"#,
        b = s.b.ipv4
    );
    let (_, out) =
        s.a.exec(Some("support-agent.service"), &["python3", "-c", &client])
            .expect("client");
    let r = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(r.len(), 5, "{}", String::from_utf8_lossy(&out.stderr));
    let status: Vec<&Value> = r.iter().map(|x| &x["status"]).collect();
    assert_eq!(status, [403, 403, 200, 200, 413], "{r:?}");
    let body = |i: usize| r[i]["body"].as_str().unwrap_or_default().to_owned();
    assert!(
        body(0).contains("this agent may not use that model"),
        "{r:?}"
    );
    assert!(body(1).contains("max_tokens above 256"), "{r:?}");
    // The stream came whole, and the JSON answer parses.
    assert!(body(2).trim_end().ends_with("data: [DONE]"), "{r:?}");
    // The bomb: refused in OpenAI's error shape.
    let refused: Value = serde_json::from_str(&body(4)).expect("JSON refusal");
    assert_eq!(refused["error"]["code"], "request_too_large", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("as sent or decoded")),
        "{refused}"
    );
    let answer: Value = serde_json::from_str(&body(3)).expect("JSON answer");
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
    // Only the allowed two reached the server, which read them: the
    // stream with the usage chunk the agent asked for.
    enforcer_tests::settle_logs();
    let seen: Vec<Value> = server_log(&s)
        .into_iter()
        .skip(seen_before)
        .filter(|l| l.get("request").is_some())
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|l| l["model"] == "gpt-4o-mini"), "{seen:?}");
    assert_eq!(seen[0]["stream"], true, "{seen:?}");
    assert_eq!(seen[0]["include_usage"], true, "{seen:?}");
    // Both metered from their usage.
    for u in counted_usage(&s, SUPPORT, 2, "the two usage lines") {
        assert_eq!(u["completion_tokens"], 4, "{u}");
    }
}

#[test]
fn compressed_answers_are_metered_not_passed_unread() {
    // The failure: the `openai` client accepts gzip, and a server that
    // compresses (OpenAI's own API does; here the stand-in behind
    // Starlette's GZipMiddleware) answered in gzip. The agent read the
    // compressed bytes for `usage`, found none, and counted the completion
    // as 0 tokens: the batch agent's budget was never spent. Now the agent
    // asks for `identity` on every metered call, and an answer compressed
    // anyway is decoded, metered and passed on plain (before, refused 502).
    let s = setup_with(&["--gzip"]);
    let r = calls(
        &s,
        "batch-agent.service",
        &[
            json!({"op": "chat", "prompt": "count to 10", "stream": true, "include_usage": true}),
            json!({"op": "chat", "prompt": "count to 40"}),
            json!({"op": "chat", "prompt": "count to 2"}),
        ],
    );
    for (i, x) in r.iter().enumerate() {
        let n = [10, 40, 2][i];
        assert_eq!(x["ok"], true, "call {i}: {x}");
        assert_eq!(x["usage"]["completion_tokens"], n, "call {i}: {x}");
        assert!(
            x["text"]
                .as_str()
                .is_some_and(|t| t.ends_with(&n.to_string())),
            "call {i}: {x}"
        );
    }
    let metered: Vec<Value> = counted_usage(&s, BATCH, 3, "the answers' usage lines")
        .iter()
        .map(|u| u["completion_tokens"].clone())
        .collect();
    assert_eq!(metered, [json!(10), json!(40), json!(2)]);
    // 14 + 44 + 6 = 64 tokens of a budget of 60: spent.
    let spent = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 2"}),
    );
    assert_eq!(spent["status"], 429, "{spent}");
    // A server that compresses whatever it is asked (`x-force-gzip`): its
    // answers, JSON and streamed, are decoded, metered and passed on plain
    // (they were refused with a 502 before the agent decoded them).
    let forced = calls(
        &s,
        "support-agent.service",
        &[
            json!({"op": "chat", "prompt": "count to 3", "headers": {"x-force-gzip": "1"}}),
            json!({"op": "chat", "prompt": "count to 3", "stream": true,
                   "headers": {"x-force-gzip": "1"}}),
        ],
    );
    for (i, x) in forced.iter().enumerate() {
        assert_eq!(x["ok"], true, "forced {i}: {x}");
        assert!(
            x["text"].as_str().is_some_and(|t| t.ends_with('3')),
            "forced {i}: {x}"
        );
    }
    // The server did compress them: each request asked for identity and
    // was answered in gzip anyway.
    enforcer_tests::settle_logs();
    let forced_seen = server_log(&s)
        .iter()
        .filter(|l| l["forced_gzip"] == true && l["accept_encoding"] == "identity")
        .count();
    assert_eq!(forced_seen, 2, "{:?}", server_log(&s));
    // Metered from the decoded answers: the JSON one's `usage`, the
    // stream's usage chunk the agent asked for.
    for u in &counted_usage(&s, SUPPORT, 2, "the decoded answers' usage lines") {
        assert_eq!(u["completion_tokens"], 3, "{u}");
        assert_ne!(u["outcome"], "refused_encoded", "{u}");
    }
}

#[test]
fn an_answer_too_large_to_read_whole_is_metered_by_its_end() {
    // The failure: a JSON answer over 16 MiB (read up to 16 MiB, the rest
    // streamed on) was passed on unmetered: only its prompt was counted, so
    // an agent whose answers are large (many choices, logprobs, a long
    // count) spent tokens its budget never saw. Now its `usage` is read
    // from its end as it passes.
    let s = setup();
    // 2.5 million numbers: ~20 MB of JSON.
    let big = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 2500000"}),
    );
    assert_eq!(
        big["ok"],
        true,
        "{}",
        &big.to_string()[..300.min(big.to_string().len())]
    );
    assert_eq!(big["usage"]["completion_tokens"], 2_500_000);
    assert!(
        big["text"]
            .as_str()
            .is_some_and(|t| t.ends_with(" 2499999 2500000")),
        "the whole answer"
    );
    let line = usage_line(&s, "the answer's usage line", |u| u["source"] == BATCH);
    assert_eq!(line["completion_tokens"], 2_500_000, "{line}");
    assert_eq!(line["counted_by"], "usage", "{line}");
    assert_eq!(line["outcome"], "answered", "{line}");
    // Its budget (60) is spent.
    let spent = call(
        &s,
        "batch-agent.service",
        json!({"op": "chat", "prompt": "count to 2"}),
    );
    assert_eq!(spent["status"], 429, "{spent}");
    // A server that reports no usage: the answer is counted by its size,
    // 4 bytes a token, never as nothing.
    let big = call(
        &s,
        "support-agent.service",
        json!({"op": "chat", "prompt": "count to 2500000", "headers": {"x-omit-usage": "1"}}),
    );
    assert_eq!(big["ok"], true, "{big}");
    assert_eq!(big["usage"], Value::Null, "{big}");
    let line = usage_line(&s, "the usage line of the answer without usage", |u| {
        u["source"] == SUPPORT
    });
    // ~20 MB of JSON: some 5 million at 4 bytes a token.
    let counted = line["completion_tokens"].as_u64().unwrap_or(0);
    assert!((4_000_000..7_000_000).contains(&counted), "{line}");
    assert_eq!(line["counted_by"], "tokenizer", "{line}");
}
