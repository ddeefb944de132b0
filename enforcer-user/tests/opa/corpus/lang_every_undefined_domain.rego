# every over an undefined domain is undefined in OPA, true over an empty one.
# input: {}
# input: {"vals": []}
# input: {"vals": [1]}
package enforcer.authz

import rego.v1

allow if {
	every v in input.vals {
		v == 2
	}
}
