# input: {"vals": [1, 2, 3]}
# input: {"vals": [1, -2]}
# input: {"vals": []}
# input: {"vals": {"a": 1, "b": 5}}
package enforcer.authz

import rego.v1

allow if {
	every v in input.vals {
		v > 0
	}
	some i, v in input.vals
	v == 1
	i != null
}

allow if {
	every k, v in input.vals {
		is_string(k)
		v < 10
	}
	count(input.vals) > 1
}
