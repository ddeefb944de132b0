# input: {"a": ["x", "y"], "b": ["y"]}
# input: {"a": ["x"], "b": ["z"]}
package enforcer.authz

import rego.v1

sa := {v | some v in input.a}

sb := {v | some v in input.b}

allow if {
	count(sa & sb) == 1
	sa - sb == {"x"}
	sa | sb == {"x", "y"}
	{"k": 1, "j": 2} == {"j": 2, "k": 1}
	{1: "int key"}[1] == "int key"
	"x" in {"x": 1, "y": 2}
	"y" in {"k": "y"}
	some "k", "y" in {"k": "y"}
}
