"""What the L7 tests' small servers share: the accept loop and reading a
request's head."""
import socket
import threading


def listener(port, backlog=64):
    """A TCP listener on 0.0.0.0:PORT."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(backlog)
    return s


def serve_each(port, serve, ready=False):
    """Accepts connections on PORT for ever, each served by serve(conn, n)
    on a thread of its own, n counting them from 1; prints READY first if
    asked."""
    s = listener(port)
    if ready:
        print("READY", flush=True)
    n = 0
    while True:
        conn, _ = s.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n), daemon=True).start()


def read_head(conn):
    """Bytes up to and past the end of a request's head (the first bytes
    of its body may follow it); None if the connection ends first."""
    data = b""
    while b"\r\n\r\n" not in data:
        d = conn.recv(4096)
        if not d:
            return None
        data += d
    return data
