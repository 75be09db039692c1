"""Keys that never leave the hardware: a P-256 key on a PKCS#11 token, by RFC 7512 URI.

Owns reading `pkcs11:` URIs (`token=`, `object=`, `id=`, `type=private`, and the
query's `module-path=` / `pin-source=`), opening the token through python-pkcs11 (the
optional extra `certmon[pkcs11]`; a TPM2 through tpm2-pkcs11, a secure element, or
SoftHSM2 in the tests), and `TokenKey`: an `ec.EllipticCurvePrivateKey` whose `sign`
runs on the token (CKM_ECDSA over a SHA-256 digest made here, the mechanism TPM2 and
secure elements share) and whose `public_key` is the token's — so `wire.sign_jws`
and the key-matches-certificate check work on it unchanged. The private key is never
extracted (`private_bytes`/`private_numbers` refuse) and the PIN is read from its
file when the token is opened, never stored in a message, a finding or a log.
`load_token_key` answers like `read_private_key`: (facts, findings, key), every
failure a finding (module missing, token absent, PIN wrong or locked, no such key).
Must not: pick a key by guesswork (one match or a finding), or hold the PIN beyond login.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .model import Finding, FindingCode, KeyFacts, Severity

__all__ = ["TOKEN_KEY_MODE", "TokenKey", "TokenUri", "is_token_uri", "load_token_key",
           "parse_token_uri"]

SCHEME = "pkcs11:"
# KeyFacts.mode for a token key: no file, so no permission bits to judge.
TOKEN_KEY_MODE = None
_P256 = 32


def is_token_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


@dataclass(frozen=True, slots=True)
class TokenUri:
    """The parts of an RFC 7512 URI certmon uses (others are refused, not ignored)."""

    token: str | None = None
    object: str | None = None  # the key's CKA_LABEL
    id: bytes | None = None  # CKA_ID
    module_path: str | None = None
    pin_source: str | None = None  # a file holding the user PIN

    def label(self) -> str:
        """For messages: never the PIN, and the module only by name."""
        parts = [f"{k}={v}" for k, v in (("token", self.token), ("object", self.object))
                 if v is not None]
        if self.id is not None:
            parts.append(f"id={self.id.hex()}")
        return SCHEME + ";".join(parts)


_PATH_ATTRS = {"token", "object", "id", "type"}
_QUERY_ATTRS = {"module-path", "pin-source"}


def parse_token_uri(text: str) -> TokenUri:
    """Raise ValueError naming the part at fault."""
    if not is_token_uri(text):
        raise ValueError("not a pkcs11: URI")
    body = text[len(SCHEME):]
    path, _, query = body.partition("?")
    seen: dict[str, str] = {}
    for part, allowed, sep in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
        for item in filter(None, part.split(sep)):
            name, eq, value = item.partition("=")
            if not eq or name not in allowed:
                raise ValueError(f"unsupported pkcs11 URI attribute {name!r} "
                                 f"(certmon reads {', '.join(sorted(allowed))})")
            if name in seen:
                raise ValueError(f"pkcs11 URI attribute {name!r} given twice")
            seen[name] = value
    if seen.get("type", "private") != "private":
        raise ValueError("pkcs11 URI type must be private (the signing key)")
    if "pin-value" in text:
        raise ValueError("pin-value in a URI would put the PIN in a config file; use pin-source")
    raw_id = seen.get("id")
    key_id = unquote(raw_id, encoding="latin-1").encode("latin-1") if raw_id is not None \
        else None
    uri = TokenUri(token=_text(seen.get("token")), object=_text(seen.get("object")),
                   id=key_id, module_path=_text(seen.get("module-path")),
                   pin_source=_text(seen.get("pin-source")))
    if uri.object is None and uri.id is None:
        raise ValueError("pkcs11 URI names no key: give object= (its label) or id=")
    return uri


def _text(value: str | None) -> str | None:
    return None if value is None else unquote(value)


class TokenKey(ec.EllipticCurvePrivateKey):
    """A P-256 private key that stays on its token. Thread-safe: one signature at a
    time per session."""

    def __init__(self, session: Any, private: Any, public: ec.EllipticCurvePublicKey,
                 label: str) -> None:
        self._session = session
        self._private = private
        self._public = public
        self._lock = threading.Lock()
        self.label = label

    # What sign_jws and the facts use.
    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        import pkcs11

        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(algorithm, hashes.SHA256):
            raise ValueError("a token key signs ES256 only (ECDSA with SHA-256)")
        digest = hashlib.sha256(bytes(data)).digest()
        with self._lock:
            raw = self._private.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
        if len(raw) != 2 * _P256:
            raise ValueError("the token returned a signature of unexpected length")
        return encode_dss_signature(int.from_bytes(raw[:_P256]), int.from_bytes(raw[_P256:]))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def close(self) -> None:
        with self._lock:
            self._session.close()

    # What a key on a token cannot do.
    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse("key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse("exporting it")

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        self._refuse("exporting it")

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TokenKey:
        return self

    def __reduce__(self) -> NoReturn:  # never pickled into another process or a file
        self._refuse("pickling it")

    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(f"{self.label}: the key stays on its token ({what} refused)")


def load_token_key(uri_text: str, *, module_path: str | None = None,
                   pin_file: str | Path | None = None
                   ) -> tuple[KeyFacts | None, list[Finding], TokenKey | None]:
    """Open the token and find the key: (facts, [], key), or (None, [finding], None).
    `module_path` / `pin_file` apply when the URI's query does not give them."""
    try:
        uri = parse_token_uri(uri_text)
    except ValueError as exc:
        return _fail(uri_text.split("?")[0], str(exc))
    source = uri.label()
    module = uri.module_path or module_path
    if module is None:
        return _fail(source, "no PKCS#11 module: give module-path in the URI or "
                     "tls.pkcs11_module")
    pin_path = uri.pin_source or (str(pin_file) if pin_file is not None else None)
    pin: str | None = None
    if pin_path is not None:
        try:
            pin = Path(pin_path.removeprefix("file:")).read_text().strip()
        except OSError as exc:
            return _fail(source, f"cannot read the PIN file {pin_path}: {exc.strerror or exc}")
    try:
        import pkcs11
        from pkcs11.util.ec import encode_ec_public_key
    except ImportError:
        return _fail(source, "python-pkcs11 is not installed (pip install 'certmon[pkcs11]')")
    try:
        lib = pkcs11.lib(module)
    except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:  # what the loader raises
        return _fail(source, f"cannot load PKCS#11 module {Path(module).name}: "
                     f"{type(exc).__name__}")
    try:
        token = lib.get_token(token_label=uri.token) if uri.token else _only_token(lib)
        session = _open(pkcs11, token, pin)
    except pkcs11.NoSuchToken:
        return _fail(source, f"no token {uri.token!r} in {Path(module).name}")
    except pkcs11.MultipleTokensReturned:
        return _fail(source, "several tokens: name one with token=")
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
        return _fail(source, "token login failed: the PIN is incorrect")
    except pkcs11.PinLocked:
        return _fail(source, "token login failed: the PIN is locked")
    except pkcs11.PKCS11Error as exc:
        return _fail(source, f"cannot open the token: {type(exc).__name__}")
    del pin
    try:
        attrs: dict[Any, Any] = {}
        if uri.object is not None:
            attrs["label"] = uri.object
        if uri.id is not None:
            attrs["id"] = uri.id
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, **attrs)
        public_obj = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, **attrs)
        public = serialization.load_der_public_key(encode_ec_public_key(public_obj))
    except pkcs11.NoSuchKey:
        session.close()
        return _fail(source, "no such key pair on the token (object= / id= match none)")
    except pkcs11.MultipleObjectsReturned:
        session.close()
        return _fail(source, "several keys match: make object= / id= unique")
    except (pkcs11.PKCS11Error, ValueError) as exc:
        session.close()
        return _fail(source, f"cannot read the key: {type(exc).__name__}")
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        session.close()
        return _fail(source, "the token key is not an EC P-256 key (ES256 needs P-256)")
    key = TokenKey(session, private, public, source)
    spki = public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    facts = KeyFacts(source, "EC", public.key_size, hashlib.sha256(spki).hexdigest(),
                     TOKEN_KEY_MODE)
    return facts, [], key


def _open(pkcs11: Any, token: Any, pin: str | None) -> Any:
    if pin is None:
        return token.open()
    try:
        return token.open(user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:
        # PKCS#11 logs in per application and token: a session this process already
        # holds (the key loaded at an earlier report) makes every new one a user session.
        return token.open()


def _only_token(lib: Any) -> Any:
    import pkcs11

    # SoftHSM2 and others always show one more, uninitialised slot: not a choice.
    tokens = [t for t in lib.get_tokens() if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    if len(tokens) != 1:
        raise pkcs11.MultipleTokensReturned if tokens else pkcs11.NoSuchToken
    return tokens[0]


def _fail(source: str, message: str) -> tuple[None, list[Finding], None]:
    return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                          f"{source}: {message}", source=source)], None
