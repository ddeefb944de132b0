# `not` in an `if` without braces, in an else branch and in a function.
# input: {}
# input: {"x": "admin"}
# input: {"x": "guest"}
# input: {"y": "guest"}
package enforcer.authz

import rego.v1

role := "admin" if input.x == "admin"
else := "other" if not startswith(input.y, "g")

is_guest(u) if not startswith(u, "admin")

allow if role == "other"

allow if is_guest(input.y)
