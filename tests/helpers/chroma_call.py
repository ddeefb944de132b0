"""Uses a Chroma server with the official `chromadb` client, as an agent or
an ingest job would, and prints one JSON line per call: what the client
returned, or the exception it raised (class and message).

usage: chroma_call.py HOST PORT CALL...
  CALL is JSON: {"do": ..., "collection": name, "database": db, ...}
    create       get_or_create the collection (metadata-free, no embedding function)
    add          ids, embeddings, documents
    query        embedding, n
    get | count | peek | delete (ids) | get_collection | list
    rename       to: the new name
    create_database
    raw          method, path, json: a request as sent, not through the client
                 ({"status", "body"}); the path may name "{id:NAME}", replaced
                 by that collection's id in the default database
"""
import json
import sys
import urllib.request

import chromadb
from chromadb.config import Settings

host, port = sys.argv[1], int(sys.argv[2])
ids = {}


def client(call):
    return chromadb.HttpClient(host=host, port=port, database=call.get("database", "default_database"),
                               settings=Settings(anonymized_telemetry=False))


def collection(call):
    return client(call).get_collection(call["collection"], embedding_function=None)


def raw(call):
    path = call["path"]
    for name, cid in ids.items():
        path = path.replace("{id:%s}" % name, cid)
    data = json.dumps(call["json"]).encode() if "json" in call else None
    req = urllib.request.Request("http://%s:%d%s" % (host, port, path), data=data, method=call["method"],
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return {"status": r.status, "body": json.loads(r.read() or b"null")}
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            body = json.loads(text)
        except ValueError:
            body = text.decode(errors="replace")
        return {"status": e.code, "body": body}


def run(call):
    do = call["do"]
    if do == "raw":
        return raw(call)
    if do == "create_database":
        chromadb.AdminClient(Settings(chroma_api_impl="chromadb.api.fastapi.FastAPI", chroma_server_host=host,
                                      chroma_server_http_port=port, anonymized_telemetry=False)
                             ).create_database(call["name"])
        return {}
    if do == "list":
        return {"collections": sorted(c.name for c in client(call).list_collections())}
    if do == "create":
        c = client(call).get_or_create_collection(call["collection"], embedding_function=None)
        ids[call["collection"]] = str(c.id)
        return {"id": str(c.id)}
    c = collection(call)
    ids[c.name] = str(c.id)
    if do == "get_collection":
        return {"id": str(c.id), "name": c.name}
    if do == "add":
        c.add(ids=call["ids"], embeddings=call["embeddings"], documents=call["documents"])
        return {}
    if do == "query":
        r = c.query(query_embeddings=[call["embedding"]], n_results=call.get("n", 1))
        return {"ids": r["ids"][0], "documents": r["documents"][0]}
    if do == "get":
        r = c.get(ids=call.get("ids"))
        return {"ids": r["ids"], "documents": r["documents"]}
    if do == "peek":
        return {"ids": c.peek()["ids"]}
    if do == "count":
        return {"count": c.count()}
    if do == "delete":
        c.delete(ids=call["ids"])
        return {}
    if do == "rename":
        c.modify(name=call["to"])
        return {}
    raise ValueError("unknown call %r" % do)


for arg in sys.argv[3:]:
    call = json.loads(arg)
    out = {"do": call["do"]}
    try:
        out.update(run(call))
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - report what the client raised
        out.update(ok=False, error=type(e).__name__, message=str(e))
    print(json.dumps(out), flush=True)
