# An invalid pattern is an error in OPA (with strict builtin errors, as the
# embedded OPA runs); under `not` it must never allow.
# input: {"p": "["}
# input: {"p": "a"}
# input: {"p": "(?P<x>a)"}
# input: {}
package enforcer.authz

import rego.v1

allow if not regex.match(input.p, "b")
