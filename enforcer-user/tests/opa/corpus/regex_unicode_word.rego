# \w and \d are ASCII-only in RE2; \pL is Unicode.
# input: {"s": "é"}
# input: {"s": "e"}
# input: {"s": "٣"}
# input: {"s": "3"}
package enforcer.authz

import rego.v1

allow if regex.match(`^\w$`, input.s)

allow if regex.match(`^\d$`, input.s)
