"""Attacks on an enforcer's HBONE port with a certificate from the node's own
CA (an authenticated peer) or with none, speaking real HTTP/2 (PyPI's h2).
Prints one line per observation for the test to check.

usage: hbone_attack.py MODE HOST PORT CA_CERT CA_KEY ARG...
  expiring DST SECS   certificate valid for SECS more seconds: one CONNECT
                      before notAfter, one after; reports GOAWAY
  streams DST N       N concurrent CONNECT streams on one connection
  headers DST SIZE    one CONNECT carrying SIZE bytes of headers, then a
                      normal CONNECT on another connection
  cycle FIRST N       N ClientHellos, each naming another port, no certificate
"""
import datetime
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from svid import hbone_context, leaf, load_ca, now, trust_domain, write_pair

# RFC 9113 §6.8: after a GOAWAY, streams up to its last stream id still
# complete. python-h2 closes the whole connection instead; keep it open (the
# GOAWAY is still reported as ConnectionTerminated) and let the server refuse.
_process_input = h2.connection.H2ConnectionStateMachine.process_input


def _after_goaway_streams_complete(self, input_):
    if input_ == h2.connection.ConnectionInputs.RECV_GOAWAY:
        return []
    return _process_input(self, input_)


h2.connection.H2ConnectionStateMachine.process_input = _after_goaway_streams_complete

mode, host, port, ca_cert_path, ca_key_path = sys.argv[1:6]
args = sys.argv[6:]
port = int(port)


def client_cert(not_after):
    """Files of an SVID of this trust domain's CA, valid until not_after."""
    ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
    uri = "spiffe://%s/attacker" % trust_domain(ca_cert)
    return write_pair(*leaf(ca_cert, ca_key, [uri], now - datetime.timedelta(hours=1), not_after))


def tls(dst_port, pair):
    s = socket.create_connection((host, port), timeout=10)
    return hbone_context(pair).wrap_socket(s, server_hostname="%d.port.enforcer" % dst_port)


class H2:
    def __init__(self, sock):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.status, self.resets, self.goaway = {}, {}, None

    def flush(self):
        self.sock.sendall(self.conn.data_to_send())

    def connect(self, dst, extra=()):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", dst)] + list(extra))
        self.flush()
        return sid

    def pump(self, seconds, until=lambda: False):
        end = time.time() + seconds
        while time.time() < end and not until():
            self.sock.settimeout(max(0.05, end - time.time()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ssl.SSLError, OSError):
                return False
            if not data:
                return False
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                # Frames after the peer's GOAWAY (its PING) once the library
                # has closed the connection.
                if self.goaway is None and self.conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                    self.goaway = time.time()
                return False
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = dict(ev.headers).get(b":status", b"?").decode()
                elif isinstance(ev, h2.events.StreamReset):
                    self.resets[ev.stream_id] = int(ev.error_code)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    if self.goaway is None:
                        self.goaway = time.time()
            self.flush()
        return True


if mode == "expiring":
    dst, secs = args[0], float(args[1])
    not_after = (now + datetime.timedelta(seconds=secs)).replace(microsecond=0)
    c = H2(tls(int(dst.rsplit(":", 1)[1]), client_cert(not_after)))
    first = c.connect(dst)
    c.pump(3, lambda: first in c.status or first in c.resets)
    print("FIRST", c.status.get(first, "reset %s" % c.resets.get(first)), flush=True)
    expiry = not_after.timestamp()
    c.pump(max(0.0, expiry - time.time()) + 1.5)
    if c.goaway:
        print("GOAWAY %.2f s after notAfter" % (c.goaway - expiry), flush=True)
    try:
        second = c.connect(dst)
        open_ = c.pump(3, lambda: second in c.status or second in c.resets)
        print("SECOND", c.status.get(second, "reset %s" % c.resets.get(second) if second in c.resets
                                     else ("no answer" if open_ else "connection closed")))
    except Exception as e:  # h2 refuses to open a stream after GOAWAY
        print("SECOND refused locally:", type(e).__name__)
elif mode == "streams":
    dst, n = args[0], int(args[1])
    c = H2(tls(int(dst.rsplit(":", 1)[1]), client_cert(now + datetime.timedelta(hours=1))))
    c.pump(1)  # the server's SETTINGS
    # Ignore the advertised limit, as an attacker would: the library counts
    # open streams against it before sending.
    h2.connection.H2Connection.open_outbound_streams = property(lambda self: 0)
    ids = [c.connect(dst) for _ in range(n)]
    c.pump(10, lambda: all(i in c.status or i in c.resets for i in ids))
    ok = sum(1 for i in ids if c.status.get(i) == "200")
    refused = sum(1 for i in ids if i in c.resets)
    print("OK %d REFUSED %d" % (ok, refused))
elif mode == "headers":
    dst, size = args[0], int(args[1])
    pair = client_cert(now + datetime.timedelta(hours=1))
    c = H2(tls(int(dst.rsplit(":", 1)[1]), pair))
    c.pump(1)
    c.conn.max_outbound_frame_size = 16384
    try:
        sid = c.connect(dst, [("x-pad-%d" % i, "a" * 4000) for i in range(size // 4000)])
        alive = c.pump(5, lambda: sid in c.status or sid in c.resets)
        print("BIG", c.status.get(sid, "reset %s" % c.resets.get(sid) if sid in c.resets
                               else ("no answer" if alive else "connection closed")))
    except OSError as e:
        print("BIG connection closed by the server while sending:", type(e).__name__)
    other = H2(tls(int(dst.rsplit(":", 1)[1]), pair))
    oid = other.connect(dst)
    other.pump(5, lambda: oid in other.status or oid in other.resets)
    print("OTHER", other.status.get(oid, "no answer"))
elif mode == "cycle":
    first, n = int(args[0]), int(args[1])
    seen = {}
    for p in range(first, first + n):
        try:
            tls(p, None).close()
            what = "handshake ok"
        except (ssl.SSLError, OSError) as e:
            what = getattr(e, "reason", None) or type(e).__name__
        seen[what] = seen.get(what, 0) + 1
    for k, v in sorted(seen.items()):
        print("SEEN %s %d" % (k, v))
else:
    sys.exit("unknown mode " + mode)
