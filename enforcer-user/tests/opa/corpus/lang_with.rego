# input: {"user": "alice"}
# input: {"user": "bob"}
# data: {"admins": ["alice"]}
package enforcer.authz

import rego.v1

is_admin if input.user in data.admins

allow if is_admin with data.admins as ["bob"]

allow if {
	is_admin
	not is_admin with input.user as "eve"
}
