# RE2 classes and flags as OPA has them.
# input: {"s": "abc123"}
# input: {"s": "ABC"}
# input: {"s": "Ünïcode"}
# input: {"s": "日本"}
# input: {"s": "a_b"}
# input: {"s": ""}
package enforcer.authz

import rego.v1

allow if regex.match(`^\d+$`, input.s)

allow if regex.match(`(?i)^abc$`, input.s)

allow if regex.match(`^\pL+$`, input.s)

allow if regex.match(`^\w+\d$`, input.s)
