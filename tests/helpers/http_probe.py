"""HTTP clients of the L7 tests. Prints one JSON object per line.

usage:
  http_probe.py keepalive HOST PORT METHOD:PATH ...
      the requests in turn on one connection (http.client); each line has
      the status, the answer and whether the connection was the same
  http_probe.py gate HOST PORT PATH GATEFILE
      GET PATH, then waits for GATEFILE to exist, then GET PATH again on the
      same connection
  http_probe.py abort HOST PORT PATH
      POSTs PATH announcing 100000 bytes, sends 2000, then resets the
      connection (a client that dies half-way through its request)
  http_probe.py h2 HOST PORT PATH ...
      GETs each PATH in turn over one h2c connection with prior knowledge
      (httpx, HTTP/2 only); each line has the HTTP version, status and answer
  http_probe.py raw HOST PORT HEX [N]
      sends the bytes (with N bytes of `a` in place of the first `@`),
      reads until the server closes (or 5 s) and prints the status line,
      whether the connection was closed, and whether by a reset
"""
import http.client
import json
import os
import socket
import sys
import time


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read().decode(errors="replace")
    return {"status": r.status, "body": data}


mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "keepalive":
    conn = http.client.HTTPConnection(host, port, timeout=10)
    first = None
    for spec in sys.argv[4:]:
        method, path = spec.split(":", 1)
        body = None
        headers = {"Authorization": "Bearer TOPSECRET-TOKEN-42"}
        if method in ("POST", "PUT"):
            body = json.dumps({"size": 1}).encode()
            headers["Content-Type"] = "application/json"
        out = request(conn, method, path, body, headers)
        first = first or conn.sock
        out["same_connection"] = conn.sock is first
        print(json.dumps(out), flush=True)
elif mode == "gate":
    path, gate = sys.argv[4], sys.argv[5]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    print(json.dumps(request(conn, "GET", path)), flush=True)
    first = conn.sock
    deadline = time.time() + 30
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.05)
    out = request(conn, "GET", path)
    out["same_connection"] = conn.sock is first
    print(json.dumps(out), flush=True)
elif mode == "abort":
    import struct
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n" % sys.argv[4]).encode() + b"a" * 2000)
    time.sleep(1.5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print(json.dumps({"aborted": True}), flush=True)
elif mode == "h2":
    import httpx
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        for path in sys.argv[4:]:
            r = client.get("http://%s:%d%s" % (host, port, path))
            print(json.dumps({"http_version": r.http_version, "status": r.status_code, "body": r.text}), flush=True)
elif mode == "raw":
    s = socket.create_connection((host, port), timeout=5)
    data = bytes.fromhex(sys.argv[4])
    if len(sys.argv) > 5:
        data = data.replace(b"@", b"a" * int(sys.argv[5]), 1)
    s.sendall(data)
    data = b""
    closed = False
    reset = False
    try:
        while True:
            d = s.recv(65536)
            if not d:
                closed = True
                break
            data += d
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
        reset = True
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    print(json.dumps({"status_line": line, "closed": closed, "reset": reset,
                      "answer": data.decode(errors="replace")}), flush=True)
