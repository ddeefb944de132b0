# A rule and a data document may not overlap: compile error in both.
# input: {}
# data: {"enforcer": {"authz": {"other": 1}}}
package enforcer.authz

import rego.v1

allow if data.enforcer.authz.other == 1
