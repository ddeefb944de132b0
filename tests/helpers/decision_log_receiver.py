"""An OPA-compatible decision-log service for tests: accepts POST /logs with
a gzip'd JSON array of events, as OPA's decision-log plugin sends them, and
checks the format. The first FAIL requests are answered 500 (to exercise
retries). Prints `EVENT <json>` per event received, `BAD <why>` for a
request that breaks the format, `FAILED` for a request answered 500.

usage: decision_log_receiver.py PORT FAIL"""
import gzip
import http.server
import json
import sys

port, fail = int(sys.argv[1]), int(sys.argv[2])
seen = {"requests": 0}

REQUIRED = ("decision_id", "labels", "timestamp", "path", "input")


class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        seen["requests"] += 1
        if seen["requests"] <= fail:
            self.send_response(500)
            self.end_headers()
            print("FAILED", flush=True)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        why = None
        if self.path != "/logs":
            why = "path " + self.path
        elif self.headers.get("Content-Encoding") != "gzip":
            why = "Content-Encoding " + str(self.headers.get("Content-Encoding"))
        elif self.headers.get("Content-Type") != "application/json":
            why = "Content-Type " + str(self.headers.get("Content-Type"))
        events = []
        if why is None:
            try:
                events = json.loads(gzip.decompress(body))
            except Exception as e:
                why = "body: %s" % e
        if why is None and not isinstance(events, list):
            why = "not a JSON array"
        for e in events if why is None else []:
            missing = [k for k in REQUIRED if k not in e]
            if missing:
                why = "event lacks %s" % missing
            elif "result" in e and "error" in e:
                why = "an event with an error has a result"
            elif set(e["labels"]) < {"id", "version"}:
                why = "labels lack id/version"
        if why is not None:
            self.send_response(400)
            self.end_headers()
            print("BAD", why, flush=True)
            return
        for e in events:
            print("EVENT", json.dumps(e), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
