"""A small deterministic text embedding (hashed bag of words, 256 dims,
L2-normalised) shared by the ingest and the query side, so the scenario needs
no model download. Chroma does the real nearest-neighbour search."""
import hashlib
import math
import re

DIM = 256


def embed(text: str) -> list[float]:
    v = [0.0] * DIM
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big")
        v[h % DIM] += 1.0
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]
