# input: {"v": "1.2.3"}
# input: {"v": "1.10.0"}
# input: {"v": "x"}
package enforcer.authz

import rego.v1

allow if {
	semver.is_valid(input.v)
	semver.compare(input.v, "1.9.0") > 0
	uuid.parse("00000000-0000-4000-8000-000000000000").version == 4
}
