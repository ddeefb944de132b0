# Bound locals are not rewritten; lookups by them are.
# data: {"deny": {"bob": true}}
# input: {"user": "bob"}
# input: {"user": "alice"}
# input: {}
package enforcer.authz

import rego.v1

allow if {
	u := input.user
	not data.deny[u]
}

allow if {
	some u in ["carol"]
	not data.deny[u]
	not input.user
}
