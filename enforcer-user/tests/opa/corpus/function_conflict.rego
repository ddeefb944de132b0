# input: {"a": 1}
# input: {"a": 2}
# input: {"a": 0}
package enforcer.authz

import rego.v1

f(a) := 1 if a == 1

f(a) := 2 if a > 0

allow if not f(input.a) == 2
