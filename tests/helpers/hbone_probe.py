"""Connects to an enforcer's HBONE port with a client certificate of a chosen
kind, to check that the agent rejects what it must. Prints one line:
'handshake ok' or 'handshake failed: ...'.

usage: hbone_probe.py MODE HOST PORT CA_CERT CA_KEY
MODE: valid | other-ca | expired | foreign-td | two-sans | no-cert | plain-http | random
"""
import datetime
import os
import socket
import ssl
import sys

from svid import hbone_context, leaf, load_ca, new_ca, now, trust_domain, write_pair

mode, host, port, ca_cert_path, ca_key_path = sys.argv[1:6]
port = int(port)

ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
td = trust_domain(ca_cert)
good_id = "spiffe://%s/probe" % td
hour = datetime.timedelta(hours=1)

s = socket.create_connection((host, port), timeout=5)
if mode in ("plain-http", "random"):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if mode == "plain-http" else os.urandom(512))
    try:
        data = s.recv(100)
        print("server answered %d bytes then closed" % len(data))
    except OSError as e:
        print("handshake failed: %s" % e)
    sys.exit(0)

pair = None
if mode == "valid":
    pair = leaf(ca_cert, ca_key, [good_id], now - hour, now + hour)
elif mode == "other-ca":
    rca, rkey = new_ca(td)
    pair = leaf(rca, rkey, [good_id], now - hour, now + hour)
elif mode == "expired":
    pair = leaf(ca_cert, ca_key, [good_id], now - 3 * hour, now - 2 * hour)
elif mode == "foreign-td":
    rca, rkey = new_ca("evil.example.org")
    pair = leaf(rca, rkey, ["spiffe://evil.example.org/probe"], now - hour, now + hour)
elif mode == "two-sans":
    pair = leaf(ca_cert, ca_key, [good_id, "spiffe://%s/second" % td], now - hour, now + hour)
elif mode != "no-cert":
    sys.exit("unknown mode " + mode)

ctx = hbone_context(write_pair(*pair) if pair else None)
try:
    t = ctx.wrap_socket(s, server_hostname="8080.port.enforcer")
    # TLS 1.3: the server judges the client certificate after the client
    # finished; its verdict arrives with the first read.
    t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = t.recv(100)
    print("handshake ok" if data else "handshake failed: closed")
except (ssl.SSLError, OSError) as e:
    print("handshake failed: %s" % e)
