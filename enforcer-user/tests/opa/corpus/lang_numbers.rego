# known: regorus adds binary floats (0.1 + 0.2 = 0.30000000000000004); OPA adds decimals (0.3)
# input: {"n": 9007199254740993}
# input: {"n": 1e3}
# input: {"n": 0.1}
# input: {"n": -0}
package enforcer.authz

import rego.v1

allow if input.n == 1000

allow if input.n + 0.2 == 0.30000000000000004

allow if input.n > 9007199254740992

allow if {
	input.n == 0
	round(2.5) == 3
	abs(-2) == 2
	3 % 2 == 1
	ceil(1.2) == 2
}
