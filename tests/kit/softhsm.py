"""SoftHSM2 tokens for tests: a fresh, initialised token per test, a P-256 key pair
generated on it (the private key never exists outside the token), its PIN in a file.

Owns the SoftHSM2 configuration of the test process (SOFTHSM2_CONF, set before the
module is first loaded: SoftHSM reads it once) and `softhsm2-util --init-token`. Must
not touch a system token directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

MODULE_PATHS = ("/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "4711-certmon"


def find_module() -> str | None:
    found = [p for p in MODULE_PATHS if Path(p).exists()]
    return found[0] if found and shutil.which("softhsm2-util") else None


@dataclass(frozen=True)
class Token:
    label: str
    module: str
    pin_file: Path
    key_label: str
    key_id: bytes

    def uri(self, **extra: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in extra.items())
        return (f"pkcs11:token={self.label};object={self.key_label}"
                + (f"?{query}" if query else ""))


class SoftHsm:
    def __init__(self, workdir: Path, module: str) -> None:
        self.workdir = workdir
        self.module = module
        tokens = workdir / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        conf = workdir / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                        "log.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)

    def token(self, key_label: str = "status-signing") -> Token:
        import pkcs11
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        label = f"t-{uuid.uuid4().hex[:10]}"
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", PIN, "--so-pin", "so-" + PIN], check=True,
                       capture_output=True, env=os.environ.copy())
        lib = pkcs11.lib(self.module)
        lib.reinitialize()  # a token made by softhsm2-util is seen after re-initialising
        key_id = uuid.uuid4().bytes[:4]
        with lib.get_token(token_label=label).open(user_pin=PIN, rw=True) as session:
            params = session.create_domain_parameters(KeyType.EC, {
                Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
            params.generate_keypair(store=True, label=key_label, id=key_id)
        pin_file = self.workdir / f"{label}.pin"
        pin_file.write_text(PIN + "\n")
        pin_file.chmod(0o600)
        return Token(label, self.module, pin_file, key_label, key_id)


def store_certificates(token: Token, leaf_der: bytes, chain_der: list[bytes]) -> None:
    """Put the key's certificate (same CKA_ID and label) and its chain on the token,
    as `p11tool --write` would."""
    import pkcs11
    from cryptography import x509
    from pkcs11 import Attribute, CertificateType, ObjectClass

    def subject(der: bytes) -> bytes:  # CKA_SUBJECT is required of a certificate object
        return x509.load_der_x509_certificate(der).subject.public_bytes()

    lib = pkcs11.lib(token.module)
    with lib.get_token(token_label=token.label).open(user_pin=PIN, rw=True) as session:
        session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.TOKEN: True,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509, Attribute.VALUE: leaf_der,
            Attribute.SUBJECT: subject(leaf_der), Attribute.ID: token.key_id,
            Attribute.LABEL: token.key_label})
        for i, der in enumerate(chain_der):
            session.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.TOKEN: True,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509, Attribute.VALUE: der,
                Attribute.SUBJECT: subject(der), Attribute.ID: b"ca-%d" % i,
                Attribute.LABEL: f"ca-{i}"})
