# base64url, hex, urlquery, yaml, json.
# input: {"s": "a b&c=d/é"}
# input: {"s": ""}
# input: {"s": "k: [1, 2]"}
package enforcer.authz

import rego.v1

allow if {
	base64url.decode(base64url.encode(input.s)) == input.s
	base64url.encode_no_pad("ab?") == "YWI_"
	hex.decode(hex.encode(input.s)) == input.s
	urlquery.decode(urlquery.encode(input.s)) == input.s
	urlquery.encode_object({"a": "1 2"}) == "a=1+2"
	urlquery.decode_object("a=1&a=2&b=x") == {"a": ["1", "2"], "b": ["x"]}
	json.unmarshal(json.marshal({"s": input.s})) == {"s": input.s}
	json.is_valid("[1]")
	not json.is_valid("[1")
	yaml.is_valid(input.s)
}

allow if yaml.unmarshal(input.s) == {"k": [1, 2]}
