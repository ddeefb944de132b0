# input: {}
# input: {"x": "A"}
# input: {"x": "b"}
# input: {"x": [1, 2]}
package enforcer.authz

import rego.v1

allow if not lower(input.x) == "a"

allow if not count(input.x) > 1
