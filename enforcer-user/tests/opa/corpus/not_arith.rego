# input: {}
# input: {"x": 1}
# input: {"x": 2}
package enforcer.authz

import rego.v1

allow if not input.x + 1 == 2
