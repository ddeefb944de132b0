//! `cargo xtask demo`: the AI-agent scenario on three nodes of this machine
//! (network namespaces on one bridge), real software nobody changed, under
//! SPIFFE identities, mutual TLS and the shipped policy. Prints what was
//! allowed, denied and why, and where to look; removes everything it made.
use anyhow::Context as _;
use enforcer_tests::scenario::*;
use serde_json::Value;

fn short(id: &str) -> &str {
    id.strip_prefix("spiffe://ai.example.org").unwrap_or(id)
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
    println!("  {:<17} research agent ({})", "", short(RESEARCH_AGENT));
    println!(
        "  node b {:<10} MCP server :{MCP_PORT} ({}), LLM endpoint :{LLM_PORT} ({})",
        s.tools.ipv4,
        short(MCP),
        short(LLM)
    );
    println!(
        "  node c {:<10} Chroma vector DB :{CHROMA_PORT} ({})",
        s.data.ipv4,
        short(VECTORDB)
    );
    println!(
        "  every node: enforcer with the embedded CA (one trust domain, {TD}) and the shipped policy (policies/)"
    );
    println!();

    let q = "how do I reset my password";
    let (_, out, ok) = s.run_agent("support-agent.service", q)?;
    println!("1. support agent: \"{q}\"");
    println!("   MCP tools/list -> {}", out["tools"]);
    println!(
        "   MCP tools/call search_docs -> {}",
        out["documents"][0]
            .as_str()
            .unwrap_or("(none)")
            .lines()
            .next()
            .unwrap_or("")
    );
    println!(
        "   LLM chat.completions -> {:?} (usage {})",
        out["answer"].as_str().unwrap_or("(none)"),
        out["usage"]
    );
    println!(
        "   {}",
        if ok {
            "=> allowed, every hop mutual TLS between SPIFFE identities"
        } else {
            "=> FAILED (unexpected)"
        }
    );
    println!();
    let (_, out, ok) = s.run_agent("research-agent.service", "list all invoices")?;
    println!(
        "2. research agent: MCP -> {}, LLM -> {}",
        out["mcp_error"], out["llm_error"]
    );
    println!(
        "   {}",
        if ok {
            "=> reached them (unexpected!)"
        } else {
            "=> denied by policy at the MCP server and the LLM"
        }
    );
    println!();
    let (_, out) = s.probe_vectordb("support-agent.service")?;
    println!(
        "3. support agent straight to the vector DB -> {}",
        out["vectordb"]
    );
    println!("   => agents reach documents only through the MCP server's tool");
    println!();

    println!("Decisions (audit log of each node, OPA decision-log shape):");
    for (name, node) in [("a", &s.agents), ("b", &s.tools), ("c", &s.data)] {
        for r in s.audit(node) {
            let src = r["input"]["source"]["spiffe_id"]
                .as_str()
                .map(short)
                .unwrap_or("(no identity)");
            let dst = r["input"]["destination"]["spiffe_id"]
                .as_str()
                .map(short)
                .unwrap_or("(outside mesh)");
            let port = &r["input"]["destination"]["port"];
            let verdict = if r["result"] == Value::Bool(true) {
                "ALLOW"
            } else {
                "DENY "
            };
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
    println!();
    println!(
        "(the demo's files are removed when it ends; set ENFORCER_KEEP_TEST_DIR=1 to keep them)"
    );
    drop(s);
    Ok(())
}
