# input: {"y": {"a": true}}
# input: {"y": {"a": true}, "x": "a"}
# input: {"y": {"a": true}, "x": "b"}
# input: {"x": "a"}
package enforcer.authz

import rego.v1

allow if not input.y[input.x]
