"""An OPA bundle server: serves the bundle file at any path with an ETag
(304 on If-None-Match). With CERT, KEY and TOKEN it speaks HTTPS and serves
only requests carrying the bearer token (401 otherwise). Prints the status
of each answer, one per line.

usage: bundle_server.py BUNDLE PORT [CERT KEY TOKEN]"""
import hashlib
import http.server
import ssl
import sys

bundle, port = sys.argv[1], int(sys.argv[2])
tls = sys.argv[3:6]
token = tls[2] if tls else None


class H(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body=None, tag=None):
        self.send_response(status)
        if tag:
            self.send_header("ETag", tag)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body is not None:
            self.wfile.write(body)
        print(status, flush=True)

    def do_GET(self):
        if token is not None and self.headers.get("Authorization") != "Bearer " + token:
            return self.answer(401)
        body = open(bundle, "rb").read()
        tag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == tag:
            return self.answer(304)
        self.answer(200, body, tag)

    def log_message(self, *a):
        pass


srv = http.server.HTTPServer(("127.0.0.1", port), H)
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls[0], tls[1])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
