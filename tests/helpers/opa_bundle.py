"""Builds an OPA bundle as `opa build` lays it out (entries named with a
leading slash, a .manifest) and signs it in OPA's format (`opa sign`): a
.signatures.json holding one JWT whose payload lists every file with its
SHA-256 digest, structured files (data.json, data.yaml, .manifest) hashed in
OPA's canonical form. Written from OPA's documentation of the format,
independently of enforcer's verifier, so the two check each other.

usage: opa_bundle.py SRC_DIR OUT.tar.gz --revision R [--roots a,b]
                     [--key PRIVATE.pem --kid ID] [--tamper FILE]
--tamper appends an allow-everything rule to FILE after signing."""
import argparse
import hashlib
import io
import json
import os
import tarfile

import jwt  # PyJWT


def canonical(value):
    """OPA's structured hash input: sorted keys, no whitespace, Go's string
    escaping without HTML escapes."""
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(k, ensure_ascii=False) + ":" + canonical(value[k]) for k in sorted(value)
        ) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def digest(name, data):
    base = name.rsplit("/", 1)[-1]
    if base in ("data.json", ".manifest"):
        data = canonical(json.loads(data)).encode()
    return hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--revision", required=True)
    ap.add_argument("--roots", default="")
    ap.add_argument("--key")
    ap.add_argument("--kid", default="release")
    ap.add_argument("--tamper")
    a = ap.parse_args()

    files = {}
    for root, _, names in os.walk(a.src):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, a.src).replace(os.sep, "/")] = open(p, "rb").read()
    manifest = {"revision": a.revision}
    if a.roots:
        manifest["roots"] = a.roots.split(",")
    files[".manifest"] = json.dumps(manifest).encode()

    if a.key:
        payload = {"files": [
            {"name": name, "hash": digest(name, data), "algorithm": "SHA-256"}
            for name, data in sorted(files.items())
        ]}
        token = jwt.encode(payload, open(a.key, "rb").read(), algorithm="RS256",
                           headers={"kid": a.kid})
        files[".signatures.json"] = json.dumps({"signatures": [token]}).encode()

    if a.tamper:
        files[a.tamper] += b"\nallow if true\n"

    with tarfile.open(a.out, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo("/" + name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


main()
