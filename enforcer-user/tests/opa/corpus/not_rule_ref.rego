# `not r` for a rule: no argument to bind; true when r is undefined.
# input: {}
# input: {"x": 1}
# input: {"x": 2}
package enforcer.authz

import rego.v1

r if input.x == 1

blocked contains "x" if input.x == 2

allow if {
	not r
	not blocked["x"]
}
