# An object comprehension that gives one key two values: OPA raises
# eval_conflict_error (deny). The same value twice is no conflict.
# input: {"vals": [1, 2]}
# input: {"vals": [1, 1]}
# input: {"vals": [1]}
# input: {"vals": []}
package enforcer.authz

import rego.v1

o := {k: v | some v in input.vals; k := "a"}

allow if not o.a == 2
