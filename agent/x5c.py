"""When a status carries its signing chain in the JWS `x5c` header (`mqtt.status_x5c`).

Owns the memory of the (connection, signing certificate) the chain last rode on and
the rule: "always", "never", or with "on_change" the first status of each
connection and of each signing certificate, and every status signed while offline
(it reaches the broker on a later session, maybe ahead of the first status signed
on it), so a collector learns the certificate where the broker does not retain the
cert topic. Must not sign or look at the link itself: the service passes the
connection count (None while not connected) and the signer's fingerprint in.
"""

from __future__ import annotations


class X5cSchedule:
    def __init__(self) -> None:
        self._key: tuple[int, str] | None = None  # (connection, signer) x5c last rode on

    def is_due(self, mode: str, signer_sha256: str | None, connected_on: int | None) -> bool:
        if mode != "on_change":
            return mode == "always"
        if signer_sha256 is None or connected_on is None:
            return True
        key = (connected_on, signer_sha256)
        due, self._key = key != self._key, key
        return due
