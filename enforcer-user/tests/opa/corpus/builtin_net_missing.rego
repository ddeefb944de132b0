# OPA builtins regorus 0.14 lacks are refused at load, by name and line.
# refused: builtin_net_missing.rego:10: refused: net.cidr_intersects is not a function
# input: {}
package enforcer.authz

import rego.v1

allow if {
	net.cidr_contains("10.0.0.0/8", "10.1.2.3")
	net.cidr_intersects("10.0.0.0/8", "10.1.0.0/16")
}
