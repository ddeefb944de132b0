"""Evaluates policy x input cases with real OPA (PyPI `opa-golib-python-bindings`,
which embeds OPA v1.20 as a library), for enforcer's differential test.

stdin:  {"policies": {id: {"modules": {path: rego},
                          "data": [[dotted path or "", {...}], ...]}},
         "cases": [{"policy": id, "input": {...}}]}
stdout: [{"allow": <value of data.enforcer.authz.allow> | null,
          "defined": bool, "error": "<code>: <message>" | null}], one per case.
"""
import json
import sys

try:
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError
except ImportError:
    sys.exit("the differential test needs real OPA: python3 -m pip install "
             "--ignore-requires-python opa-golib-python-bindings (cargo xtask setup does)")

QUERY = "enforcer.authz.allow"


def main():
    req = json.load(sys.stdin)
    engines = {}
    load_errors = {}
    for pid, pol in req["policies"].items():
        e = OpaEngine()
        e.print_handler = lambda msg, loc: None
        try:
            for path, src in pol["modules"].items():
                e.add_policy(path, src)
            for path, value in pol["data"]:
                e.add_data(value, path)
            engines[pid] = e
        except OpaError as exc:
            load_errors[pid] = f"{exc.code}: {exc.message}"
    out = []
    for case in req["cases"]:
        pid = case["policy"]
        if pid in load_errors:
            out.append({"allow": None, "defined": False, "error": load_errors[pid]})
            continue
        try:
            v = engines[pid].eval_document(QUERY, case["input"])
            out.append({"allow": v, "defined": True, "error": None})
        except OpaUndefinedError:
            out.append({"allow": None, "defined": False, "error": None})
        except OpaError as exc:
            out.append({"allow": None, "defined": False,
                        "error": f"{exc.code}: {exc.message}"})
    json.dump(out, sys.stdout)


main()
