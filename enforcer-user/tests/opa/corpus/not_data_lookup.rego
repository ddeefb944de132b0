# `not data.m[input.x]`: the index is bound first.
# data: {"m": {"blocked": true, "off": false}}
# input: {}
# input: {"x": "blocked"}
# input: {"x": "other"}
# input: {"x": "off"}
package enforcer.authz

import rego.v1

allow if not data.m[input.x]
