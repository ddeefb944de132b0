# input: {"a": 1, "b": 2}
# input: {"a": 3, "b": 2}
# input: {"a": "x"}
package enforcer.authz

import rego.v1

add(x, y) := x + y

bigger(x, y) := x if x > y
else := y

default classify(_) := "other"

classify(x) := "small" if x < 2

allow if {
	add(input.a, input.b) == 3
	bigger(input.a, input.b) == 2
	classify(input.a) == "small"
}

allow if classify(input.a) == "other"
