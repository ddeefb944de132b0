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

test_granted_identities_connect_to_vectordb if {
	authz.allow with input as conn(mcp, vdb, 8101)
	authz.allow with input as conn(agent, vdb, 8101)
	not authz.allow with input as conn(other, vdb, 8101)
	authz.reason == "denied: this identity has no grant at this vector DB" with input as conn(other, vdb, 8101)
}

# A request to the vector DB, as b's agent builds it (protocol = "vectordb").
vdb_req(s, operation, action, collection) := object.union(conn(s, vdb, 8101), {
	"protocol": "vectordb",
	"attributes": {"source": {"principal": s}, "destination": {"principal": vdb}},
	"vectordb": object.union(
		{"operation": operation, "action": action, "tenant": "default_tenant", "database": "default_database"},
		{k: v | some k, v in {"collection": collection}; v != null},
	),
})

test_agent_queries_its_collection_but_never_writes if {
	authz.allow with input as vdb_req(agent, "read", "query", "support-docs")
	authz.reason == "allowed: read (query) on collection support-docs is granted to this identity" with input as vdb_req(agent, "read", "query", "support-docs")
	not authz.allow with input as vdb_req(agent, "write", "add", "support-docs")
	authz.reason == "denied: write (add) on collection support-docs is not granted to this identity" with input as vdb_req(agent, "write", "add", "support-docs")
	not authz.allow with input as vdb_req(agent, "delete", "delete", "support-docs")
	not authz.allow with input as vdb_req(agent, "read", "query", "internal-runbooks")
	not authz.allow with input as vdb_req(agent, "admin", "list_collections", null)
	authz.reason == "denied: admin (list_collections) is not granted to this identity" with input as vdb_req(agent, "admin", "list_collections", null)
}

test_agent_reads_server_metadata if {
	authz.allow with input as vdb_req(agent, "read", "get_database", null)
	not authz.allow with input as vdb_req(other, "read", "heartbeat", null)
}

test_mcp_server_writes_deletes_and_creates_any_collection if {
	authz.allow with input as vdb_req(mcp, "write", "upsert", "internal-runbooks")
	authz.allow with input as vdb_req(mcp, "delete", "delete", "support-docs")
	authz.allow with input as vdb_req(mcp, "admin", "create_collection", "anything")
	authz.allow with input as vdb_req(mcp, "admin", "list_collections", null)
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

# ---- per request, at the MCP server (declared protocol = "mcp") ----------

admin := "spiffe://ai.example.org/agent/admin"

call(s, tool, args) := {
	"direction": "inbound",
	"protocol": "mcp",
	"source": {"spiffe_id": s, "authenticated": true},
	"destination": {"spiffe_id": mcp, "port": 8001},
	"attributes": {"source": {"principal": s}, "request": {"http": {"method": "POST", "path": "/mcp"}}},
	"mcp": {"method": "tools/call", "tool": tool, "arguments": args},
}

listing(s, tool) := object.union(call(s, tool, {}), {"mcp": {"method": "tools/call", "tool": tool, "listing": true}})

test_support_agent_searches_support_docs if {
	authz.allow with input as call(agent, "search_docs", {"query": "q", "collection": "support-docs"})
	authz.reason == "allowed: search_docs is granted to this agent" with input as call(agent, "search_docs", {"query": "q", "collection": "support-docs"})
}

test_support_agent_may_not_search_runbooks if {
	not authz.allow with input as call(agent, "search_docs", {"query": "q", "collection": "internal-runbooks"})
	authz.reason == `denied: argument collection of search_docs must be one of ["support-docs"]` with input as call(agent, "search_docs", {"query": "q", "collection": "internal-runbooks"})
}

test_a_constrained_argument_must_be_given if {
	not authz.allow with input as call(agent, "search_docs", {"query": "q"})
	not authz.allow with input as object.union(call(agent, "search_docs", {}), {"mcp": {"method": "tools/call", "tool": "search_docs"}})
}

test_support_agent_may_not_delete if {
	not authz.allow with input as call(agent, "delete_doc", {"doc_id": "billing", "collection": "support-docs"})
	authz.reason == "denied: tool delete_doc is not granted to this agent" with input as call(agent, "delete_doc", {"doc_id": "billing", "collection": "support-docs"})
}

test_lists_show_only_granted_tools if {
	authz.allow with input as listing(agent, "search_docs")
	not authz.allow with input as listing(agent, "delete_doc")
	authz.allow with input as listing(admin, "delete_doc")
}

test_admin_agent_searches_runbooks_and_deletes if {
	authz.allow with input as call(admin, "search_docs", {"query": "q", "collection": "internal-runbooks"})
	authz.allow with input as call(admin, "delete_doc", {"doc_id": "billing", "collection": "support-docs"})
	not authz.allow with input as call(admin, "delete_doc", {"doc_id": "x", "collection": "elsewhere"})
}

test_a_request_needs_its_connection_still_allowed if {
	not authz.allow with input as call(other, "search_docs", {"query": "q", "collection": "support-docs"})
	authz.reason == "denied: this connection is no longer allowed" with input as call(other, "search_docs", {"query": "q", "collection": "support-docs"})
}

test_other_mcp_methods_denied if {
	not authz.allow with input as object.union(call(agent, "x", {}), {"mcp": {"method": "resources/read", "resource_uri": "file:///etc/passwd"}})
	authz.reason == "denied: MCP method resources/read is not allowed by this policy" with input as object.union(call(agent, "x", {}), {"mcp": {"method": "resources/read", "resource_uri": "file:///etc/passwd"}})
}

test_connection_to_the_mcp_server_unchanged_by_grants if {
	authz.allow with input as conn(admin, mcp, 8001)
	authz.reason == "allowed: agent -> MCP server" with input as conn(admin, mcp, 8001)
}

# ---- per request, at the LLM endpoint (declared protocol = "llm") --------

chat(s, model, extra) := {
	"direction": "inbound",
	"protocol": "llm",
	"source": {"spiffe_id": s, "authenticated": true},
	"destination": {"spiffe_id": llm, "port": 8000},
	"attributes": {"source": {"principal": s}, "request": {"http": {"method": "POST", "path": "/v1/chat/completions"}}},
	"llm": object.union({"endpoint": "chat.completions", "model": model, "stream": false, "tokens_used_window": 0, "window_secs": 3600}, extra),
}

test_agents_chat_with_their_granted_model if {
	authz.allow with input as chat(agent, "enforcer-demo-llm", {})
	authz.reason == "allowed: enforcer-demo-llm on chat.completions is granted to this agent" with input as chat(agent, "enforcer-demo-llm", {})
	authz.allow with input as chat(admin, "enforcer-demo-llm", {"max_tokens": 4096})
}

test_an_ungranted_model_is_denied if {
	not authz.allow with input as chat(agent, "gpt-4o", {})
	authz.reason == "denied: model gpt-4o is not granted to this agent" with input as chat(agent, "gpt-4o", {})
}

test_max_tokens_is_capped_per_agent if {
	not authz.allow with input as chat(agent, "enforcer-demo-llm", {"max_tokens": 2048})
	authz.reason == "denied: max_tokens 2048 is above this agent's 1024" with input as chat(agent, "enforcer-demo-llm", {"max_tokens": 2048})
}

test_only_the_admin_agent_may_fine_tune if {
	not authz.allow with input as chat(agent, "enforcer-demo-llm", {"endpoint": "fine_tuning"})
	authz.reason == "denied: endpoint fine_tuning is not granted to this agent" with input as chat(agent, "enforcer-demo-llm", {"endpoint": "fine_tuning"})
	authz.allow with input as chat(admin, "enforcer-demo-llm", {"endpoint": "fine_tuning"})
}

test_granted_agents_list_models if {
	authz.allow with input as chat(agent, "x", {"endpoint": "models"})
	authz.reason == "allowed: the model list" with input as chat(agent, "x", {"endpoint": "models"})
}

test_an_agent_without_a_grant_is_denied_at_the_llm if {
	not authz.allow with input as chat("spiffe://ai.example.org/agent/new", "enforcer-demo-llm", {})
	authz.reason == "denied: this agent has no LLM grant" with input as chat("spiffe://ai.example.org/agent/new", "enforcer-demo-llm", {})
}
