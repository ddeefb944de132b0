# input: {"x": true, "y": true}
# input: {"x": true}
# input: {"y": true}
# input: {}
package enforcer.authz

import rego.v1

b := true if input.x

b := false if input.y

allow if not b
