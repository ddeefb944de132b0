# Cross-type comparisons under `not`: OPA orders values of different types
# (2 > false), so the body is false and the request denied. regorus's VM
# reads such a comparison as undefined and would allow: why the interpreter
# is the default evaluator.
# input: {"x": 2}
# input: {"x": "a"}
# input: {"x": false}
# input: {}
package enforcer.authz

import rego.v1

allow if not input.x > false
