# input: {"vals": ["a", "b"]}
# input: {"vals": ["a"]}
# input: {"vals": []}
package enforcer.authz

import rego.v1

o[k] := v if {
	some v in input.vals
	k := "key"
}

allow if not o.key == "b"
