"""An MCP server of the L7 tests: the official `mcp` SDK (MCPServer,
streamable HTTP) with a harmless tool and a dangerous one. Each call it runs
is printed (`CALL <tool> <arguments>`), so a test can show that a denied
call never reached it.

usage: mcp_tools.py PORT [json|nan|gzip|gzip-json|gzip-always]
  json: answer POSTs with JSON, not SSE
  gzip, gzip-json: SSE (or JSON) answers compressed, SSE streams too, when
        the client accepts gzip (Starlette's GZipMiddleware, as a server
        behind a compressing proxy); the SDK's client (httpx) accepts it
  gzip-always: SSE answers compressed even when the client asks for
        `identity` (a server that ignores Accept-Encoding)
  nan:  SSE answers, and every tool in a list answer carries "x-score": NaN
        (JSON that the SDK's client parses and serde_json refuses: a server
        that sends it must not get a list past enforcer's filter)
"""
import json
import sys

from mcp.server.mcpserver import MCPServer

port = int(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "sse"
json_response = mode in ("json", "gzip-json")
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


print("MCP server listening on %d (mode=%s)" % (port, mode), flush=True)
if mode == "nan":
    import uvicorn

    inner = server.streamable_http_app(host="0.0.0.0")

    async def app(scope, receive, send):
        async def send_nan(msg):
            if msg.get("type") == "http.response.start":
                # The body may grow: framed by chunks, not its old length.
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() != b"content-length"]
                msg = dict(msg, headers=headers)
            body = msg.get("body", b"") if msg.get("type") == "http.response.body" else b""
            if b'"inputSchema"' in body:
                msg = dict(msg, body=body.replace(b'"inputSchema"', b'"x-score":NaN,"inputSchema"'))
            await send(msg)

        await inner(scope, receive, send_nan)

    uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning")
elif mode.startswith("gzip"):
    import uvicorn
    from starlette.middleware.gzip import GZipMiddleware

    inner = GZipMiddleware(server.streamable_http_app(host="0.0.0.0"), minimum_size=0, exclude_content_types=())

    async def app(scope, receive, send):
        if mode == "gzip-always" and scope.get("type") == "http":
            asked = b", ".join(v for k, v in scope["headers"] if k.lower() == b"accept-encoding")
            print("FORCED gzip, asked for:", asked.decode("latin-1"), flush=True)
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
            scope = dict(scope, headers=headers + [(b"accept-encoding", b"gzip")])
        await inner(scope, receive, send)

    uvicorn.run(app, host="0.0.0.0", port=port, log_level="warning")
else:
    server.run(transport="streamable-http", host="0.0.0.0", port=port, json_response=json_response)
