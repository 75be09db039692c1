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
One process, one login per token: PKCS#11 logs in per application, so a second load of
a token this process holds logged in is refused (a finding) rather than opened without
checking its PIN; every PKCS#11 call goes through one lock (python-pkcs11 initialises
the module for single-threaded use) and a key refuses to sign in a process other than
the one that loaded it (a forked child must load its own: a module's handles do not
survive fork). A token that says its next wrong PIN locks it is not tried.
Must not: pick a key by guesswork (one match or a finding), or hold the PIN beyond login.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import PKIError
from ..files import read_regular
from .model import Finding, FindingCode, KeyFacts, Severity

__all__ = ["TOKEN_KEY_MODE", "TokenKey", "TokenUri", "is_token_uri", "load_token_key",
           "parse_token_uri"]

SCHEME = "pkcs11:"
MAX_PIN_BYTES = 1024
# python-pkcs11 initialises a module for single-threaded use (C_Initialize(NULL)): the
# application promises one call at a time. One lock for every call keeps it.
_P11_LOCK = threading.RLock()
_LIB_PID: dict[str, int] = {}  # module path → the process that initialised it
# KeyFacts.mode for a token key: no file, so no permission bits to judge.
TOKEN_KEY_MODE = None
_P256 = 32


def is_token_uri(value: object) -> bool:
    return isinstance(value, str) and value[:len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True, slots=True)
class TokenUri:
    """The parts of an RFC 7512 URI certmon uses (others are refused, not ignored)."""

    token: str | None = None
    manufacturer: str | None = None  # token info, as p11tool / pkcs11-tool print them
    model: str | None = None
    serial: str | None = None
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


_PATH_ATTRS = {"token", "manufacturer", "model", "serial", "object", "id", "type"}
_QUERY_ATTRS = {"module-path", "pin-source"}


def parse_token_uri(text: str) -> TokenUri:
    """Raise ValueError naming the part at fault."""
    if not is_token_uri(text):
        raise ValueError("not a pkcs11: URI")
    if "pin-value=" in text.split("?", 1)[-1]:
        raise ValueError("pin-value in a URI would put the PIN in a config file; use pin-source")
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
    raw_id = seen.get("id")
    key_id = unquote(raw_id, encoding="latin-1").encode("latin-1") if raw_id is not None \
        else None
    pin_source = _text(seen.get("pin-source"))
    if pin_source is not None:
        if pin_source.startswith("file://"):  # file:///path (RFC 8089); no remote hosts
            host, _, rest = pin_source[len("file://"):].partition("/")
            if host not in ("", "localhost"):
                raise ValueError("pin-source must be a local file")
            pin_source = "/" + rest
        pin_source = pin_source.removeprefix("file:")
        if not pin_source.startswith("/"):
            # Relative to what? Not the working directory of a service.
            raise ValueError("pin-source must be an absolute path (file:/run/credentials/…)")
    uri = TokenUri(token=_text(seen.get("token")), manufacturer=_text(seen.get("manufacturer")),
                   model=_text(seen.get("model")), serial=_text(seen.get("serial")),
                   object=_text(seen.get("object")), id=key_id,
                   module_path=_text(seen.get("module-path")), pin_source=pin_source)
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
        self._pid = os.getpid()
        self._closed = False
        self.label = label

    # What sign_jws and the facts use.
    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        import pkcs11

        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(algorithm, hashes.SHA256):
            raise ValueError("a token key signs ES256 only (ECDSA with SHA-256)")
        digest = hashlib.sha256(bytes(data)).digest()
        if self._closed:
            raise PKIError(f"{self.label}: the token session is closed")
        if os.getpid() != self._pid:
            raise PKIError(f"{self.label}: loaded in another process; a forked process "
                           "must load the token key itself")
        try:
            with _P11_LOCK:
                raw = self._private.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
        except pkcs11.PKCS11Error as exc:  # a token pulled, a session gone: a finding
            raise PKIError(f"{self.label}: the token did not sign: {type(exc).__name__}") \
                from None
        if len(raw) != 2 * _P256:
            raise PKIError(f"{self.label}: the token returned a signature of unexpected length")
        return encode_dss_signature(int.from_bytes(raw[:_P256]), int.from_bytes(raw[_P256:]))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def certificates(self) -> list[bytes]:
        """DER of the certificates stored on the token: the key's own (same CKA_ID, or
        CKA_LABEL when it has no id) first, then every other certificate object (the
        chain, as `p11tool --write --mark-ca` stores it); [] when there are none."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        if self.is_closed:
            raise PKIError(f"{self.label}: the token session is closed")
        with _P11_LOCK:
            try:
                key_id = self._private[Attribute.ID]
            except pkcs11.PKCS11Error:
                key_id = None
            key_label = getattr(self._private, "label", None)
            own: list[bytes] = []
            others: list[bytes] = []
            for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
                der = bytes(obj[Attribute.VALUE])
                try:
                    cert_id = obj[Attribute.ID]
                except pkcs11.PKCS11Error:
                    cert_id = None
                mine = (cert_id == key_id) if key_id else (
                    getattr(obj, "label", None) == key_label)
                (own if mine else others).append(der)
        return own[:1] + own[1:] + others

    @property
    def is_closed(self) -> bool:
        return self._closed or os.getpid() != self._pid

    def close(self) -> None:
        """End the session (and the process's login on the token)."""
        with _P11_LOCK:
            if not self._closed and os.getpid() == self._pid:
                self._session.close()
            self._closed = True

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
    pin: str | None = None
    pin_findings: list[Finding] = []
    if uri.pin_source is not None or pin_file is not None:
        # A pin-source from the URI is not named back (a PIN typed where its file
        # belongs would be shown); a configured pin_file is a path.
        named = "the URI's pin-source" if uri.pin_source is not None else str(pin_file)
        path = Path(uri.pin_source) if uri.pin_source is not None else Path(str(pin_file))
        try:
            pin = read_regular(path, MAX_PIN_BYTES).decode("utf-8").strip()
            mode = path.stat().st_mode
        except OSError as exc:
            return _fail(source, f"cannot read the PIN file ({named}): {exc.strerror or exc}")
        except UnicodeDecodeError:
            return _fail(source, f"the PIN file ({named}) is not UTF-8 text")
        if mode & 0o077:
            pin_findings.append(Finding(
                FindingCode.KEY_PERMISSIONS, Severity.WARNING,
                f"{source}: the PIN file ({named}) is readable by others than its owner "
                f"(mode {mode & 0o777:o}); chmod 600 it or use a systemd credential",
                source=source))
    try:
        import pkcs11
        from pkcs11.util.ec import encode_ec_public_key
    except ImportError:
        return _fail(source, "python-pkcs11 is not installed (pip install 'certmon[pkcs11]')")
    with _P11_LOCK:
        return _load(pkcs11, encode_ec_public_key, uri, source, module, pin, pin_findings)


def _load(pkcs11: Any, encode_ec_public_key: Any, uri: TokenUri, source: str, module: str,
          pin: str | None, pin_findings: list[Finding]
          ) -> tuple[KeyFacts | None, list[Finding], TokenKey | None]:
    try:
        lib = pkcs11.lib(module)
        if _LIB_PID.setdefault(module, os.getpid()) != os.getpid():
            # Loaded before a fork: the child must initialise the module itself (its
            # handles and connections are the parent's).
            lib.reinitialize()
            _LIB_PID[module] = os.getpid()
    except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:  # what the loader raises
        return _fail(source, f"cannot load PKCS#11 module {Path(module).name}: "
                     f"{type(exc).__name__}")
    try:
        token = _find_token(pkcs11, lib, uri)
        flags = token.flags
        if pin is None and flags & pkcs11.TokenFlag.LOGIN_REQUIRED:
            return _fail(source, "the token needs a PIN: give pin-source or tls.pkcs11_pin_file")
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            return _fail(source, "the token's user PIN is locked (reset it with the SO PIN)")
        if pin is not None and flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY:
            # A wrong PIN now locks the token (a TPM: its dictionary-attack lockout,
            # which guards its other secrets too): not tried every report.
            return _fail(source, "one more wrong PIN locks the token: not trying; check the "
                         "PIN file, then log in once by hand (pkcs11-tool --login)")
        session = token.open(user_pin=pin) if pin is not None else token.open()
    except pkcs11.NoSuchToken:
        return _fail(source, f"no such token in {Path(module).name}")
    except pkcs11.MultipleTokensReturned:
        return _fail(source, "several tokens match: name one with token= or serial=")
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
        return _fail(source, "token login failed: the PIN is incorrect")
    except pkcs11.PinLocked:
        return _fail(source, "token login failed: the PIN is locked")
    except pkcs11.UserAlreadyLoggedIn:
        # PKCS#11 logs in per process: another key of this token is loaded here. Its
        # PIN would not be checked, and closing either would log the other out.
        return _fail(source, "the token is already logged in by this process (a key of it "
                     "is loaded): close that key first")
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
    return facts, pin_findings, key


def _find_token(pkcs11: Any, lib: Any, uri: TokenUri) -> Any:
    """The one initialised token matching every token attribute the URI gives."""
    # SoftHSM2 and others always show one more, uninitialised slot: not a choice.
    tokens = [t for t in lib.get_tokens() if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    wanted = {"label": uri.token, "manufacturer_id": uri.manufacturer, "model": uri.model,
              "serial": uri.serial}
    for attr, value in wanted.items():
        if value is not None:
            tokens = [t for t in tokens if _info(getattr(t, attr, None)) == value]
    if len(tokens) != 1:
        raise pkcs11.MultipleTokensReturned if tokens else pkcs11.NoSuchToken
    return tokens[0]


def _info(value: object) -> str | None:
    # Token info fields are blank-padded fixed-size strings (bytes in some bindings).
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.strip() if isinstance(value, str) else None


def _fail(source: str, message: str) -> tuple[None, list[Finding], None]:
    return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                          f"{source}: {message}", source=source)], None
