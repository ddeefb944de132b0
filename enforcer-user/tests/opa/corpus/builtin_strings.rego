# input: {"s": "spiffe://ai.example.org/agent/support"}
# input: {"s": "spiffe://ai.example.org/llm"}
# input: {"s": "Hello, World"}
package enforcer.authz

import rego.v1

parts := split(trim_prefix(input.s, "spiffe://"), "/")

allow if {
	parts[1] == "agent"
	concat("/", array.slice(parts, 0, 2)) == "ai.example.org/agent"
	strings.any_prefix_match(input.s, ["spiffe://ai.", "x"])
	indexof(input.s, "agent") > 0
	substring(input.s, 0, 6) == "spiffe"
	sprintf("%s:%d", ["a", 5]) == "a:5"
	format_int(255, 16) == "ff"
	strings.replace_n({"agent": "A"}, input.s) == "spiffe://ai.example.org/A/support"
	upper(trim_space("  x ")) == "X"
	strings.reverse("abc") == "cba"
	replace(input.s, "/", "|") != input.s
}

allow if {
	glob.match("Hello, *", [], input.s)
	contains(lower(input.s), "world")
	endswith(input.s, "World")
	trim(input.s, "Hd") == "ello, Worl"
}
