# input: {"vals": ["a", "b"]}
# input: {"vals": ["a", "b"], "x": "a"}
# input: {"vals": [], "x": "a"}
# input: {}
package enforcer.authz

import rego.v1

kept := [v | some v in input.vals; not startswith(v, input.x)]

allow if count(kept) == 1
