"""A server of the L7 tests that accepts an HTTP/1.1 upgrade and then fails:
it answers `101 Switching Protocols`, sends `hello` on the upgraded
connection and aborts it (SO_LINGER 0: an RST) — a tunnelled peer that
breaks. Prints `UPGRADED <path>` for each.

usage: upgrade_abort.py PORT
"""
import socket
import struct
import sys
import threading
import time


def serve(conn):
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            d = conn.recv(4096)
            if not d:
                return
            head += d
        path = head.split(b" ", 2)[1].decode(errors="replace")
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-test\r\nConnection: Upgrade\r\n\r\n")
        print("UPGRADED %s" % path, flush=True)
        conn.sendall(b"hello")
        time.sleep(0.5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
