"""Connects to an enforcer's HBONE port with a client certificate of a chosen
kind, to check that the agent rejects what it must. Prints one line:
'handshake ok' or 'handshake failed: ...'.

usage: hbone_probe.py MODE HOST PORT CA_CERT CA_KEY
MODE: valid | other-ca | expired | foreign-td | two-sans | no-cert | plain-http | random
"""
import datetime
import os
import socket
import ssl
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

mode, host, port, ca_cert_path, ca_key_path = sys.argv[1:6]
port = int(port)
now = datetime.datetime.now(datetime.timezone.utc)


def new_ca(td):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA " + td)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://" + td)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def leaf(ca_cert, ca_key, uris, not_before, not_after):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_pair(cert, key):
    d = tempfile.mkdtemp()
    c, k = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    with open(c, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(k, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return c, k


with open(ca_cert_path, "rb") as f:
    ca_cert = x509.load_pem_x509_certificate(f.read())
with open(ca_key_path, "rb") as f:
    ca_key = serialization.load_pem_private_key(f.read(), None)
td = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
    x509.UniformResourceIdentifier)[0][len("spiffe://"):]
good_id = "spiffe://%s/probe" % td
hour = datetime.timedelta(hours=1)

s = socket.create_connection((host, port), timeout=5)
if mode in ("plain-http", "random"):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if mode == "plain-http" else os.urandom(512))
    try:
        data = s.recv(100)
        print("server answered %d bytes then closed" % len(data))
    except OSError as e:
        print("handshake failed: %s" % e)
    sys.exit(0)

pair = None
if mode == "valid":
    pair = leaf(ca_cert, ca_key, [good_id], now - hour, now + hour)
elif mode == "other-ca":
    rca, rkey = new_ca(td)
    pair = leaf(rca, rkey, [good_id], now - hour, now + hour)
elif mode == "expired":
    pair = leaf(ca_cert, ca_key, [good_id], now - 3 * hour, now - 2 * hour)
elif mode == "foreign-td":
    rca, rkey = new_ca("evil.example.org")
    pair = leaf(rca, rkey, ["spiffe://evil.example.org/probe"], now - hour, now + hour)
elif mode == "two-sans":
    pair = leaf(ca_cert, ca_key, [good_id, "spiffe://%s/second" % td], now - hour, now + hour)
elif mode != "no-cert":
    sys.exit("unknown mode " + mode)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2"])
if pair:
    ctx.load_cert_chain(*write_pair(*pair))
try:
    t = ctx.wrap_socket(s, server_hostname="8080.port.enforcer")
    # TLS 1.3: the server judges the client certificate after the client
    # finished; its verdict arrives with the first read.
    t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = t.recv(100)
    print("handshake ok" if data else "handshake failed: closed")
except (ssl.SSLError, OSError) as e:
    print("handshake failed: %s" % e)
