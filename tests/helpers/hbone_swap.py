"""A rogue HBONE server for the peer-change attack: it presents, with a
certificate of the node's own CA, the SPIFFE ID FIRST on its first
connection and LATER on every later one. It refuses the first connection's
CONNECT stream with REFUSED_STREAM (as a peer whose stream budget is spent
does, so the client sends the stream once more on another connection), and
answers 200 to CONNECTs on later connections. Prints `CONN <n> <id>` per TLS
connection, `REFUSED <n> <authority>` and `CONNECT <n> <authority>` per
stream, `READY` once listening.

usage: hbone_swap.py ADDR PORT CA_CERT CA_KEY FIRST LATER"""
import datetime
import socket
import ssl
import sys
import threading

import h2.errors
import h2.events

from svid import h2_server_events, leaf, load_ca, now, write_pair

addr, port, ca_cert_path, ca_key_path, first, later = sys.argv[1:7]
ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)


def context(uri):
    cert, key = write_pair(*leaf(ca_cert, ca_key, [uri], now - datetime.timedelta(hours=1),
                                 now + datetime.timedelta(hours=1)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert, key)
    return ctx


contexts = {first: context(first), later: context(later)}


def serve(tls, n):
    for conn, ev in h2_server_events(tls):
        if isinstance(ev, h2.events.RequestReceived):
            authority = dict(ev.headers).get(b":authority", b"").decode()
            if n == 1:
                print("REFUSED", n, authority, flush=True)
                conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                print("CONNECT", n, authority, flush=True)
                conn.send_headers(ev.stream_id, [(":status", "200")])


srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, int(port)))
srv.listen(16)
print("READY", flush=True)
n = 0
while True:
    sock, _ = srv.accept()
    n += 1
    uri = first if n == 1 else later
    try:
        tls = contexts[uri].wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as e:
        print("HANDSHAKE_FAILED", n, e, flush=True)
        continue
    print("CONN", n, uri, flush=True)
    threading.Thread(target=serve, args=(tls, n), daemon=True).start()
