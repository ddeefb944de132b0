# enforcer's shipped policy for AI workloads (DESIGN §3).
#
# Roles and ports come from data.json (data.enforcer.ai). Decisions are made on
# verified SPIFFE IDs: the source's ID is attested by its node's agent and, on
# the destination side, verified from its X.509-SVID.
package enforcer.authz

import rego.v1

ai := data.enforcer.ai

default allow := false

src := input.source.spiffe_id

dst := input.destination.spiffe_id

is_agent if startswith(src, ai.agent_prefix)

is_mcp_server if src in ai.mcp_servers

to_llm if dst in ai.llm_endpoints

to_mcp if dst in ai.mcp_servers

to_vectordb if dst in ai.vector_dbs

vectordb_admin_port if input.destination.port in ai.vector_db_admin_ports

# Agents (identities under .../agent/) may call the LLM endpoints.
allow if {
	is_agent
	to_llm
}

# Agents may call the MCP servers (their tools).
allow if {
	is_agent
	to_mcp
}

# The MCP servers may use the vector databases, admin/ingest port included.
allow if {
	is_mcp_server
	to_vectordb
}

# Agents may query a vector database, but never reach its admin/ingest port.
allow if {
	is_agent
	to_vectordb
	not vectordb_admin_port
}

# Explicitly allowed pairs (data.enforcer.ai.extra_allow: [{source, destination}]).
allow if {
	some pair in ai.extra_allow
	pair.source == src
	pair.destination == dst
}

default reason := "no rule allows this connection"

reason := "allowed: agent -> LLM" if {
	is_agent
	to_llm
}

reason := "allowed: agent -> MCP server" if {
	is_agent
	to_mcp
}

reason := "allowed: MCP server -> vector DB" if {
	is_mcp_server
	to_vectordb
}

reason := "allowed: agent -> vector DB query port" if {
	is_agent
	to_vectordb
	not vectordb_admin_port
	not is_mcp_server
}

reason := "denied: agents may not reach the vector DB admin/ingest port" if {
	is_agent
	to_vectordb
	vectordb_admin_port
}

reason := "denied: workload has no SPIFFE identity" if {
	not input.source.spiffe_id
}

reason := "denied: only identities under the agent prefix may call the LLM" if {
	input.source.spiffe_id
	not is_agent
	not is_mcp_server
	to_llm
}

reason := "denied: only identities under the agent prefix may call MCP servers" if {
	input.source.spiffe_id
	not is_agent
	to_mcp
}
