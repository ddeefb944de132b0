"""A stand-in for the Kubernetes API server's pods list and watch, as kube-rs
(kube::runtime::watcher) uses them: no API server can be installed on these
machines. It serves only

  GET /api/v1/pods?fieldSelector=spec.nodeName=N[&limit=..][&continue=..]
      a PodList with metadata.resourceVersion
  GET /api/v1/pods?fieldSelector=...&watch=true&resourceVersion=RV
      [&timeoutSeconds=S][&allowWatchBookmarks=true]
      the events after RV, one JSON object per line ({"type": "ADDED" |
      "MODIFIED" | "DELETED" | "BOOKMARK", "object": ...}), kept open until
      timeoutSeconds or until the client goes; a resourceVersion older than
      this server keeps gives 410 Gone, as the API does

and answers 401 without `Authorization: Bearer TOKEN`, 404 otherwise. The
pods are the *.json files of PODS_DIR (one pod object each, its
spec.nodeName set), read again every 100 ms; each change is an event.
Prints `LIST <node>` and `WATCH <node> <rv>` per request, `EVENT <type>
<uid>` per event.

usage: k8s_api.py PORT PODS_DIR TOKEN"""
import glob
import http.server
import json
import os
import sys
import threading
import time
import urllib.parse

port, pods_dir, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]

lock = threading.Condition()
state = {"rv": 1, "pods": {}, "events": []}  # events: (rv, type, pod)


def scan():
    while True:
        now = {}
        for path in sorted(glob.glob(os.path.join(pods_dir, "*.json"))):
            try:
                with open(path) as f:
                    pod = json.load(f)
                now[pod["metadata"]["uid"]] = pod
            except (OSError, ValueError, KeyError):
                continue  # half-written; next scan
        with lock:
            old = state["pods"]
            changes = []
            for uid, pod in now.items():
                if uid not in old:
                    changes.append(("ADDED", pod))
                elif old[uid] != pod:
                    changes.append(("MODIFIED", pod))
            for uid, pod in old.items():
                if uid not in now:
                    changes.append(("DELETED", pod))
            for kind, pod in changes:
                state["rv"] += 1
                pod = json.loads(json.dumps(pod))
                pod["metadata"]["resourceVersion"] = str(state["rv"])
                state["events"].append((state["rv"], kind, pod))
                print("EVENT", kind, pod["metadata"]["uid"], flush=True)
            if changes:
                state["pods"] = {uid: p for uid, p in now.items()}
                lock.notify_all()
        time.sleep(0.1)


def on_node(pod, node):
    return node is None or pod.get("spec", {}).get("nodeName") == node


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if self.headers.get("Authorization") != "Bearer " + token:
            return self.reply(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "Unauthorized", "code": 401, "message": "Unauthorized"})
        if url.path != "/api/v1/pods":
            return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "NotFound", "code": 404, "message": url.path})
        node = None
        sel = q.get("fieldSelector", "")
        if sel.startswith("spec.nodeName="):
            node = sel[len("spec.nodeName="):]
        if q.get("watch") in ("true", "1"):
            return self.watch(node, int(q.get("resourceVersion") or "0"), int(q.get("timeoutSeconds") or "290"))
        print("LIST", node, flush=True)
        with lock:
            items = [p for p in state["pods"].values() if on_node(p, node)]
            rv = state["rv"]
        self.reply(200, {"kind": "PodList", "apiVersion": "v1",
                         "metadata": {"resourceVersion": str(rv)}, "items": items})

    def watch(self, node, since, timeout):
        print("WATCH", node, since, flush=True)
        with lock:
            oldest = state["events"][0][0] if state["events"] else state["rv"] + 1
            if since and since < oldest - 1 and state["events"]:
                return self.reply(410, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "Expired", "code": 410, "message": "too old resource version"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.time() + timeout
        sent = since
        try:
            while time.time() < deadline:
                with lock:
                    pending = [e for e in state["events"] if e[0] > sent]
                    if not pending:
                        lock.wait(timeout=1.0)
                        pending = [e for e in state["events"] if e[0] > sent]
                for rv, kind, pod in pending:
                    sent = rv
                    if not on_node(pod, node):
                        continue
                    line = (json.dumps({"type": kind, "object": pod}) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            return

    def log_message(self, *args):
        pass


threading.Thread(target=scan, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
