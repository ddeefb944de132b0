# `==` and `=` keep their direct operands: `not input.x == 1` is true when
# input.x is undefined, in OPA as in enforcer.
# input: {}
# input: {"x": 1}
# input: {"x": 2}
package enforcer.authz

import rego.v1

allow if {
	not input.x == 1
	not input.x = 1
}
