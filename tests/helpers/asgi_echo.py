"""An HTTP server of the L7 tests served by hypercorn (PyPI): HTTP/1.1, h2c
with prior knowledge, and WebSocket. Answers every HTTP request with JSON
naming the HTTP version, method, path, Host (`host` header, else
`:authority`) and body length it received, printing
`REQ <version> <method> <path> <length> <host>`; echoes WebSocket messages
(`echo: <text>`), printing `WS OPEN <path>` and `WS MSG <text>`.

usage: asgi_echo.py PORT
"""
import asyncio
import json
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        n = 0
        while True:
            m = await receive()
            n += len(m.get("body", b""))
            if not m.get("more_body"):
                break
        hosts = [v.decode() for k, v in scope["headers"] if k in (b"host", b":authority")]
        host = ",".join(hosts) if hosts else None
        print("REQ %s %s %s %d %s" % (scope["http_version"], scope["method"], scope["path"], n, host), flush=True)
        body = json.dumps({"http_version": scope["http_version"], "method": scope["method"],
                           "path": scope["path"], "len": n, "host": host}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        print("WS OPEN %s" % scope["path"], flush=True)
        while True:
            m = await receive()
            if m["type"] != "websocket.receive":
                break
            text = m.get("text") or ""
            print("WS MSG %s" % text, flush=True)
            await send({"type": "websocket.send", "text": "echo: " + text})


config = Config()
config.bind = ["0.0.0.0:%d" % int(sys.argv[1])]
config.accesslog = None
asyncio.run(serve(app, config))
