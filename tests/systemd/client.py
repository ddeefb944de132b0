# A workload in enforced.slice: one long paced download, and short
# connections one after another while it runs; each checked byte for byte.
# Writes /run/client-started after the download's first bytes and
# /run/client.json at the end.
import hashlib, json, socket, sys, threading, time

host, port, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
PATTERN = bytes(range(256)) * 256


def expected(n):
    h = hashlib.sha256()
    while n > 0:
        h.update(PATTERN[: min(n, len(PATTERN))])
        n -= len(PATTERN)
    return h.hexdigest()


def fetch(n, rate, on_first=None):
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"%d %d\n" % (n, rate))
        h, got = hashlib.sha256(), 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            if got == 0 and on_first:
                on_first()
            h.update(chunk)
            got += len(chunk)
        return got, h.hexdigest()


result = {"download": None, "short_ok": 0, "short_failed": [], "short_wrong": 0}
done = threading.Event()


def download():
    try:
        got, digest = fetch(count, rate, lambda: open("/run/client-started", "w").close())
        result["download"] = {"bytes": got, "sha256": digest, "expected": expected(count)}
    except Exception as e:
        result["download"] = {"error": repr(e)}
    done.set()


threading.Thread(target=download).start()
want = expected(1024)
while not done.is_set():
    try:
        got, digest = fetch(1024, 0)
        if got == 1024 and digest == want:
            result["short_ok"] += 1
        else:
            result["short_wrong"] += 1
    except Exception as e:
        result["short_failed"].append(repr(e))
    time.sleep(0.01)
with open("/run/client.json.tmp", "w") as f:
    json.dump(result, f)
import os
os.rename("/run/client.json.tmp", "/run/client.json")
