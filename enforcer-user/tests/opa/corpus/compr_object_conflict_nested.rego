# input: {"vals": [{"k": "a", "v": 1}, {"k": "a", "v": 2}]}
# input: {"vals": [{"k": "a", "v": 1}, {"k": "b", "v": 2}]}
# input: {"vals": []}
package enforcer.authz

import rego.v1

allow if {
	o := {x.k: x.v | some x in input.vals}
	not o.a == 2
}
