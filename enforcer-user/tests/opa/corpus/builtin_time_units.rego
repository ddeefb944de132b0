# input: {"t": "2026-11-24T10:00:00Z", "size": "10Mi"}
# input: {"t": "2020-01-01T00:00:00Z", "size": "1G"}
# input: {"t": "bad", "size": "1x"}
package enforcer.authz

import rego.v1

allow if {
	time.parse_rfc3339_ns(input.t) > time.parse_rfc3339_ns("2025-01-01T00:00:00Z")
	units.parse_bytes(input.size) == 10485760
	time.date(time.parse_rfc3339_ns(input.t)) == [2026, 11, 24]
	time.add_date(0, 0, 1, 0) > 0
}
