# `in` is a call (internal.member_2).
# input: {}
# input: {"x": 1}
# input: {"x": 3}
# input: {"vals": [1, 2]}
# input: {"vals": [3]}
package enforcer.authz

import rego.v1

allow if {
	not input.x in {1, 2}
	not 1 in input.vals
}
