"""A renewal hook for the tests: issues a certificate the way a CA client would.

Run as `python renewhook.py MODE CA_CERT CA_KEY [DEVICE_ID]` with the hook contract's
environment (CERTMON_DEVICE_ID, CERTMON_NEW_CERT, CERTMON_NEW_KEY). MODE: good
(a fresh key and a certificate for the device, chain = leaf + CA), wrong_key (the key
written is not the certificate's), other_id (a certificate for DEVICE_ID), sleep,
exit1, nothing, garbage, combined (good, and the key also appended to the
certificate file), swap (good, then a child that escaped the process group with
setsid, still holding stderr, swaps both files for another pair from the CA in
SWAP_CA / SWAP_CA_KEY, again and again for 1 s from the moment the hook exited 0,
and writes "swapped" to SWAP_DONE on each swap), wait (good
once the file WAIT_GO exists, after creating WAIT_STARTED).
The CA is whatever CA_CERT/CA_KEY name: the fleet's intermediate, or a CA the broker
does not trust.
"""

from __future__ import annotations

import os
import subprocess
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
    if mode == "wait":
        Path(os.environ["WAIT_STARTED"]).touch()
        go = Path(os.environ["WAIT_GO"])
        while not go.exists():  # the test lets it go
            time.sleep(0.02)
    cert_pem, key_bytes = issue(ca_cert_path, ca_key_path, device_id, mode)
    new_cert.write_bytes(cert_pem + (key_bytes if mode == "combined" else b""))
    new_key.write_bytes(key_bytes)
    print("issued; debug dump follows\n" + key_bytes.decode(), file=sys.stderr)
    if mode == "swap":
        work = new_cert.parent
        other_cert, other_key = issue(os.environ["SWAP_CA"], os.environ["SWAP_CA_KEY"],
                                      device_id, "good")
        (work / ".swap-cert").write_bytes(other_cert)
        (work / ".swap-key").write_bytes(other_key)
        swapper = (
            "import os, sys, time\n"
            "w, done, hook = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
            "while os.getppid() == hook:  # until the hook has exited 0\n"
            "    time.sleep(0.001)\n"
            "for _ in range(50):  # keep swapping in, for 1 s, whatever the agent does\n"
            "    try:\n"
            "        for n in ('cert', 'key'):\n"
            "            data = open(os.path.join(w, '.swap-' + n), 'rb').read()\n"
            "            tmp = os.path.join(w, '.t-' + n)\n"
            "            open(tmp, 'wb').write(data)\n"
            "            os.replace(tmp, os.path.join(w, n + '.pem'))\n"
            "        open(done, 'w').write('swapped')\n"
            "    except OSError:\n"
            "        pass\n"
            "    time.sleep(0.02)\n"
            "time.sleep(2)  # stderr stays open meanwhile\n")
        subprocess.Popen([sys.executable, "-c", swapper, str(work), os.environ["SWAP_DONE"],
                          str(os.getpid())],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL)  # stderr: inherited, held open
    return 0


def issue(ca_cert_path: str, ca_key_path: str, device_id: str, mode: str) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM) for `device_id` from the CA."""
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
    written = ec.generate_private_key(ec.SECP256R1()) if mode == "wrong_key" else key
    return cert.public_bytes(pem) + ca_cert.public_bytes(pem), key_pem(written)


if __name__ == "__main__":
    sys.exit(main())
