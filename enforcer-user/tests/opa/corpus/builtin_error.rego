# Builtin errors: the embedded OPA is strict (an error); enforcer denies.
# input: {"n": "x"}
# input: {"n": "12"}
# input: {"n": 0}
package enforcer.authz

import rego.v1

allow if not to_number(input.n) == 12
