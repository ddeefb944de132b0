"""An HTTP/1.1 server of the L7 tests (Python's http.server, keep-alive):
answers every method with JSON naming the method, path, body length,
`Content-Encoding` (null without one) and body (as text, when under 4 KiB)
it received, and prints `REQ <method> <path> <length>` for each. A body that
ends early is reported as `RESET <path>` (the connection was reset) or
`SHORT <path> <length>` (it was closed as if complete).

usage: http_echo.py PORT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = self.rfile.read(n) if n else b""
        except ConnectionResetError:
            print("RESET %s" % self.path, flush=True)
            raise
        if len(body) < n:
            print("SHORT %s %d" % (self.path, len(body)), flush=True)
            return
        print("REQ %s %s %d" % (self.command, self.path, len(body)), flush=True)
        out = json.dumps({
            "method": self.command,
            "path": self.path,
            "len": len(body),
            "coding": self.headers.get("Content-Encoding"),
            "body": body.decode("utf-8", "replace") if len(body) < 4096 else None,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    address_family = __import__("socket").AF_INET6


Server(("::", int(sys.argv[1])), Echo).serve_forever()
