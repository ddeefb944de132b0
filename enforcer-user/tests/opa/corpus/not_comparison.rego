# Comparisons other than equality are calls: their operands are bound first.
# input: {}
# input: {"x": 1}
# input: {"x": 5}
# input: {"x": "5"}
package enforcer.authz

import rego.v1

allow if not input.x > 2

allow if not input.x != 1
