"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/.
Run from the repository root: python3 fuzz/seeds.py (cargo xtask fuzz runs
it when a target's corpus is empty). Uses the `h2` package for HTTP/2
frames."""
import json
import os
import pathlib
import subprocess
import sys

import h2.config
import h2.connection

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def config():
    put("config", "systemd", (ROOT / "deploy/systemd/enforcer.toml").read_text())
    manifest = (ROOT / "deploy/kubernetes/enforcer.yaml").read_text()
    body = manifest.split("enforcer.toml: |\n", 1)[1].split("---", 1)[0]
    put("config", "daemonset", "\n".join(l[4:] for l in body.splitlines()))
    put("config", "full", """node_name = "n1"
[capture]
cgroup = "/sys/fs/cgroup/enforced.slice"
ports = ["80", "8000-8100"]
exclude_ports = [22]
cidrs = ["10.0.0.0/8", "fd00::/8"]
exclude_cidrs = ["10.1.0.0/16"]
[identity]
trust_domain = "ai.example.org"
state_dir = "/var/lib/enforcer"
[[identity.entries]]
spiffe_id = "spiffe://ai.example.org/agent"
selectors = ["systemd:unit:agent.service", "unix:uid:1000"]
[mesh]
cidrs = ["10.10.0.0/24"]
inbound = [{ports = [8000], mode = "strict"}]
[policy]
source = "/etc/enforcer/policies"
mode = "enforce"
[[l7.destinations]]
ports = [8001]
protocol = "mcp"
[runtime]
drain_secs = 5
after_handover = "wait"
""")


def selectors():
    for i, s in enumerate([
        "/system.slice/llm.service",
        "/enforced.slice/agent.service",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app.scope",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_7980_1a2b_3c4d5e6f7a8b.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        "/docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        "8080.port.enforcer",
        "65535.port.enforcer",
    ]):
        put("selectors", f"seed{i}", s)


def certificate():
    tmp = ROOT / "fuzz" / "target" / "seed-ca"
    tmp.mkdir(parents=True, exist_ok=True)
    bin_ = ROOT / "target" / "debug" / "enforcer"
    if bin_.exists() and not (tmp / "ca.pem").exists():
        subprocess.run([str(bin_), "ca", "init", "--trust-domain", "fuzz.example.org", "--dir", str(tmp)], check=True, capture_output=True)
    if (tmp / "ca.pem").exists():
        der = subprocess.run(["openssl", "x509", "-in", str(tmp / "ca.pem"), "-outform", "DER"], check=True, capture_output=True).stdout
        put("certificate", "ca", der)


def http_request():
    reqs = {
        "get": b"GET /v1/models?x=1&y=%20z HTTP/1.1\r\nHost: llm:8000\r\nAuthorization: Bearer k\r\n\r\n",
        "chat": b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
        "chunked": b"POST /api/v2/tenants/t/databases/d/collections/c1/query HTTP/1.1\r\nHost: chroma\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
        "form": b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\na=1&b=2&a=%41",
        "upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "connect": b"CONNECT 10.0.0.3:443 HTTP/1.1\r\nHost: 10.0.0.3:443\r\n\r\n",
        "pipelined": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    }
    chat = json.dumps({"model": "gpt-4o", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).encode()
    reqs["chat"] = (reqs["chat"] % len(chat)) + chat
    mcp = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "search", "arguments": {"q": "x"}}}).encode()
    reqs["mcp"] = b"POST /mcp HTTP/1.1\r\nHost: mcp\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nContent-Length: %d\r\n\r\n" % len(mcp) + mcp
    batch = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "file:///x"}}, {"jsonrpc": "2.0", "method": "notifications/initialized"}]).encode()
    reqs["mcp-batch"] = b"POST /mcp HTTP/1.1\r\nHost: mcp\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(batch) + batch
    add = json.dumps({"ids": ["a"], "documents": ["d"], "embeddings": [[0.1, 0.2]]}).encode()
    reqs["chroma-add"] = b"POST /api/v2/tenants/default_tenant/databases/default_database/collections/7c0a/add HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n" % len(add) + add
    for k, v in reqs.items():
        put("http_request", k, v)
    # h2c with prior knowledge
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "POST"), (":path", "/v1/embeddings"), (":scheme", "http"), (":authority", "llm"), ("content-type", "application/json")])
    c.send_data(1, json.dumps({"model": "e", "input": "x"}).encode(), end_stream=True)
    put("http_request", "h2c", c.data_to_send())


def hbone():
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")])
    c.send_data(1, b"GET / HTTP/1.1\r\n\r\n")
    c.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.3:8080")], end_stream=True)
    c.send_headers(5, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")], end_stream=True)
    c.ping(b"12345678")
    c.reset_stream(1)
    data = c.data_to_send()
    # The target prepends the client preface itself.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    put("hbone", "connects", data[len(preface):] if data.startswith(preface) else data)


def l7_answer():
    """The first byte picks the request (enforcer-user/src/l7/http.rs
    fuzz::ASKED): 0 chat, 1 chat streamed, 2 responses streamed,
    3 embeddings, 4 MCP tools/list, 5 MCP resources/list, 6 MCP GET stream,
    7 Chroma query, 8 Chroma collections. The rest is the server's answer."""
    import gzip
    import zlib

    def http(status, ctype, body, extra=b"", chunked=False):
        head = b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\n" % (status, ctype) + extra
        if chunked:
            parts = [body[i:i + 40] for i in range(0, len(body), 40)]
            data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            return head + b"Transfer-Encoding: chunked\r\n\r\n" + data
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                                    "finish_reason": "stop"}], "usage": usage}).encode()
    put("l7_answer", "chat", b"\x00" + http(200, b"application/json", chat))
    put("l7_answer", "chat-gzip", b"\x00" + http(200, b"application/json", gzip.compress(chat), b"Content-Encoding: gzip\r\n"))
    put("l7_answer", "chat-deflate-chunked", b"\x00" + http(200, b"application/json", zlib.compress(chat), b"Content-Encoding: deflate\r\n", True))
    put("l7_answer", "chat-error", b"\x00" + http(429, b"application/json", b'{"error": {"message": "slow down"}}'))
    events = b"".join(b"data: %s\n\n" % json.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}], "usage": None}).encode()
        for w in ["hel", "lo", " there"])
    events += b"data: %s\n\n" % json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}).encode()
    events += b"data: [DONE]\n\n"
    put("l7_answer", "chat-stream", b"\x01" + http(200, b"text/event-stream", events, chunked=True))
    put("l7_answer", "chat-stream-gzip", b"\x01" + http(200, b"text/event-stream", gzip.compress(events), b"Content-Encoding: gzip\r\n", True))
    resp = b"event: response.output_text.delta\ndata: %s\n\n" % json.dumps({"type": "response.output_text.delta", "delta": "hi"}).encode()
    resp += b"event: response.completed\ndata: %s\n\n" % json.dumps(
        {"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 1}}}).encode()
    put("l7_answer", "responses-stream", b"\x02" + http(200, b"text/event-stream", resp, chunked=True))
    emb = json.dumps({"object": "list", "data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
    put("l7_answer", "embeddings", b"\x03" + http(200, b"application/json", emb))
    tools = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "search_docs", "inputSchema": {"type": "object"}},
        {"name": "delete_doc", "inputSchema": {"type": "object"}}]}}
    put("l7_answer", "mcp-tools-json", b"\x04" + http(200, b"application/json", json.dumps(tools).encode()))
    put("l7_answer", "mcp-tools-sse", b"\x04" + http(200, b"text/event-stream",
        b"event: message\ndata: %s\n\n" % json.dumps(tools).encode(), b"Mcp-Session-Id: s1\r\n", True))
    put("l7_answer", "mcp-tools-br-missing", b"\x04" + http(200, b"application/json", b"\x0b\x02\x80{}\x03", b"Content-Encoding: br\r\n"))
    res = {"jsonrpc": "2.0", "id": 7, "result": {"resources": [{"uri": "file:///a", "name": "a"}]}}
    put("l7_answer", "mcp-resources", b"\x05" + http(200, b"application/json", json.dumps(res).encode()))
    put("l7_answer", "mcp-get-stream", b"\x06" + http(200, b"text/event-stream",
        b"data: %s\n\n" % json.dumps(tools).encode() + b": keep-alive\n\n", chunked=True))
    query = json.dumps({"ids": [["a"]], "documents": [["d"]], "distances": [[0.1]]}).encode()
    put("l7_answer", "chroma-query", b"\x07" + http(200, b"application/json", query))
    cols = json.dumps([{"id": "7c0a1e5e-0000-4000-8000-000000000001", "name": "docs"}]).encode()
    put("l7_answer", "chroma-collections", b"\x08" + http(200, b"application/json", cols))


def llm_chunk():
    # Streamed chat and completions chunks (one SSE event's data each).
    put("llm_chunk", "chat", json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"},
                                                "logprobs": None, "finish_reason": None}],
        "usage": None}, separators=(",", ":")).encode())
    put("llm_chunk", "usage", json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}, separators=(",", ":")).encode())
    put("llm_chunk", "tools", json.dumps({
        "id": "c", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": None, "refusal": "no", "reasoning_content": "hm\u00e9",
                                   "tool_calls": [{"index": 0, "id": "t", "type": "function",
                                                   "function": {"name": "f", "arguments": "{\"q\":1}"}}]}},
            {"index": 1, "text": " done"}],
        "usage": None, "x_sent_ns": 123}, separators=(",", ":")).encode())


for name in sys.argv[1:] or ["config", "selectors", "certificate", "http_request", "hbone", "l7_answer", "llm_chunk"]:
    globals()[name]()
