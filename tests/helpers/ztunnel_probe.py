"""An HBONE client that behaves as Istio ztunnel's does (DESIGN §1.4): TLS 1.3
with ALPN h2 and NO server name, the client certificate of an Istio-form
identity (spiffe://<td>/ns/<ns>/sa/<sa>) from the trust domain's CA, the
server's chain verified against that CA, then on ONE connection a CONNECT
to podIP:port for each port given, with the headers ztunnel sends
(baggage, forwarded, traceparent), and an HTTP/1.0 GET through each tunnel.

Prints `SERVER <uri SAN>` after the handshake (or `HANDSHAKE_FAILED <why>`),
then per port `PORT <port> <status> <first line of the HTTP answer>`
(status: the CONNECT's :status, or `RESET <code>`).

usage: ztunnel_probe.py HOST CA_CERT CA_KEY CLIENT_ID PORT [PORT...]"""
import datetime
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events

from svid import leaf, load_ca, now, write_pair

host, ca_cert_path, ca_key_path, client_id = sys.argv[1:5]
ports = [int(p) for p in sys.argv[5:]]
ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
hour = datetime.timedelta(hours=1)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(ca_cert_path)
ctx.set_alpn_protocols(["h2"])
ctx.load_cert_chain(*write_pair(*leaf(ca_cert, ca_key, [client_id], now - hour, now + hour)))

raw = socket.create_connection((host, 15008), timeout=10)
try:
    # server_hostname=None: no SNI extension in the ClientHello.
    tls = ctx.wrap_socket(raw, server_hostname=None)
    tls.sendall(b"")
except (ssl.SSLError, OSError) as e:
    print("HANDSHAKE_FAILED", e, flush=True)
    sys.exit(0)
cert = tls.getpeercert() or {}
uris = [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"]
print("SERVER", " ".join(uris) or "none", flush=True)

conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
tls.sendall(conn.data_to_send())


def pump(until):
    """Reads frames until `until(events)` says done; returns all events."""
    seen = []
    while not until(seen):
        try:
            data = tls.recv(65536)
        except OSError:
            break
        if not data:
            break
        seen.extend(conn.receive_data(data))
        out = conn.data_to_send()
        if out:
            tls.sendall(out)
    return seen


for port in ports:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (":method", "CONNECT"),
        (":authority", "%s:%d" % (host, port)),
        ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=agents,k8s.deployment.name=support"),
        ("forwarded", "for=%s" % tls.getsockname()[0]),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ])
    tls.sendall(conn.data_to_send())

    def answered(events):
        return any(isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset))
                   and e.stream_id == sid for e in events)

    events = pump(answered)
    status = "none"
    for e in events:
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
            status = dict(e.headers).get(b":status", b"?").decode()
        if isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
            status = "RESET %s" % e.error_code
    if status != "200":
        print("PORT", port, status, "-", flush=True)
        continue
    conn.send_data(sid, b"GET /ztunnel-probe HTTP/1.0\r\nHost: x\r\n\r\n")
    tls.sendall(conn.data_to_send())
    body = b""

    def got_line(events):
        global body
        for e in events[len(got_line.seen):]:
            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                body += e.data
                conn.acknowledge_received_data(e.flow_controlled_length, sid)
        got_line.seen = list(events)
        return b"\r\n" in body or any(
            isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
            for e in events)

    got_line.seen = []
    pump(got_line)
    first = body.split(b"\r\n", 1)[0].decode(errors="replace") or "-"
    print("PORT", port, status, first, flush=True)
