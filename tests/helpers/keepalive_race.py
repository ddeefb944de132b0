"""A server of the L7 tests whose keep-alive timeout fires as the next
request arrives: on each connection it answers the first request
(keep-alive, a body naming the connection), then closes the connection
without reading the second one, which the kernel answers with a reset
(unread data). Every HTTP/1.1 server with an idle timeout (uvicorn: 5 s)
does this when a request and its timer cross. The third connection answers
its second request with bytes that are not HTTP instead; the fourth closes
0.3 s after its first answer (an idle timeout with nothing in flight); the
later ones answer every request. Prints `ANSWER <conn> <method> <path>`,
`DROP <conn> <method> <path>` (the dropped request read with MSG_PEEK, so
it stays unread), `GARBAGE <conn> <method> <path>` and `IDLE-CLOSE <conn>`.

With `fresh-close`, the first connection is closed at once instead, before
any request (a server's header or idle timeout on a connection that never
sent one; prints `FRESH-CLOSE 1`), and every later one answers every
request.

With `hint`, every answer says `Keep-Alive: timeout=2` and every
connection answers every request (the server itself never closes one).

With `idle`, every connection answers every request, but a request that
arrives 5 s or more after the connection's last answer is dropped unread
(`DROP`), as it is when uvicorn's idle timeout (5 s, counted from the last
answer, no `Keep-Alive` hint) fires as the request arrives: the moment of
that race, made certain.

With `close`, every answer says `Connection: close` and its connection is
closed after it (a server that ends connections after N requests, or one
that keeps none).

usage: keepalive_race.py PORT [fresh-close | hint | idle | close]
"""
import select
import socket
import sys
import time

from serving import read_head, serve_each


def read_request(conn):
    data = read_head(conn)
    if data is None:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        d = conn.recv(4096)
        if not d:
            return None
        body += d
    method, path = lines[0].split(" ")[:2]
    return method, path


HINT = len(sys.argv) > 2 and sys.argv[2] == "hint"
CLOSE = len(sys.argv) > 2 and sys.argv[2] == "close"


def answer(conn, n, method, path):
    body = ("conn %d %s %s" % (n, method, path)).encode()
    hint = b"Keep-Alive: timeout=2\r\n" if HINT else b""
    if CLOSE:
        hint = b"Connection: close\r\n"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s" % (hint, len(body), body))
    print("ANSWER %d %s %s" % (n, method, path), flush=True)


FRESH_CLOSE = len(sys.argv) > 2 and sys.argv[2] == "fresh-close"
IDLE = len(sys.argv) > 2 and sys.argv[2] == "idle"


def serve_idle(conn, n):
    last = None
    while True:
        select.select([conn], [], [])
        peeked = conn.recv(4096, socket.MSG_PEEK)
        if not peeked:
            return
        if last is not None and time.monotonic() - last >= 5.0:
            line = peeked.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            print("DROP %d %s %s" % (n, line[0], line[1] if len(line) > 1 else "?"), flush=True)
            return
        req = read_request(conn)
        if req is None:
            return
        answer(conn, n, *req)
        last = time.monotonic()


def serve(conn, n):
    with conn:
        if IDLE:
            serve_idle(conn, n)
            return
        if CLOSE:
            req = read_request(conn)
            if req is not None:
                answer(conn, n, *req)
            return
        if FRESH_CLOSE or HINT:
            if FRESH_CLOSE and n == 1:
                print("FRESH-CLOSE 1", flush=True)
                return
            while True:
                req = read_request(conn)
                if req is None:
                    return
                answer(conn, n, *req)
        first = read_request(conn)
        if first is None:
            return
        answer(conn, n, *first)
        if n == 4:
            # An idle timeout that fires with nothing in flight: a clean close.
            time.sleep(0.3)
            print("IDLE-CLOSE %d" % n, flush=True)
            return
        if n >= 5:
            while True:
                req = read_request(conn)
                if req is None:
                    return
                answer(conn, n, *req)
        select.select([conn], [], [])
        peeked = conn.recv(4096, socket.MSG_PEEK)
        if not peeked:
            return
        line = peeked.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        what = "%d %s %s" % (n, line[0], line[1] if len(line) > 1 else "?")
        if n == 3:
            read_request(conn)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            print("GARBAGE " + what, flush=True)
            return
        print("DROP " + what, flush=True)
        # Closed with the request unread: the kernel sends a reset.


serve_each(sys.argv[1], serve, ready=True)
