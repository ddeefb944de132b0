# Serves each connection the bytes it asks for: a line "<count> <bytes/s>"
# in, then <count> bytes of a fixed pattern at that rate (0: at once).
import socket, sys, threading, time

PATTERN = bytes(range(256)) * 256  # 64 KiB


def serve(conn):
    with conn:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return
            line += chunk
        count, rate = (int(x) for x in line.split())
        started, sent = time.monotonic(), 0
        while sent < count:
            n = min(len(PATTERN), count - sent)
            conn.sendall(PATTERN[:n])
            sent += n
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)


listener = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
