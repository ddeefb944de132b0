# input: {"from": "agent"}
# input: {"from": "llm"}
package enforcer.authz

import rego.v1

g := {"agent": ["mcp"], "mcp": ["vectordb"], "llm": [], "vectordb": []}

allow if "vectordb" in graph.reachable(g, {input.from})

allow if {
	walk({"a": [1]}, [["a", 0], 1])
	numbers.range(1, 3) == [1, 2, 3]
	numbers.range_step(0, 10, 5) == [0, 5, 10]
	input.from == "llm"
	array.reverse([1, 2]) == [2, 1]
}
