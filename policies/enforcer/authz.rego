# enforcer's shipped policy for AI workloads (DESIGN §3).
#
# Roles, ports and MCP tool grants come from data.json (data.enforcer.ai).
# Decisions are made on verified SPIFFE IDs: the source's ID is attested by its
# node's agent and, on the destination side, verified from its X.509-SVID.
#
# The same rules answer twice at a destination declared in [[l7.destinations]]
# (docs/policy.md, "Per-request policy"): once for the connection, then for
# each request on it — the request's input has OPA-Envoy's `attributes` and,
# at an MCP server, the `mcp` block.
package enforcer.authz

import rego.v1

ai := data.enforcer.ai

default allow := false

is_request if input.attributes

allow if {
	not is_request
	connection_allowed
}

# A request is allowed only on a connection the policy still allows (a reload
# that revokes the pair denies the next request of an open connection too).
allow if {
	is_request
	connection_allowed
	request_allowed
}

reason := connection_reason if not is_request

reason := request_reason if is_request

src := input.source.spiffe_id

dst := input.destination.spiffe_id

is_agent if startswith(src, ai.agent_prefix)

is_mcp_server if src in ai.mcp_servers

to_llm if dst in ai.llm_endpoints

to_mcp if dst in ai.mcp_servers

to_vectordb if dst in ai.vector_dbs

# The collections and operations granted to the caller at this vector DB
# (data.enforcer.ai.vectordb_grants; see "Per request: vector DBs" below).
vectordb_grant := ai.vectordb_grants[dst][src]

vectordb_granted if count(vectordb_grant) > 0

# Agents (identities under .../agent/) may call the LLM endpoints.
connection_allowed if {
	is_agent
	to_llm
}

# Agents may call the MCP servers (their tools).
connection_allowed if {
	is_agent
	to_mcp
}

# An identity with a grant at a vector DB may connect to it; each request
# is then decided by operation and collection (declared protocol = "vectordb").
connection_allowed if {
	to_vectordb
	vectordb_granted
}

# Explicitly allowed pairs (data.enforcer.ai.extra_allow: [{source, destination}]).
connection_allowed if {
	some pair in ai.extra_allow
	pair.source == src
	pair.destination == dst
}

default connection_reason := "no rule allows this connection"

connection_reason := "allowed: agent -> LLM" if {
	is_agent
	to_llm
}

connection_reason := "allowed: agent -> MCP server" if {
	is_agent
	to_mcp
}

connection_reason := "allowed: granted identity -> vector DB" if {
	to_vectordb
	vectordb_granted
}

connection_reason := "denied: this identity has no grant at this vector DB" if {
	input.source.spiffe_id
	to_vectordb
	not vectordb_granted
}

connection_reason := "denied: workload has no SPIFFE identity" if {
	not input.source.spiffe_id
}

connection_reason := "denied: only identities under the agent prefix may call the LLM" if {
	input.source.spiffe_id
	not is_agent
	not is_mcp_server
	to_llm
}

connection_reason := "denied: only identities under the agent prefix may call MCP servers" if {
	input.source.spiffe_id
	not is_agent
	to_mcp
}

# ---- Per request: MCP tool calls ----------------------------------------
#
# data.enforcer.ai.mcp_grants[<MCP server>][<agent>][<tool>] maps the tool's
# constrained arguments to their allowed values: {"collection": ["docs"]}. An
# argument named there must be given with one of those values (a server-side
# default is never assumed safe); arguments not named are free. A tool not
# granted is denied, and hidden from the agent's tools/list.

granted_tools := ai.mcp_grants[dst][src]

tool_call if input.mcp.method == "tools/call"

bad_argument contains name if {
	some name, allowed in granted_tools[input.mcp.tool]
	not argument_allowed(name, allowed)
}

# (A function, not `not input.mcp.arguments[name] in allowed`: under OPA's
# semantics that is undefined, not true, when the argument is missing.)
argument_allowed(name, allowed) if input.mcp.arguments[name] in allowed

arguments_ok if input.mcp.listing

arguments_ok if {
	not input.mcp.listing
	count(bad_argument) == 0
}

request_allowed if {
	tool_call
	granted_tools[input.mcp.tool]
	arguments_ok
}

# ---- Per request: LLM endpoints (declared protocol = "llm") ---------------
#
# data.enforcer.ai.llm_grants[<LLM endpoint>][<agent>] = {"models": [...],
# "endpoints": [...], "max_tokens": n}: the models an agent may use, on which
# API endpoints (chat.completions, responses, embeddings, …), and the largest
# max_tokens it may ask for (a request that names none is allowed: the
# budget still holds it). Listing models is allowed to every granted agent;
# fine-tuning, files and batches only where listed. Token budgets per agent
# are data.enforcer.llm.budgets (docs/policy.md, "LLM").

llm_grant := ai.llm_grants[dst][src]

llm_request if input.llm.endpoint

llm_max_tokens_ok if not input.llm.max_tokens

llm_max_tokens_ok if input.llm.max_tokens <= llm_grant.max_tokens

request_allowed if {
	llm_request
	input.llm.endpoint in llm_grant.endpoints
	input.llm.model in llm_grant.models
	llm_max_tokens_ok
}

request_allowed if {
	llm_request
	llm_grant
	input.llm.endpoint == "models"
}

# ---- Per request: vector DBs (declared protocol = "vectordb") ------------
#
# data.enforcer.ai.vectordb_grants[<vector DB>][<identity>] maps collection
# names ("*": every collection) to the operation classes granted on them:
# read (query, get, count, peek), write (add, upsert, update), delete
# (records), admin (create, modify, delete collections; databases, tenants).
# Every granted identity may read the server's metadata (heartbeat,
# version, its tenant and database); listing collections is admin.

vectordb_request if input.vectordb.operation

vectordb_ops contains op if some op in vectordb_grant[input.vectordb.collection]

vectordb_ops contains op if some op in vectordb_grant["*"]

request_allowed if {
	vectordb_request
	input.vectordb.operation in vectordb_ops
}

request_allowed if {
	vectordb_request
	vectordb_granted
	input.vectordb.operation == "read"
	not input.vectordb.collection
}

# A destination declared `http` (not MCP): the shipped policy has no request
# rules, so each request is allowed exactly when its connection is.
request_allowed if input.protocol == "http"

default request_reason := "denied: no rule allows this request"

request_reason := "denied: this connection is no longer allowed" if {
	not connection_allowed
} else := sprintf("allowed: %s is granted to this agent", [input.mcp.tool]) if {
	request_allowed
	tool_call
} else := sprintf("allowed: %s on %s is granted to this agent", [input.llm.model, input.llm.endpoint]) if {
	request_allowed
	llm_request
	input.llm.endpoint != "models"
} else := "allowed: the model list" if {
	request_allowed
	llm_request
} else := sprintf("allowed: %s (%s) on collection %s is granted to this identity", [input.vectordb.operation, input.vectordb.action, input.vectordb.collection]) if {
	request_allowed
	vectordb_request
	input.vectordb.collection
} else := sprintf("allowed: %s (%s) of the server's metadata", [input.vectordb.operation, input.vectordb.action]) if {
	request_allowed
	vectordb_request
} else := "allowed: the connection is allowed (no request rules for http destinations)" if {
	request_allowed
} else := "denied: this agent has no LLM grant" if {
	llm_request
	not llm_grant
} else := sprintf("denied: endpoint %s is not granted to this agent", [input.llm.endpoint]) if {
	llm_request
	not input.llm.endpoint in llm_grant.endpoints
} else := sprintf("denied: model %v is not granted to this agent", [object.get(input.llm, "model", "(none)")]) if {
	llm_request
	not input.llm.model in llm_grant.models
} else := sprintf("denied: max_tokens %d is above this agent's %d", [input.llm.max_tokens, llm_grant.max_tokens]) if {
	llm_request
	not llm_max_tokens_ok
} else := sprintf("denied: tool %s is not granted to this agent", [input.mcp.tool]) if {
	tool_call
	not granted_tools[input.mcp.tool]
} else := sprintf("denied: argument %s of %s must be one of %v", [name, input.mcp.tool, granted_tools[input.mcp.tool][name]]) if {
	tool_call
	name := min(bad_argument)
} else := sprintf("denied: %s (%s) on collection %s is not granted to this identity", [input.vectordb.operation, input.vectordb.action, input.vectordb.collection]) if {
	vectordb_request
	input.vectordb.collection
} else := sprintf("denied: %s (%s) is not granted to this identity", [input.vectordb.operation, input.vectordb.action]) if {
	vectordb_request
} else := sprintf("denied: MCP method %s is not allowed by this policy", [input.mcp.method]) if {
	input.mcp.method
}
