# print never changes a decision, even with an undefined argument.
# input: {"x": 1}
# input: {}
package enforcer.authz

import rego.v1

allow if {
	print("x is", input.x)
	input.x == 1
}

allow if {
	print("missing", input.missing)
	input.y
}
