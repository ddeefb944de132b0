//! Micro-benchmarks (criterion): a policy decision with the shipped policy,
//! uncached and from the cache; an MCP `tools/call` request decision (the
//! shipped policy's tool grants, a request input as the L7 layer builds it;
//! never cached) on the default interpreter and on the VM; the span work
//! `[traces]` adds to one L7 request; and the issuance of one X.509-SVID.
//! `cargo xtask bench` runs them and reports mean and p99 per operation.
use std::{path::Path, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group};
use enforcer::{
    identity::Ca,
    metrics::Metrics,
    policy::{Input, Peer, Policy, audit::AuditLog, source},
};

fn input(n: u64) -> Input {
    Input {
        direction: "inbound",
        source: Peer {
            spiffe_id: Some("spiffe://ai.example.org/agent/support".into()),
            trust_domain: Some("ai.example.org".into()),
            authenticated: Some(true),
            address: Some(format!("10.0.{}.{}", (n >> 8) & 255, n & 255)),
            ..Default::default()
        },
        destination: Peer {
            spiffe_id: Some("spiffe://ai.example.org/llm".into()),
            trust_domain: Some("ai.example.org".into()),
            selectors: vec!["systemd:unit:llm.service".into(), "unix:uid:1001".into()],
            address: Some("10.0.0.2".into()),
            port: Some(8000),
            ..Default::default()
        },
        protocol: "tcp",
        request: None,
    }
}

/// A `tools/call` of the support agent at the MCP server, with the fields
/// the L7 layer puts in a request input (OPA-Envoy attributes, headers,
/// body, parsed body, the `mcp` block); `n` makes each one unique, as the
/// request id and client port make real ones, and so do its arguments (a
/// query of its own: the shipped policy reads the arguments, so each is
/// evaluated, not found in the cache).
fn mcp_input(n: u64) -> Input {
    mcp_call(n, &format!("how do I reset my password ({n})"))
}

/// The same call again and again (the same arguments; a new request id,
/// JSON-RPC id and client port each time): what the policy reads is the
/// same, so after the first it is a cached decision.
fn mcp_repeated(n: u64) -> Input {
    mcp_call(n, "how do I reset my password")
}

fn mcp_call(n: u64, query: &str) -> Input {
    let agent = "spiffe://ai.example.org/agent/support";
    let server = "spiffe://ai.example.org/mcp/docs";
    let args = serde_json::json!({"query": query, "collection": "support-docs"});
    let body = serde_json::json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
        "params": {"name": "search_docs", "arguments": args.clone()}});
    let request = serde_json::json!({
        "attributes": {
            "source": {"address": {"socketAddress": {"address": "10.10.0.1", "portValue": 40000 + (n % 20000)}},
                       "principal": agent},
            "destination": {"address": {"socketAddress": {"address": "10.10.0.2", "portValue": 8001}},
                            "principal": server},
            "request": {"http": {"id": format!("7.{n}"), "method": "POST", "path": "/mcp",
                "host": "10.10.0.2:8001", "scheme": "http", "protocol": "HTTP/1.1", "size": 180,
                "headers": {":method": "POST", ":path": "/mcp", ":authority": "10.10.0.2:8001", ":scheme": "http",
                    "accept": "application/json, text/event-stream", "content-type": "application/json",
                    "content-length": "180", "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call",
                    "mcp-name": "search_docs", "user-agent": "python-httpx/0.28.1"},
                "body": body.to_string()}}
        },
        "parsed_path": ["mcp"],
        "parsed_query": {},
        "parsed_body": body,
        "truncated_body": false,
        "mcp": {"method": "tools/call", "id": n, "protocol_version": "2026-07-28",
                "tool": "search_docs", "arguments": args}
    });
    let request = request.as_object().cloned().unwrap_or_default();
    Input {
        direction: "inbound",
        source: Peer {
            spiffe_id: Some(agent.into()),
            trust_domain: Some("ai.example.org".into()),
            authenticated: Some(true),
            address: Some("10.10.0.1".into()),
            ..Default::default()
        },
        destination: Peer {
            spiffe_id: Some(server.into()),
            trust_domain: Some("ai.example.org".into()),
            selectors: vec!["systemd:unit:mcp-docs.service".into(), "unix:uid:0".into()],
            address: Some("10.10.0.2".into()),
            port: Some(8001),
            ..Default::default()
        },
        protocol: "mcp",
        request: Some(Box::new(request)),
    }
}

fn policy() -> Policy {
    policy_on(Default::default())
}

fn policy_on(engine: enforcer::policy::EngineKind) -> Policy {
    let src = source::PolicySource::Dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    let p = Policy::new(
        Default::default(),
        engine,
        AuditLog::open(Path::new("/dev/null")).expect("/dev/null"),
        Arc::new(Metrics::new("bench")),
        enforcer::policy::DEFAULT_EVAL_TIMEOUT,
    )
    .expect("evaluation pool");
    p.install(
        source::load_local(
            &src,
            &Default::default(),
            engine,
            enforcer::policy::DEFAULT_EVAL_TIMEOUT,
        )
        .expect("shipped policy"),
    );
    p
}

/// Decisions are async (uncached ones wait for the evaluation pool).
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn benches(c: &mut Criterion) {
    let p = policy();
    let rt = rt();
    let hot = input(0);
    assert!(
        rt.block_on(p.evaluate(&hot)).0.allow,
        "the benchmark input must be allowed"
    );
    // Decided in one task, as a connection's task decides: a `block_on`
    // per decision cost a quarter of a cached one, none of it the agent's.
    c.bench_function("policy_decision_cached", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(p.evaluate(&hot).await);
                }
                t.elapsed()
            })
        })
    });
    // A new source address every iteration: never in the cache.
    let mut n = 1u64;
    c.bench_function("policy_decision_uncached", |b| {
        b.iter(|| {
            n += 1;
            if n.is_multiple_of(10_000) {
                p.invalidate();
            }
            rt.block_on(p.evaluate(&input(n)))
        })
    });
    let vm = policy_on(enforcer::policy::EngineKind::Vm);
    for (name, p) in [
        ("mcp_tools_call_decision", &p),
        ("mcp_tools_call_decision_vm", &vm),
    ] {
        let d = rt.block_on(p.evaluate(&mcp_input(0))).0;
        assert!(d.allow, "{name}: the benchmark call must be allowed: {d:?}");
        let mut n = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                rt.block_on(p.evaluate(&mcp_input(n)))
            })
        });
    }
    let mut n = 0u64;
    c.bench_function("mcp_tools_call_decision_repeated", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(p.evaluate(&mcp_repeated(n)))
        })
    });
    request_span(c);
    let ca = Ca::generate(&spiffe::TrustDomain::new("ai.example.org").expect("td")).expect("CA");
    let id = spiffe::SpiffeId::new("spiffe://ai.example.org/agent/support").expect("id");
    c.bench_function("svid_issuance", |b| {
        b.iter(|| ca.issue(&id, Duration::from_secs(3600)))
    });
}

/// What `[traces]` adds to one L7 request on the agent's thread: its span
/// started under a connection's span, named, given its attributes and the
/// decision's, and ended (handed to the export queue). The exporter sends
/// to a closed port (spans are dropped or fail there, off this thread).
fn request_span(c: &mut Criterion) {
    use enforcer::otel::RequestSpan;
    use opentelemetry::{
        KeyValue,
        trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState},
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let config = enforcer::config::TracesConfig {
        endpoint: "http://127.0.0.1:9/v1/traces".into(),
        ..Default::default()
    };
    let exporting = enforcer::otel::init(&config, "bench", Arc::new(Metrics::new("bench")))
        .expect("traces")
        .expect("on");
    let conn = SpanContext::new(
        TraceId::from_bytes([7; 16]),
        SpanId::from_bytes([9; 8]),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let headers = http::HeaderMap::new();
    let input = mcp_input(1);
    let verdict = enforcer::policy::Verdict {
        allowed: true,
        decision: enforcer::policy::Decision {
            allow: true,
            reason: None,
            error: None,
            cached: false,
            undefined: false,
            timed_out: false,
        },
        decision_id: "0b8f6c1e-0000-4000-8000-000000000001".into(),
        result: "allow",
    };
    c.bench_function("request_span_traced", |b| {
        b.iter(|| {
            let span = RequestSpan::start(&headers, Some(&conn)).expect("traces on");
            span.rename("POST".into());
            span.set([
                KeyValue::new("enforcer.request_id", "7.1"),
                KeyValue::new("enforcer.conn_id", 7i64),
                KeyValue::new("enforcer.protocol", "mcp"),
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("url.path", "/mcp"),
                KeyValue::new("network.protocol.version", "1.1"),
                KeyValue::new("server.address", "10.10.0.2"),
                KeyValue::new("server.port", 8001i64),
                KeyValue::new(
                    "enforcer.source.spiffe_id",
                    "spiffe://ai.example.org/agent/support",
                ),
                KeyValue::new(
                    "enforcer.destination.spiffe_id",
                    "spiffe://ai.example.org/mcp/docs",
                ),
            ]);
            span.decided(&input, &verdict);
            span.set([KeyValue::new("http.response.status_code", 200i64)]);
            drop(span);
        })
    });
    drop(exporting);
}

/// Each decision timed on its own (criterion's samples are means over
/// batches, so their p99 hides single slow decisions): p50, p99 and p99.9 of
/// 20 000 cached and 20 000 uncached decisions, and of 20 000 MCP call
/// decisions on each engine (input built outside the timing), written to
/// `target/criterion/per_op.json` for `cargo xtask bench`.
/// Each of `inputs` decided and timed on its own, one after another in one
/// task (as a connection's task decides; a `block_on` around each one
/// added ≈ 0.1 µs of the harness's own): n, p50, p99, p99.9 (ns).
fn timed_one_by_one(
    rt: &tokio::runtime::Runtime,
    p: &Policy,
    inputs: &[Input],
) -> serde_json::Value {
    let mut ns: Vec<u64> = rt.block_on(async {
        let mut ns = Vec::with_capacity(inputs.len());
        for i in inputs {
            let t = std::time::Instant::now();
            std::hint::black_box(p.evaluate(i).await);
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns
    });
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    serde_json::json!({"n": ns.len(), "p50_ns": at(0.5), "p99_ns": at(0.99), "p999_ns": at(0.999)})
}

fn per_op() {
    let p = policy();
    let vm = policy_on(enforcer::policy::EngineKind::Vm);
    let rt = rt();
    let mut out = serde_json::Map::new();
    let calls: Vec<Input> = (0..20_000u64).map(mcp_input).collect();
    out.insert(
        "mcp_tools_call_decision".into(),
        timed_one_by_one(&rt, &p, &calls),
    );
    out.insert(
        "mcp_tools_call_decision_vm".into(),
        timed_one_by_one(&rt, &vm, &calls),
    );
    let repeated: Vec<Input> = (0..20_000u64).map(mcp_repeated).collect();
    out.insert(
        "mcp_tools_call_decision_repeated".into(),
        timed_one_by_one(&rt, &p, &repeated),
    );
    let hot = vec![input(0); 20_000];
    out.insert(
        "policy_decision_cached".into(),
        timed_one_by_one(&rt, &p, &hot),
    );
    let fresh: Vec<Input> = (0..20_000u64).map(|n| input(1_000_000 + n)).collect();
    out.insert(
        "policy_decision_uncached".into(),
        timed_one_by_one(&rt, &p, &fresh),
    );
    p.invalidate();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    std::fs::create_dir_all(&dir).expect("target/criterion");
    std::fs::write(
        dir.join("per_op.json"),
        serde_json::to_string_pretty(&out).expect("json"),
    )
    .expect("per_op.json");
    println!("per-decision latency: {}", serde_json::Value::Object(out));
}

criterion_group!(core, benches);

fn main() {
    core();
    Criterion::default().configure_from_args().final_summary();
    per_op();
}
