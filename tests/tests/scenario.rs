//! The AI-agent scenario end to end, with real software nobody changed: the
//! official `mcp` and `openai` clients, an `mcp` SDK server, Chroma's server.
use enforcer_tests::{scenario::*, wait_for};
use serde_json::{Value, json};

fn outbound_line(s: &Scenario, pid: u32, port: u16) -> Value {
    s.e_agents
        .wait_for_connection(|v| {
            v["pid"] == pid
                && v["orig_dst"]
                    .as_str()
                    .is_some_and(|d| d.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| {
            panic!(
                "no line for pid {pid} port {port}:\n{}",
                std::fs::read_to_string(&s.e_agents.log).unwrap_or_default()
            )
        })
}

#[test]
fn ai_agents_mcp_llm_and_vector_db_under_identity_and_policy() {
    let s = Scenario::start("ai").expect("scenario");

    // 1. The support agent lists and calls the docs tool, then asks the LLM;
    //    it also tries a collection and a tool it was not granted.
    let (pid, out, ok) = s
        .run_agent_with(
            "support-agent.service",
            "how do I reset my password",
            &[
                (
                    "search_docs",
                    json!({"query": "failover", "collection": "internal-runbooks"}),
                ),
                (
                    "delete_doc",
                    json!({"doc_id": "billing", "collection": "support-docs"}),
                ),
            ],
        )
        .expect("agent");
    assert!(ok, "support agent failed: {out}");
    assert_eq!(
        out["tools"],
        json!(["search_docs"]),
        "delete_doc is hidden from the support agent: {out}"
    );
    let denied = |i: usize, reason: &str| {
        let c = &out["calls"][i];
        assert_eq!(c["ok"], false, "{c}");
        assert!(
            c["error"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("denied by policy: {reason}"))),
            "the agent sees the policy's reason: {c}"
        );
    };
    denied(
        0,
        r#"denied: argument collection of search_docs must be one of ["support-docs"]"#,
    );
    denied(1, "denied: tool delete_doc is not granted to this agent");
    let docs = out["documents"][0].as_str().unwrap_or_default();
    assert!(
        docs.contains("reset a password"),
        "the vector search must find the password doc: {out}"
    );
    assert!(
        out["answer"]
            .as_str()
            .is_some_and(|a| a.starts_with("Based on the documentation")),
        "{out}"
    );
    assert!(
        out["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0,
        "{out}"
    );
    // b's agent, the last before the LLM, decided the chat request by model
    // and counted its tokens: the metrics say what the server's usage said.
    let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as f64;
    let completion = out["usage"]["completion_tokens"].as_u64().unwrap_or(0) as f64;
    let tokens = |kind: &str| {
        s.e_tools
            .metric(
                "enforcer_llm_tokens_total",
                &[
                    ("source", SUPPORT_AGENT),
                    ("model", "enforcer-demo-llm"),
                    ("kind", kind),
                ],
            )
            .unwrap_or(-1.0)
    };
    wait_for("the support agent's LLM tokens counted", || {
        tokens("completion") == completion
    });
    assert_eq!(tokens("prompt"), prompt);
    let usage =
        s.tb.audit(&s.tools)
            .into_iter()
            .find(|r| r["type"] == "llm_usage" && r["source"] == SUPPORT_AGENT)
            .expect("the chat's usage line");
    assert_eq!(usage["counted_by"], "usage", "{usage}");
    assert_eq!(
        usage["window_secs"], 3600,
        "the shipped budget's window: {usage}"
    );
    for (port, dst) in [(MCP_PORT, MCP), (LLM_PORT, LLM)] {
        let l = outbound_line(&s, pid, port);
        assert_eq!(l["outcome"], "ok", "{l}");
        assert_eq!(l["mtls"], true, "every hop is mutual TLS: {l}");
        assert_eq!(l["src_spiffe_id"], SUPPORT_AGENT, "{l}");
        assert_eq!(l["dst_spiffe_id"], dst, "{l}");
    }
    // The MCP server's hop to Chroma is mutual TLS too (its client keeps the
    // connection open, so look at the decisions, taken when it opened).
    let b = s.tb.audit(&s.tools);
    let hop = b
        .iter()
        .find(|r| {
            r["input"]["source"]["spiffe_id"] == MCP
                && r["input"]["destination"]["spiffe_id"] == VECTORDB
        })
        .expect("tools node decided MCP -> vector DB with the verified destination identity");
    assert_eq!(hop["input"]["destination"]["authenticated"], true, "{hop}");
    assert_eq!(hop["result"], true, "{hop}");
    let at_db = s.tb.audit(&s.data);
    let inbound = at_db
        .iter()
        .find(|r| r["input"]["direction"] == "inbound" && r["input"]["source"]["spiffe_id"] == MCP)
        .expect("the vector DB's agent decided on the MCP server's verified identity");
    assert_eq!(
        inbound["input"]["source"]["authenticated"], true,
        "{inbound}"
    );
    assert_eq!(inbound["result"], true, "{inbound}");

    // 2. The admin agent sees both tools, searches the runbooks and deletes.
    let (_, out, ok) = s
        .run_agent_with(
            "admin-agent.service",
            "how do I reset my password",
            &[
                (
                    "search_docs",
                    json!({"query": "database failover", "collection": "internal-runbooks", "k": 1}),
                ),
                (
                    "delete_doc",
                    json!({"doc_id": "billing", "collection": "support-docs"}),
                ),
            ],
        )
        .expect("agent");
    assert!(ok, "admin agent failed: {out}");
    let mut tools: Vec<_> = out["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    tools.sort();
    assert_eq!(tools, ["delete_doc", "search_docs"], "{out}");
    assert_eq!(out["calls"][0]["ok"], true, "{out}");
    assert!(
        out["calls"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("pg_ctl promote")),
        "{out}"
    );
    assert_eq!(
        out["calls"][1]["text"], "deleted billing from support-docs",
        "{out}"
    );
    // The server ran the admin's delete (the event waited for) and never
    // the support agent's calls.
    let log = s.tb.server_log(&s.tools, "mcp");
    assert_eq!(
        log.matches("DELETE ").collect::<Vec<_>>(),
        ["DELETE "],
        "{log}"
    );
    assert!(log.contains("DELETE support-docs billing"), "{log}");
    assert_eq!(log.matches("SEARCH internal-runbooks").count(), 1, "{log}");
    // b's audit log has one line per tool call, with the verified caller.
    let b = s.tb.audit(&s.tools);
    let call = |who: &str, tool: &str, allow: bool| {
        b.iter()
            .find(|r| {
                r["request_id"].is_string()
                    && r["input"]["mcp"]["tool"] == tool
                    && r["input"]["mcp"]["listing"].is_null()
                    && r["input"]["attributes"]["source"]["principal"] == who
                    && r["result"] == allow
            })
            .unwrap_or_else(|| panic!("no audit line for {who} {tool} {allow}: {b:?}"))
    };
    assert_eq!(
        call(SUPPORT_AGENT, "delete_doc", false)["reason"],
        "denied: tool delete_doc is not granted to this agent"
    );
    assert_eq!(
        call(ADMIN_AGENT, "delete_doc", true)["input"]["mcp"]["arguments"]["doc_id"],
        "billing"
    );
    assert_eq!(
        call(SUPPORT_AGENT, "search_docs", false)["input"]["source"]["authenticated"],
        true
    );

    // 3. A second agent identity is refused by policy at the LLM and the MCP server.
    let (pid, out, ok) = s
        .run_agent("research-agent.service", "list all invoices")
        .expect("agent");
    assert!(!ok, "the research agent must be refused: {out}");
    assert!(
        out["mcp_error"].is_string() && out["llm_error"].is_string(),
        "{out}"
    );
    for port in [MCP_PORT, LLM_PORT] {
        let l = outbound_line(&s, pid, port);
        assert_eq!(l["outcome"], "denied", "{l}");
        assert_eq!(l["src_spiffe_id"], RESEARCH_AGENT, "{l}");
    }
    assert!(
        !s.tb
            .server_log(&s.tools, "llm")
            .contains("list all invoices")
    );

    // 4. The support agent uses the vector DB itself, with the chromadb
    //    client: c's agent (declared vectordb) lets it query its collection
    //    and refuses writes, deletes and the runbooks, with the reason.
    let (_, out) = s
        .use_vectordb("support-agent.service", "how do I reset my password")
        .expect("vector DB");
    assert_eq!(out["query"]["ok"], true, "{out}");
    assert!(
        out["query"]["result"][0]
            .as_str()
            .is_some_and(|d| d.contains("reset a password")),
        "the real embedding model finds the password doc: {out}"
    );
    let refused = |k: &str, why: &str| {
        assert_eq!(out[k]["error"], "AuthorizationError", "{out}");
        assert_eq!(
            out[k]["message"],
            format!("denied by policy: {why}"),
            "{out}"
        );
    };
    refused(
        "add",
        "denied: write (add) on collection support-docs is not granted to this identity",
    );
    refused(
        "delete",
        "denied: delete (delete) on collection support-docs is not granted to this identity",
    );
    refused(
        "runbooks",
        "denied: read (get_collection) on collection internal-runbooks is not granted to this identity",
    );
    // c's audit log: the agent's refused write, and the MCP server's writes
    // (the ingest's upserts, the admin's delete_doc) allowed.
    let c = s.tb.audit(&s.data);
    let vdb = |who: &str, action: &str, collection: &str, allow: bool| {
        c.iter().any(|r| {
            r["input"]["attributes"]["source"]["principal"] == who
                && r["input"]["vectordb"]["action"] == action
                && r["input"]["vectordb"]["collection"] == collection
                && r["result"] == allow
        })
    };
    assert!(vdb(SUPPORT_AGENT, "add", "support-docs", false));
    assert!(vdb(SUPPORT_AGENT, "query", "support-docs", true));
    assert!(vdb(MCP, "upsert", "internal-runbooks", true));
    assert!(vdb(MCP, "create_collection", "support-docs", true));
    assert!(vdb(MCP, "delete", "support-docs", true));

    // 5. The audit logs name the verified identities of allowed and denied connections.
    let a = s.tb.audit(&s.agents);
    let find = |src: &str, dst: &str, allow: bool| {
        a.iter().any(|r| {
            r["input"]["source"]["spiffe_id"] == src
                && r["input"]["destination"]["spiffe_id"] == dst
                && r["result"] == allow
        })
    };
    assert!(find(SUPPORT_AGENT, LLM, true) && find(SUPPORT_AGENT, MCP, true));
    assert!(find(RESEARCH_AGENT, LLM, false) && find(RESEARCH_AGENT, MCP, false));
    assert!(find(SUPPORT_AGENT, VECTORDB, true));
    assert!(!find(SUPPORT_AGENT, VECTORDB, false));
    let c = s.tb.audit(&s.data);
    assert!(c.iter().any(|r| r["input"]["direction"] == "inbound"
        && r["input"]["source"]["spiffe_id"] == MCP
        && r["input"]["source"]["authenticated"] == true
        && r["result"] == true));

    // 6. The support agent spends its token budget (2 000 an hour in the
    //    shipped policy): b's agent cuts its stream with an error event,
    //    then refuses the next request 429.
    let (_, out) = s
        .spend_tokens("support-agent.service", 3000)
        .expect("spend");
    assert_eq!(out["stream_end"]["error"], "APIError", "{out}");
    assert!(
        out["stream_end"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("budget exhausted")),
        "{out}"
    );
    let words = out["stream"]["words"].as_u64().unwrap_or(0);
    assert!(words > 0 && words < 2000, "{out}");
    assert_eq!(out["next"]["error"], "RateLimitError", "{out}");
    let b = s.tb.audit(&s.tools);
    for outcome in ["cut_over_budget", "refused_over_budget"] {
        assert!(
            b.iter().any(|u| u["type"] == "llm_usage"
                && u["source"] == SUPPORT_AGENT
                && u["outcome"] == outcome),
            "no {outcome} usage line"
        );
    }
}
