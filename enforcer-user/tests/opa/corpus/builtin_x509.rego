# refused: crypto.x509.parse_certificates is not a function
# crypto.x509.parse_certificates: the SPIFFE ID in a certificate's URI SAN.
# input: {"pem": "-----BEGIN CERTIFICATE-----\nMIIBmjCCAUGgAwIBAgIUH3XrpniJRslMg5GZktfNk+e5LnAwCgYIKoZIzj0EAwIw\nDDEKMAgGA1UEAwwBeDAgFw0yNjExMjQwODA5NDJaGA8yMTI2MTAzMTA4MDk0Mlow\nDDEKMAgGA1UEAwwBeDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABBDbgkQ6mfz+\nluMJ6knRAlkNPmP3tc7BdlpG+5AIhqeTKINRvH3KTg4HJd+lGKPBTek22WwUOx5q\nvZnG5bpDhbOjfzB9MB0GA1UdDgQWBBTIYyhEVI0i3f+8vKmO5+d/Tu5glzAfBgNV\nHSMEGDAWgBTIYyhEVI0i3f+8vKmO5+d/Tu5glzAPBgNVHRMBAf8EBTADAQH/MCoG\nA1UdEQQjMCGGH3NwaWZmZTovL2FpLmV4YW1wbGUub3JnL2FnZW50L3gwCgYIKoZI\nzj0EAwIDRwAwRAIgTMFKJJeaxPOf2m4y4kgCD59bwmTntH5LkplmfdggzxYCIFAw\niadOjM3fGr3p8z5s1VK6scIVEVMQHIhQ2VFULIqo\n-----END CERTIFICATE-----\n"}
# input: {"pem": "garbage"}
# input: {}
package enforcer.authz

import rego.v1

allow if {
	certs := crypto.x509.parse_certificates(input.pem)
	certs[0].URIStrings[0] == "spiffe://ai.example.org/agent/x"
}
