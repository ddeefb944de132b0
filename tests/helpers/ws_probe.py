"""A WebSocket client of the L7 tests (the `websockets` package): opens
URL, sends each MESSAGE and reads its answer. Prints one JSON object: the
answers, or the HTTP status and body the handshake was refused with.

usage: ws_probe.py URL [MESSAGE ...]
"""
import json
import sys

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

out = {}
try:
    with connect(sys.argv[1], open_timeout=10, close_timeout=5) as ws:
        out["answers"] = []
        for message in sys.argv[2:]:
            ws.send(message)
            out["answers"].append(ws.recv(timeout=10))
except InvalidStatus as e:
    out["refused"] = e.response.status_code
    out["body"] = e.response.body.decode(errors="replace") if e.response.body else ""
print(json.dumps(out), flush=True)
