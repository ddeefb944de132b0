# input: {"x": "a"}
# input: {"x": "b"}
package enforcer.authz

import rego.v1

rules.by_name.a := true

rules.by_name[n] := false if n := "b"

allow if rules.by_name[input.x]
