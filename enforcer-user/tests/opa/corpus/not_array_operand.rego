# input: {}
# input: {"x": 1}
# input: {"x": 1, "y": [1]}
# input: {"y": [1]}
package enforcer.authz

import rego.v1

allow if not [input.x] == [1]

allow if not input.y == [input.x]
