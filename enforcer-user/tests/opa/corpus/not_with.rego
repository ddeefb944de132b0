# input: {}
# input: {"x": "abc"}
package enforcer.authz

import rego.v1

f(a) if a == "abc"

allow if not f(input.x) with input.y as 1
