# input: {"o": {"a": {"b": 1, "c": 2}, "d": 3}}
# input: {"o": {"a": 1}}
package enforcer.authz

import rego.v1

allow if {
	json.filter(input.o, ["a/b"]) == {"a": {"b": 1}}
	json.remove(input.o, ["a/c", "d"]) == {"a": {"b": 1}}
	json.patch(input.o, [{"op": "add", "path": "/e", "value": 4}]).e == 4
	object.union(input.o, {"d": 4}).d == 4
	object.remove(input.o, ["d"]) == {"a": {"b": 1, "c": 2}}
	object.filter(input.o, ["d"]) == {"d": 3}
}
