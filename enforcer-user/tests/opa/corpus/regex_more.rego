# input: {"s": "a1b22c333"}
# input: {"s": "none"}
package enforcer.authz

import rego.v1

allow if {
	regex.find_n(`\d+`, input.s, -1) == ["1", "22", "333"]
	regex.split(`\d+`, input.s) == ["a", "b", "c", ""]
	regex.is_valid(`[a-z]+`)
	not regex.is_valid(`[`)
	regex.replace(input.s, `\d`, "#") == "a#b##c###"
}
