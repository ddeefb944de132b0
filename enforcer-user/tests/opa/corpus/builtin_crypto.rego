# refused: crypto.sha256 is not a function any module defines nor a builtin enforcer provides
# input: {"s": "abc"}
# input: {"s": "x"}
package enforcer.authz

import rego.v1

allow if {
	crypto.sha256(input.s) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
	crypto.md5("abc") == "900150983cd24fb0d6963f7d28e17f72"
	crypto.hmac.sha256("abc", "k") == "342e519ce0ad6c03a36b98eeb3f1d130db4813b9df4d1160eda488d712dc78ee"
	crypto.hmac.equal("a", "a")
}
