# `not f(input.x)`: OPA binds the argument first, so with input.x undefined
# the body is undefined (deny).
# input: {}
# input: {"x": 1}
# input: {"x": 2}
# input: {"y": 1}
package enforcer.authz

import rego.v1

f(a) if a == 1

allow if not f(input.x)
