"""A renewal hook for the tests: issues a certificate the way a CA client would.

Run as `python renewhook.py MODE CA_CERT CA_KEY [DEVICE_ID]` with the hook contract's
environment (CERTMON_DEVICE_ID, CERTMON_NEW_CERT, CERTMON_NEW_KEY). MODE: good
(a fresh key and a certificate for the device, chain = leaf + CA), wrong_key (the key
written is not the certificate's), other_id (a certificate for DEVICE_ID), sleep,
exit1, nothing, garbage. The CA is whatever CA_CERT/CA_KEY name: the fleet's
intermediate, or a CA the broker does not trust.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def main() -> int:
    mode, ca_cert_path, ca_key_path = sys.argv[1:4]
    device_id = sys.argv[4] if len(sys.argv) > 4 else os.environ["CERTMON_DEVICE_ID"]
    new_cert, new_key = Path(os.environ["CERTMON_NEW_CERT"]), Path(os.environ["CERTMON_NEW_KEY"])
    if mode == "exit1":
        print("enrollment server said: 403 forbidden", file=sys.stderr)
        return 1
    if mode == "sleep":
        time.sleep(60)
        return 0
    if mode == "nothing":
        return 0
    if mode == "garbage":
        new_cert.write_bytes(b"<html>502 Bad Gateway</html>\n")
        new_key.write_bytes(b"not a key\n")
        return 0
    ca_cert = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca_key_path).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = serialization.Encoding.PEM
    new_cert.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    written = ec.generate_private_key(ec.SECP256R1()) if mode == "wrong_key" else key
    new_key.write_bytes(key_pem(written))
    print("issued; debug dump follows\n" + key_pem(written).decode(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
