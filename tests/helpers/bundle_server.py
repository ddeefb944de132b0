"""An OPA bundle server over HTTPS: serves the bundle file at any path with
an ETag (304 on If-None-Match), only to requests carrying the bearer token
(401 otherwise). Prints one line per request: status and the path.

usage: bundle_server.py BUNDLE CERT KEY PORT TOKEN"""
import hashlib
import http.server
import ssl
import sys

bundle, cert, key, port, token = sys.argv[1:6]


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer " + token:
            self.send_response(401)
            self.end_headers()
            print("401", self.path, flush=True)
            return
        body = open(bundle, "rb").read()
        tag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == tag:
            self.send_response(304)
            self.end_headers()
            print("304", self.path, flush=True)
            return
        self.send_response(200)
        self.send_header("ETag", tag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print("200", self.path, flush=True)

    def log_message(self, *a):
        pass


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = http.server.HTTPServer(("127.0.0.1", int(port)), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
