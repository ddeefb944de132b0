"""The MCP server of the scenario: the official `mcp` Python SDK (MCPServer,
streamable HTTP) exposing two tools backed by a Chroma vector database:
`search_docs` (a vector search in one collection) and the dangerous
`delete_doc`. On start it ingests two collections into Chroma: the support
documentation and internal runbooks. It knows nothing about enforcer: who may
call which tool, on which collection, is the node agent's policy.

usage: mcp_server.py PORT CHROMA_HOST CHROMA_PORT
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chromadb  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402

from embed import embed, embed_all  # noqa: E402

port, chroma_host, chroma_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

DOCS = {
    "reset-password": "To reset a password, open Settings, choose Security and click Reset password; a link is emailed.",
    "billing": "Invoices are issued on the first day of each month and can be downloaded from the Billing page.",
    "api-keys": "API keys are created under Settings, Developer; each key can be scoped and revoked at any time.",
    "sso": "Single sign-on supports SAML and OIDC; an administrator configures it under Settings, Identity.",
}

RUNBOOKS = {
    "db-failover": "Database failover: promote the standby with pg_ctl promote, then repoint the service address.",
    "key-rotation": "Signing keys rotate quarterly; the previous key stays trusted for seven days after rotation.",
}

COLLECTIONS = {"support-docs": DOCS, "internal-runbooks": RUNBOOKS}

for attempt in range(120):
    try:
        client = chromadb.HttpClient(host=chroma_host, port=chroma_port)
        collections = {}
        for name, docs in COLLECTIONS.items():
            c = client.get_or_create_collection(name, embedding_function=None)
            c.upsert(ids=list(docs), documents=list(docs.values()), embeddings=embed_all(list(docs.values())))
            collections[name] = c
        print("INGESTED %d documents into chroma at %s:%d" % (len(DOCS) + len(RUNBOOKS), chroma_host, chroma_port),
              flush=True)
        break
    except Exception as e:  # the vector DB may not be up yet
        print("waiting for chroma: %s" % type(e).__name__, flush=True)
        time.sleep(0.5)
else:
    sys.exit("chroma never became reachable")

server = MCPServer("support-docs")


def collection_named(name):
    if name not in collections:
        raise ValueError("no collection %r (there are: %s)" % (name, ", ".join(collections)))
    return collections[name]


@server.tool()
def search_docs(query: str, collection: str = "support-docs", k: int = 2) -> str:
    """Search a documentation collection; returns the best matching passages."""
    r = collection_named(collection).query(query_embeddings=[embed(query)], n_results=k)
    docs = r["documents"][0]
    print("SEARCH %s %r -> %d documents" % (collection, query, len(docs)), flush=True)
    return "\n".join(docs)


@server.tool()
def delete_doc(doc_id: str, collection: str = "support-docs") -> str:
    """Delete a document from a collection (irreversible)."""
    c = collection_named(collection)
    if not c.get(ids=[doc_id])["ids"]:
        raise ValueError("no document %r in %s" % (doc_id, collection))
    c.delete(ids=[doc_id])
    print("DELETE %s %s" % (collection, doc_id), flush=True)
    return "deleted %s from %s" % (doc_id, collection)


print("MCP server listening on %d" % port, flush=True)
server.run(transport="streamable-http", host="0.0.0.0", port=port)
