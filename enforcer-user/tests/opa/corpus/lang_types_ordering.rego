# OPA compares across types: null < false < true < numbers < strings < arrays < objects < sets.
# input: {"x": null}
# input: {"x": 1}
# input: {"x": "1"}
# input: {"x": [1]}
# input: {"x": 1.0}
package enforcer.authz

import rego.v1

allow if {
	input.x < "a"
	input.x > false
}

allow if input.x == 1.0
