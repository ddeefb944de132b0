# input: {}
# input: {"x": "s"}
# input: {"x": 1}
package enforcer.authz

import rego.v1

allow if not is_string(input.x)
