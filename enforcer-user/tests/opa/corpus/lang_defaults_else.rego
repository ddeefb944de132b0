# input: {"level": 1}
# input: {"level": 5}
# input: {"level": 10}
# input: {}
package enforcer.authz

import rego.v1

default tier := "none"

tier := "low" if input.level < 3
else := "mid" if input.level < 8
else := "high"

default allow := false

allow if tier == "mid"

allow if tier == "none"
