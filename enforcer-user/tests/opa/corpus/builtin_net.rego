# input: {"ip": "10.1.2.3"}
# input: {"ip": "192.168.0.1"}
# input: {"ip": "fd00::1"}
# input: {"ip": "bogus"}
package enforcer.authz

import rego.v1

allow if net.cidr_contains("10.0.0.0/8", input.ip)

allow if {
	net.cidr_contains("fd00::/8", input.ip)
	count(net.cidr_expand("10.0.0.0/30")) == 4
	net.cidr_is_valid("10.0.0.0/8")
}
