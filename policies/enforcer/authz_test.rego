package enforcer.authz_test

import rego.v1

import data.enforcer.authz

agent := "spiffe://ai.example.org/agent/support"

other := "spiffe://ai.example.org/sandbox/research-agent"

llm := "spiffe://ai.example.org/llm"

mcp := "spiffe://ai.example.org/mcp/docs"

vdb := "spiffe://ai.example.org/vectordb"

conn(s, d, port) := {
	"direction": "inbound",
	"source": {"spiffe_id": s, "authenticated": true},
	"destination": {"spiffe_id": d, "port": port},
	"protocol": "tcp",
}

test_agent_reaches_llm if {
	authz.allow with input as conn(agent, llm, 8000)
	authz.reason == "allowed: agent -> LLM" with input as conn(agent, llm, 8000)
}

test_agent_reaches_mcp if {
	authz.allow with input as conn(agent, mcp, 8001)
}

test_non_agent_identity_denied_at_llm if {
	not authz.allow with input as conn(other, llm, 8000)
	authz.reason == "denied: only identities under the agent prefix may call the LLM" with input as conn(other, llm, 8000)
}

test_non_agent_identity_denied_at_mcp if {
	not authz.allow with input as conn(other, mcp, 8001)
	authz.reason == "denied: only identities under the agent prefix may call MCP servers" with input as conn(other, mcp, 8001)
}

test_mcp_server_reaches_vectordb_including_admin if {
	authz.allow with input as conn(mcp, vdb, 8100)
	authz.allow with input as conn(mcp, vdb, 8101)
}

test_agent_queries_vectordb_but_not_admin_port if {
	authz.allow with input as conn(agent, vdb, 8100)
	not authz.allow with input as conn(agent, vdb, 8101)
	authz.reason == "denied: agents may not reach the vector DB admin/ingest port" with input as conn(agent, vdb, 8101)
}

test_unknown_workload_denied if {
	not authz.allow with input as {"direction": "outbound", "source": {"selectors": ["unix:uid:1000"]}, "destination": {"spiffe_id": llm, "port": 8000}, "protocol": "tcp"}
	authz.reason == "denied: workload has no SPIFFE identity" with input as {"source": {}, "destination": {"spiffe_id": llm}}
}

test_llm_cannot_call_agents if {
	not authz.allow with input as conn(llm, agent, 9000)
}

test_prefix_is_not_a_substring_match if {
	not authz.allow with input as conn("spiffe://ai.example.org/agentx/evil", llm, 8000)
	not authz.allow with input as conn("spiffe://evil.example.org/agent/support", llm, 8000)
}

test_extra_allow_pairs if {
	authz.allow with input as conn(other, llm, 8000) with data.enforcer.ai.extra_allow as [{"source": other, "destination": llm}]
}
