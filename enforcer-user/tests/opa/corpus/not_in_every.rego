# input: {"vals": [{"n": "a"}, {"n": "b"}]}
# input: {"vals": [{"n": "a"}, {"m": "b"}]}
# input: {"vals": [{"n": "xa"}]}
# input: {"vals": []}
package enforcer.authz

import rego.v1

allow if {
	every v in input.vals {
		not startswith(v.n, "x")
	}
}
