# input: {"vals": ["a", "b"]}
# input: {"vals": []}
package enforcer.authz

import rego.v1

allow if {
	not input.vals[-1]
	input.vals[1] == "b"
	"a" < "b"
	"B" < "a"
}
