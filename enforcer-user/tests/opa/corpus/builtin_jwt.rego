# refused: io.jwt.decode is not a function
# io.jwt.* (HS256): decode and verify an agent's token.
# input: {"token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZ2VudCIsImF1ZCI6ImxsbSIsImV4cCI6NDEwMjQ0NDgwMH0.gY9FP7E2wPr_goqBY1nZLNEErS_OdlGs2nfjk9RO2L4"}
# input: {"token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZ2VudCIsImF1ZCI6ImxsbSIsImV4cCI6NDEwMjQ0NDgwMH0.gY9FP7E2wPr_goqBY1nZLNEErS_OdlGs2nfjk9RO2L4x"}
# input: {"token": "not-a-jwt"}
# input: {}
package enforcer.authz

import rego.v1

claims := io.jwt.decode(input.token)[1]

allow if {
	io.jwt.verify_hs256(input.token, "s3cret")
	claims.sub == "agent"
}
