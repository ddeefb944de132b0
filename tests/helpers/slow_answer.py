"""A server of the L7 tests that answers each request 3 s after it came,
unless its connection ends first: it prints `GOT <request line>`, then
`CLIENT-GONE EOF|RESET <n>` (the connection ended before the answer) or
`ANSWERED <n>`, n counting the connections. One connection at a time.

usage: slow_answer.py PORT
"""
import select
import socket
import sys

from serving import listener, read_head

s = listener(sys.argv[1], 16)
print("READY", flush=True)
n = 0
while True:
    conn, _ = s.accept()
    n += 1
    with conn:
        data = read_head(conn)
        if data is None:
            continue
        print("GOT %s" % data.split(b"\r\n", 1)[0].decode("latin-1"), flush=True)
        readable, _, _ = select.select([conn], [], [], 3.0)
        if readable:
            try:
                what = "EOF" if not conn.recv(1, socket.MSG_PEEK) else "DATA"
            except ConnectionResetError:
                what = "RESET"
            print("CLIENT-GONE %s %d" % (what, n), flush=True)
            continue
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass
        print("ANSWERED %d" % n, flush=True)
