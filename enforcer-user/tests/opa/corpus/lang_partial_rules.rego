# input: {"roles": ["reader"]}
# input: {"roles": ["writer", "reader"]}
# input: {"roles": []}
package enforcer.authz

import rego.v1

perms contains "read" if "reader" in input.roles

perms contains "write" if "writer" in input.roles

perm_map[r] := true if some r in input.roles

allow if {
	"write" in perms
	perm_map.reader
}

allow if count(perms) == 1
