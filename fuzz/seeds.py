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


for name in sys.argv[1:] or ["config", "selectors", "certificate", "http_request", "hbone"]:
    globals()[name]()
