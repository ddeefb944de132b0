"""Endless transfers for the fault tests; each side prints how its
connection ended, one line: `EOF <bytes>` (a clean close), `RESET <bytes>`
(ECONNRESET or EPIPE: the peer reset it) or `TIMEOUT <bytes>`.

  stream.py serve-download PORT   on each connection: read "GO", then send until it fails
  stream.py serve-upload PORT     on each connection: read until it ends
  stream.py download HOST PORT    send "GO", read until it ends
  stream.py upload HOST PORT      send until it fails
  stream.py serve-bytes PORT N    on each connection: read "GO", send N bytes, close
  stream.py serve-slow PORT N     the same at about 1.3 MB/s
  stream.py upload-bytes HOST PORT N   send N bytes, half-close, wait for the end
  stream.py serve-random PORT N SECS  on each connection: read "GO", send N random
                                   bytes spread over SECS seconds, print `SENT <n> <sha256>`
  stream.py download-hash HOST PORT   send "GO", read until it ends; the end line
                                   carries the sha256 of what arrived: `EOF <n> <sha256>`
  stream.py serve-upload-halfclosed PORT   on each connection: half-close at once
                                   (nothing to send), then read until it ends
  stream.py serve-bytes-late PORT N FLAG   on each connection: read "GO", print `READY`,
                                   wait for the file FLAG, send N bytes, close
  stream.py upload-late HOST PORT N FLAG   read until the server's half-close, print
                                   `READY`, wait for the file FLAG, send N bytes, close

The receiving side prints `STARTED` once it has read 1 MiB, so a test
knows the transfer is under way end to end before it breaks something
(the sender's count says little: a megabyte fits in the socket buffers).
"""
import hashlib
import os
import socket
import sys
import threading
import time

CHUNK = b"x" * 65536


def ended(kind, n):
    print(kind, n, flush=True)


def send_forever(s, started=None):
    n = 0
    try:
        while True:
            s.sendall(CHUNK)
            n += len(CHUNK)
            if started is not None and n >= 1 << 20 and not started[0]:
                started[0] = True
                print("STARTED", flush=True)
            time.sleep(0.002)
    except (ConnectionResetError, BrokenPipeError):
        ended("RESET", n)
    except socket.timeout:
        ended("TIMEOUT", n)


def read_to_end(s, started=None, digest=None):
    n = 0
    tail = lambda: f" {digest.hexdigest()}" if digest is not None else ""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                print(f"EOF {n}{tail()}", flush=True)
                return
            if digest is not None:
                digest.update(d)
            n += len(d)
            if started is not None and n >= 1 << 20 and not started[0]:
                started[0] = True
                print("STARTED", flush=True)
    except ConnectionResetError:
        ended("RESET", n)
    except socket.timeout:
        ended("TIMEOUT", n)


def send_bytes(s, n):
    sent = 0
    while sent < n:
        part = CHUNK[: min(len(CHUNK), n - sent)]
        s.sendall(part)
        sent += len(part)


def serve(port, handle):
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(16)
    while True:
        c, _ = srv.accept()
        c.settimeout(30)
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def serve_download(c):
    if c.recv(2):
        send_forever(c)
    c.close()


def serve_upload(c):
    read_to_end(c, [False])
    c.close()


def main():
    mode = sys.argv[1]
    if mode == "serve-download":
        serve(int(sys.argv[2]), serve_download)
    elif mode == "serve-bytes":
        n = int(sys.argv[3])

        def serve_bytes(c):
            if c.recv(2):
                send_bytes(c, n)
            c.close()

        serve(int(sys.argv[2]), serve_bytes)
    elif mode == "serve-slow":
        n = int(sys.argv[3])

        def serve_slow(c):
            if c.recv(2):
                sent = 0
                while sent < n:
                    part = CHUNK[: min(len(CHUNK), n - sent)]
                    c.sendall(part)
                    sent += len(part)
                    time.sleep(0.05)
            c.close()

        serve(int(sys.argv[2]), serve_slow)
    elif mode == "serve-random":
        n, secs = int(sys.argv[3]), float(sys.argv[4])

        def serve_random(c):
            if c.recv(2):
                digest, sent = hashlib.sha256(), 0
                start = time.monotonic()
                while sent < n:
                    part = os.urandom(min(65536, n - sent))
                    c.sendall(part)
                    digest.update(part)
                    sent += len(part)
                    # Paced: `sent` bytes are due at sent/n of `secs`.
                    ahead = start + secs * sent / n - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                print("SENT", sent, digest.hexdigest(), flush=True)
            c.close()

        serve(int(sys.argv[2]), serve_random)
    elif mode == "serve-upload":
        serve(int(sys.argv[2]), serve_upload)
    elif mode == "serve-bytes-late":
        n, flag = int(sys.argv[3]), sys.argv[4]

        def serve_bytes_late(c):
            if c.recv(2):
                print("READY", flush=True)
                while not os.path.exists(flag):
                    time.sleep(0.01)
                send_bytes(c, n)
            c.close()

        serve(int(sys.argv[2]), serve_bytes_late)
    elif mode == "serve-upload-halfclosed":

        def serve_upload_halfclosed(c):
            c.shutdown(socket.SHUT_WR)
            read_to_end(c)
            c.close()

        serve(int(sys.argv[2]), serve_upload_halfclosed)
    else:
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=20)
        started = [False]
        if mode == "download":
            s.sendall(b"GO")
            read_to_end(s, started)
        elif mode == "download-hash":
            s.sendall(b"GO")
            read_to_end(s, started, hashlib.sha256())
        elif mode == "upload":
            send_forever(s, started)
        elif mode == "upload-late":
            if s.recv(1):
                sys.exit("the server sent something")
            print("READY", flush=True)
            while not os.path.exists(sys.argv[5]):
                time.sleep(0.01)
            send_bytes(s, int(sys.argv[4]))
            s.close()
            print("SENT", sys.argv[4], flush=True)
        elif mode == "upload-bytes":
            send_bytes(s, int(sys.argv[4]))
            s.shutdown(socket.SHUT_WR)
            read_to_end(s)
        else:
            sys.exit(f"unknown mode {mode}")


main()
