//! `cargo xtask demo`: the AI-agent scenario on three nodes of this machine
//! (network namespaces on one bridge), real software nobody changed, under
//! SPIFFE identities, mutual TLS and the shipped policy. Prints what was
//! allowed, denied and why, and where to look; removes everything it made.
use anyhow::Context as _;
use enforcer_tests::scenario::*;
use serde_json::{Value, json};

fn short(id: &str) -> &str {
    id.strip_prefix("spiffe://ai.example.org").unwrap_or(id)
}

/// An audit line's result, padded for a column.
fn verdict(r: &Value) -> &'static str {
    if r["result"] == Value::Bool(true) {
        "ALLOW"
    } else {
        "DENY "
    }
}

/// A request audit line's caller: its verified principal, shortened.
fn caller(r: &Value) -> &str {
    r["input"]["attributes"]["source"]["principal"]
        .as_str()
        .map(short)
        .unwrap_or("(no identity)")
}

fn first_line(v: &Value) -> &str {
    v.as_str().unwrap_or("(none)").lines().next().unwrap_or("")
}

/// `k=v, …` of a tool call's arguments, long values cut.
fn arguments(v: &Value) -> String {
    let Some(args) = v.as_object() else {
        return v.to_string();
    };
    args.iter()
        .map(|(k, v)| {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            let cut: String = v.chars().take(20).collect();
            let more = if cut.len() < v.len() { "…" } else { "" };
            format!("{k}={cut}{more}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent's extra tool calls: what each returned, or the error it raised.
fn print_calls(out: &Value) {
    for c in out["calls"].as_array().into_iter().flatten() {
        let call = format!(
            "MCP {}({})",
            c["tool"].as_str().unwrap_or("?"),
            arguments(&c["arguments"])
        );
        if c["ok"] == Value::Bool(true) {
            println!("   {call} -> {}", first_line(&c["text"]));
        } else {
            println!(
                "   {call} -> raised: {}",
                c["error"]
                    .as_str()
                    .or(c["text"].as_str())
                    .unwrap_or("(no error)")
            );
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    println!(
        "Starting three nodes (network namespaces on one bridge; no traffic leaves this machine)..."
    );
    let s = Scenario::start("demo").context("building the demo scenario (needs root)")?;
    println!();
    println!(
        "  node a {:<10} support agent ({})",
        s.agents.ipv4,
        short(SUPPORT_AGENT)
    );
    println!("  {:<17} admin agent ({})", "", short(ADMIN_AGENT));
    println!("  {:<17} research agent ({})", "", short(RESEARCH_AGENT));
    println!(
        "  node b {:<10} MCP server :{MCP_PORT} ({}; tools search_docs, delete_doc; its agent decides each call), LLM endpoint :{LLM_PORT} ({}; declared llm: models per agent, tokens counted, budgets)",
        s.tools.ipv4,
        short(MCP),
        short(LLM)
    );
    println!(
        "  node c {:<10} Chroma vector DB :{CHROMA_PORT} ({}; declared vectordb: read/write/delete/admin per collection)",
        s.data.ipv4,
        short(VECTORDB)
    );
    println!(
        "  every node: enforcer with the embedded CA (one trust domain, {TD}) and the shipped policy (policies/)"
    );
    println!();

    let q = "how do I reset my password";
    let runbooks = json!({"query": "database failover", "collection": "internal-runbooks", "k": 1});
    let delete = json!({"doc_id": "billing", "collection": "support-docs"});
    let (_, out, ok) = s.run_agent_with(
        "support-agent.service",
        q,
        &[
            ("search_docs", runbooks.clone()),
            ("delete_doc", delete.clone()),
        ],
    )?;
    println!("1. support agent: \"{q}\"");
    println!(
        "   MCP tools/list -> {} (delete_doc is hidden from it)",
        out["tools"]
    );
    println!(
        "   MCP search_docs(collection=support-docs) -> {}",
        first_line(&out["documents"][0])
    );
    print_calls(&out);
    println!(
        "   LLM chat.completions -> {:?} (usage {})",
        out["answer"].as_str().unwrap_or("(none)"),
        out["usage"]
    );
    println!(
        "   {}",
        if ok {
            "=> allowed what it was granted, every hop mutual TLS between SPIFFE identities"
        } else {
            "=> FAILED (unexpected)"
        }
    );
    println!();
    let (_, out, ok) = s.run_agent_with(
        "admin-agent.service",
        q,
        &[("search_docs", runbooks), ("delete_doc", delete)],
    )?;
    println!("2. admin agent ({}):", short(ADMIN_AGENT));
    println!("   MCP tools/list -> {}", out["tools"]);
    print_calls(&out);
    println!(
        "   {}",
        if ok {
            "=> the same server, the same tools: what each agent may do is the node agent's policy"
        } else {
            "=> FAILED (unexpected)"
        }
    );
    println!();
    let (_, out, ok) = s.run_agent("research-agent.service", "list all invoices")?;
    println!(
        "3. research agent ({}): MCP -> {}, LLM -> {}",
        short(RESEARCH_AGENT),
        out["mcp_error"],
        out["llm_error"]
    );
    println!(
        "   {}",
        if ok {
            "=> reached them (unexpected!)"
        } else {
            "=> denied by policy at the MCP server and the LLM (not an agent identity)"
        }
    );
    println!();
    let (_, out) = s.use_vectordb("support-agent.service", q)?;
    println!(
        "4. support agent straight to the vector DB (chromadb client; node c's agent decides each request):"
    );
    let seen = |k: &str| {
        let r = &out[k];
        if r["ok"] == Value::Bool(true) {
            format!("ok {}", first_line(&r["result"][0]))
        } else {
            format!(
                "{}: {}",
                r["error"].as_str().unwrap_or("?"),
                r["message"].as_str().unwrap_or("?")
            )
        }
    };
    println!(
        "   query support-docs (real embedding) -> {}",
        seen("query")
    );
    println!("   add to support-docs                -> {}", seen("add"));
    println!(
        "   delete from support-docs           -> {}",
        seen("delete")
    );
    println!(
        "   peek at internal-runbooks          -> {}",
        seen("runbooks")
    );
    println!("   => it may read its collection; only the MCP server writes");
    println!();
    let (_, out) = s.spend_tokens("support-agent.service", 3000)?;
    println!("5. support agent streams \"count to 3000\" (its budget: 2 000 tokens an hour):");
    println!(
        "   stream -> {} words, then {}: {}",
        out["stream"]["words"],
        out["stream_end"]["error"].as_str().unwrap_or("(not cut!)"),
        out["stream_end"]["message"].as_str().unwrap_or("")
    );
    println!(
        "   next request -> {}: {}",
        out["next"]["error"].as_str().unwrap_or("(allowed!)"),
        out["next"]["message"].as_str().unwrap_or("")
    );
    println!("   => node b's agent cut the stream when the budget ran out, then refused with 429");
    println!();

    println!(
        "Per-request decisions of node b's agent, the last before the MCP server and the LLM (audit log, one line per tool call or model request):"
    );
    let b = s.tb.audit(&s.tools);
    let mut example = None;
    for r in b
        .iter()
        .filter(|r| r["request_id"].is_string() && r["type"].is_null())
    {
        let mcp = &r["input"]["mcp"];
        let llm = &r["input"]["llm"];
        let who = caller(r);
        let verdict = verdict(r);
        let what = if llm.is_object() {
            format!(
                "LLM {}(model={})",
                llm["endpoint"].as_str().unwrap_or("?"),
                llm["model"].as_str().unwrap_or("-")
            )
        } else if mcp["listing"] == Value::Bool(true) {
            format!("tools/list item {}", mcp["tool"].as_str().unwrap_or("?"))
        } else if mcp["tool"].is_string() {
            format!(
                "{}({})",
                mcp["tool"].as_str().unwrap_or("?"),
                arguments(&mcp["arguments"])
            )
        } else {
            mcp["method"].as_str().unwrap_or("?").to_owned()
        };
        println!(
            "  {:<6} {verdict} {who:<16} {what:<66} {}",
            r["request_id"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
        if example.is_none() && r["result"] == Value::Bool(false) && mcp["listing"].is_null() {
            example = Some(r.clone());
        }
    }
    if let Some(mut r) = example {
        // The request's headers and body are in the line too; shortened here.
        if let Some(http) = r.pointer_mut("/input/attributes/request/http") {
            http["headers"] = json!("…");
            http["body"] = json!("…");
        }
        if let Some(input) = r["input"].as_object_mut() {
            input.insert("parsed_body".into(), json!("…"));
        }
        println!();
        println!("One of those audit lines (headers and body shortened):");
        println!("  {r}");
    }
    println!();
    println!(
        "Per-request decisions of node c's agent, the last before Chroma (audit log, one line per request):"
    );
    for r in
        s.tb.audit(&s.data)
            .iter()
            .filter(|r| r["request_id"].is_string())
    {
        let v = &r["input"]["vectordb"];
        let who = caller(r);
        let verdict = verdict(r);
        let what = format!(
            "{} {}{}",
            v["operation"].as_str().unwrap_or("?"),
            v["action"].as_str().unwrap_or("?"),
            v["collection"]
                .as_str()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        );
        println!(
            "  {:<6} {verdict} {who:<16} {what:<40} {}",
            r["request_id"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    println!();
    println!(
        "LLM tokens per identity and model (node b's usage lines, one after each answer; a cut stream and the refusal after it included):"
    );
    for u in b.iter().filter(|r| r["type"] == "llm_usage") {
        println!(
            "  {:<6} {:<16} {:<18} prompt {:>4}  completion {:>4}  ({}, counted by {}; {} tokens in this {} s window)",
            u["request_id"].as_str().unwrap_or(""),
            u["source"].as_str().map(short).unwrap_or("?"),
            u["model"].as_str().unwrap_or("?"),
            u["prompt_tokens"],
            u["completion_tokens"],
            u["outcome"].as_str().unwrap_or("?"),
            u["counted_by"].as_str().unwrap_or("?"),
            u["tokens_used_window"],
            u["window_secs"],
        );
    }
    println!();

    println!("Connection decisions (audit log of each node, OPA decision-log shape):");
    for (name, node) in [("a", &s.agents), ("b", &s.tools), ("c", &s.data)] {
        for r in
            s.tb.audit(node)
                .iter()
                .filter(|r| r["request_id"].is_null())
        {
            let src = r["input"]["source"]["spiffe_id"]
                .as_str()
                .map(short)
                .unwrap_or("(no identity)");
            let dst = r["input"]["destination"]["spiffe_id"]
                .as_str()
                .map(short)
                .unwrap_or("(outside mesh)");
            let port = &r["input"]["destination"]["port"];
            let verdict = verdict(r);
            println!(
                "  node {name} {:<8} {verdict} {src:<26} -> {dst}:{port:<5} {}{}",
                r["input"]["direction"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or(""),
                if r["cached"] == Value::Bool(true) {
                    " (cached)"
                } else {
                    ""
                }
            );
        }
    }
    println!();
    println!(
        "Where to look (in production: policy.audit_log, the agent's stderr, admin.metrics_addr):"
    );
    println!("  audit logs   {}", s.tb.audit_log(&s.agents).display());
    println!(
        "  agent logs   {} (one JSON line per connection)",
        s.e_agents.log.display()
    );
    println!(
        "  metrics      GET http://{}/metrics inside each node, e.g.:",
        s.e_agents.metrics_addr
    );
    for l in s.e_agents.metrics()?.lines().filter(|l| {
        l.starts_with("enforcer_policy_decisions_total")
            || l.starts_with("enforcer_connections_closed_total")
    }) {
        println!("    {l}");
    }
    println!("    and node b's tool calls and LLM tokens:");
    for l in s.e_tools.metrics()?.lines().filter(|l| {
        l.starts_with("enforcer_mcp_calls_total") || l.starts_with("enforcer_llm_tokens_total")
    }) {
        println!("    {l}");
    }
    let bin = enforcer_tests::enforcer_bin();
    let (_, out) = s
        .agents
        .exec(None, &[&bin.to_string_lossy(), "status"])
        .context("enforcer status")?;
    println!(
        "  status       `enforcer status` inside each node (admin.status_addr; JSON at /status), node a's:"
    );
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if l.is_empty() {
            println!();
        } else {
            println!("    {l}");
        }
    }
    println!();
    println!(
        "(the demo's files are removed when it ends; set ENFORCER_KEEP_TEST_DIR=1 to keep them)"
    );
    drop(s);
    Ok(())
}
