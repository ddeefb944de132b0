"""An MCP server of the L7 tests: the official `mcp` SDK (MCPServer,
streamable HTTP) with a harmless tool and a dangerous one. Each call it runs
is printed (`CALL <tool> <arguments>`), so a test can show that a denied
call never reached it.

usage: mcp_tools.py PORT [json]   (json: answer POSTs with JSON, not SSE)
"""
import json
import sys

from mcp.server.mcpserver import MCPServer

port = int(sys.argv[1])
json_response = len(sys.argv) > 2 and sys.argv[2] == "json"
server = MCPServer("docs")


@server.tool()
def search_docs(query: str, collection: str = "support-docs") -> str:
    """Search a collection of documents."""
    print("CALL search_docs %s" % json.dumps({"query": query, "collection": collection}), flush=True)
    return "found %r in %s" % (query, collection)


@server.tool()
def delete_doc(doc_id: str) -> str:
    """Delete a document for good."""
    print("CALL delete_doc %s" % json.dumps({"doc_id": doc_id}), flush=True)
    return "deleted %s" % doc_id


print("MCP server listening on %d (json_response=%s)" % (port, json_response), flush=True)
server.run(transport="streamable-http", host="0.0.0.0", port=port, json_response=json_response)
