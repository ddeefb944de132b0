# input: {}
# input: {"x": "abc"}
# input: {"x": "xyz"}
# input: {"x": 5}
package enforcer.authz

import rego.v1

allow if not startswith(input.x, "a")
