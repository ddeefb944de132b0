# input: {"vals": [1, 1, 2]}
# input: {"vals": [3]}
# input: {}
package enforcer.authz

import rego.v1

s := {v | some v in input.vals}

allow if count(s) == 2
