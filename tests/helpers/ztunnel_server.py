"""An HBONE server that behaves as Istio ztunnel's does for the address it
serves: it picks its certificate by the address, never by the TLS server
name (it reads the name only to print it), requires a client certificate
from the trust domain's CA, speaks HTTP/2 (ALPN h2) and answers each
`CONNECT ip:port` with 200, then answers the HTTP request it carries with
`HTTP/1.1 200 OK` and a body naming the port.

Prints `READY` once listening, `CONN sni=<name or none> client=<URI SAN>` per
TLS connection, `CONNECT <authority>` per stream.

usage: ztunnel_server.py ADDR PORT CA_CERT CA_KEY SERVER_ID"""
import datetime
import socket
import ssl
import sys
import threading

import h2.events

from svid import h2_server_events, leaf, load_ca, now, write_pair

addr, port, ca_cert_path, ca_key_path, server_id = sys.argv[1:6]
ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
hour = datetime.timedelta(hours=1)

# Handshakes run one at a time on the accepting thread.
last_sni = [None]


def remember_sni(_sock, name, _ctx):
    last_sni[0] = name


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["h2"])
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(ca_cert_path)
ctx.load_cert_chain(*write_pair(*leaf(ca_cert, ca_key, [server_id], now - hour, now + hour)))
# Called with the name, if any; the certificate stays the same whatever it is.
ctx.sni_callback = remember_sni


def serve(tls):
    ports = {}
    for conn, ev in h2_server_events(tls):
        if isinstance(ev, h2.events.RequestReceived):
            authority = dict(ev.headers).get(b":authority", b"").decode()
            print("CONNECT", authority, flush=True)
            ports[ev.stream_id] = authority.rsplit(":", 1)[-1]
            conn.send_headers(ev.stream_id, [(":status", "200")])
        elif isinstance(ev, h2.events.DataReceived):
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if b"\r\n\r\n" in ev.data:
                body = ("port %s\n" % ports.get(ev.stream_id, "?")).encode()
                conn.send_data(ev.stream_id, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body, end_stream=True)


srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, int(port)))
srv.listen(16)
print("READY", flush=True)
while True:
    sock, _ = srv.accept()
    last_sni[0] = None
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as e:
        print("HANDSHAKE_FAILED", e, flush=True)
        continue
    cert = tls.getpeercert() or {}
    uris = [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]
    print("CONN sni=%s client=%s" % (last_sni[0] or "none", " ".join(uris) or "none"), flush=True)
    threading.Thread(target=serve, args=(tls,), daemon=True).start()
