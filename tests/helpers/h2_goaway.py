"""An h2c (prior knowledge) server of the L7 tests that shuts its first
two connections down as their second request arrives: it answers the
connection's first request, then sends GOAWAY (NO_ERROR, last stream id 1)
for the second, unprocessed, and closes — as an HTTP/2 server does on its
idle timeout or a graceful restart. Later connections answer every
request. Prints `ANSWER <conn> <method> <path>` and `GOAWAY <conn> <method>
<path>`.

usage: h2_goaway.py PORT
"""
import sys
import time

import h2.config
import h2.connection
import h2.events

from serving import serve_each

def text(v):
    return v.decode() if isinstance(v, bytes) else v


def serve(sock, n):
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    answered = 0
    with sock:
        while True:
            data = sock.recv(65535)
            if not data:
                return
            for ev in conn.receive_data(data):
                if not isinstance(ev, h2.events.RequestReceived):
                    continue
                h = {text(k): text(v) for k, v in ev.headers}
                what = "%d %s %s" % (n, h[":method"], h[":path"])
                # Each line is printed before what it tells is sent: the
                # request sent again on the next connection is answered
                # (and printed by that connection's thread) only after.
                if n <= 2 and answered >= 1:
                    print("GOAWAY " + what, flush=True)
                    conn.close_connection(error_code=0, last_stream_id=answered * 2 - 1)
                    sock.sendall(conn.data_to_send())
                    time.sleep(0.2)
                    return
                print("ANSWER " + what, flush=True)
                body = ("conn " + what).encode()
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(ev.stream_id, body, end_stream=True)
                answered += 1
            out = conn.data_to_send()
            if out:
                sock.sendall(out)


serve_each(sys.argv[1], serve)
