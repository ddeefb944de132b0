"""In-test SPIRE agent: the X.509 part of the Delegated Identity API.

usage: fake_spire_agent.py SOCKET CA_CERT CA_KEY ENTRIES_JSON ROTATE_SECS
ENTRIES_JSON: [{"spiffe_id": "...", "selectors": ["unix:uid:0", ...]}]
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures

here = os.path.dirname(os.path.abspath(__file__))
out = tempfile.mkdtemp(prefix="spire-pb-")
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", "-I", here, "--python_out", out, "--grpc_python_out", out,
     "spire/api/types/types.proto", "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto"],
    check=True)
sys.path.insert(0, out)

import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402
from spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb  # noqa: E402
from spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc  # noqa: E402
from spire.api.types import types_pb2  # noqa: E402

socket_path, ca_cert_path, ca_key_path, entries_path, rotate = sys.argv[1:6]
rotate = float(rotate)
with open(ca_cert_path, "rb") as f:
    ca_cert = x509.load_pem_x509_certificate(f.read())
with open(ca_key_path, "rb") as f:
    ca_key = serialization.load_pem_private_key(f.read(), None)
with open(entries_path) as f:
    entries = json.load(f)
td = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
    x509.UniformResourceIdentifier)[0][len("spiffe://"):]


def log(*a):
    print(*a, flush=True)


def issue(spiffe_id):
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    path = spiffe_id[len("spiffe://") + len(td):]
    svid = types_pb2.X509SVID(
        cert_chain=[cert.public_bytes(serialization.Encoding.DER)],
        id=types_pb2.SPIFFEID(trust_domain=td, path=path),
        expires_at=int((now + datetime.timedelta(hours=1)).timestamp()))
    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pb.X509SVIDWithKey(x509_svid=svid, x509_svid_key=der_key)


class DelegatedIdentity(pb_grpc.DelegatedIdentityServicer):
    def SubscribeToX509SVIDs(self, request, context):
        if request.pid and request.selectors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pid and selectors are mutually exclusive")
        have = {"%s:%s" % (s.type, s.value) for s in request.selectors}
        log("SUBSCRIBE", json.dumps(sorted(have)))
        matched = [e["spiffe_id"] for e in entries if set(e["selectors"]) <= have]
        if not matched:
            log("DENIED", json.dumps(sorted(have)))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        while context.is_active():
            log("ISSUED", matched[0])
            yield pb.SubscribeToX509SVIDsResponse(x509_svids=[issue(i) for i in matched])
            deadline = time.time() + rotate
            while context.is_active() and time.time() < deadline:
                time.sleep(0.05)

    def SubscribeToX509Bundles(self, request, context):
        log("BUNDLES")
        yield pb.SubscribeToX509BundlesResponse(
            ca_certificates={td: ca_cert.public_bytes(serialization.Encoding.DER)})
        while context.is_active():
            time.sleep(0.1)


server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
pb_grpc.add_DelegatedIdentityServicer_to_server(DelegatedIdentity(), server)
server.add_insecure_port("unix:" + socket_path)
server.start()
log("LISTENING", socket_path)
server.wait_for_termination()
