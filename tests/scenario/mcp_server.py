"""The MCP server of the scenario: the official `mcp` Python SDK (MCPServer,
streamable HTTP) exposing a `search_docs` tool backed by a Chroma vector
database. On start it ingests the support documentation into Chroma.

usage: mcp_server.py PORT CHROMA_HOST CHROMA_PORT
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chromadb  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402

from embed import embed  # noqa: E402

port, chroma_host, chroma_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

DOCS = {
    "reset-password": "To reset a password, open Settings, choose Security and click Reset password; a link is emailed.",
    "billing": "Invoices are issued on the first day of each month and can be downloaded from the Billing page.",
    "api-keys": "API keys are created under Settings, Developer; each key can be scoped and revoked at any time.",
    "sso": "Single sign-on supports SAML and OIDC; an administrator configures it under Settings, Identity.",
}

for attempt in range(120):
    try:
        client = chromadb.HttpClient(host=chroma_host, port=chroma_port)
        collection = client.get_or_create_collection("support-docs", embedding_function=None)
        collection.upsert(ids=list(DOCS), documents=list(DOCS.values()), embeddings=[embed(t) for t in DOCS.values()])
        print("INGESTED %d documents into chroma at %s:%d" % (len(DOCS), chroma_host, chroma_port), flush=True)
        break
    except Exception as e:  # the vector DB may not be up yet
        print("waiting for chroma: %s" % type(e).__name__, flush=True)
        time.sleep(0.5)
else:
    sys.exit("chroma never became reachable")

server = MCPServer("support-docs")


@server.tool()
def search_docs(query: str, k: int = 2) -> str:
    """Search the support documentation; returns the best matching passages."""
    r = collection.query(query_embeddings=[embed(query)], n_results=k)
    docs = r["documents"][0]
    print("SEARCH %r -> %d documents" % (query, len(docs)), flush=True)
    return "\n".join(docs)


print("MCP server listening on %d" % port, flush=True)
server.run(transport="streamable-http", host="0.0.0.0", port=port)
