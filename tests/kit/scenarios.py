"""Named PKI scenarios: a chain plus the trust store a relying party holds for it.

Owns: the scenario names (`SCENARIOS`) and what each one means (expired leaf,
expiring intermediate, fake root with the same DN, SHA-1, RSA-1024, …), built with
`kit.pki.PKIFactory`.

Must not: issue certificates itself (kit.pki does) or start servers (tests/conftest.py
serves them through `kit.broker`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from kit.pki import Issued, PKIFactory, write_bundle

__all__ = ["SCENARIOS", "Scenario", "scenario"]


@dataclass(frozen=True)
class Scenario:
    """A chain plus the trust store a relying party holds for it.

    `extra` carries what a scenario adds beyond the chain: the fake root for
    `fake_root`, the mismatching key for `wrong_key`.
    """

    name: str
    root: Issued
    intermediates: list[Issued]
    leaf: Issued
    trust: list[Issued]
    extra: dict[str, object] = field(default_factory=dict)

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """(cert with intermediates, key, trust bundle) under `directory`."""
        cert_path, key_path = self.leaf.write(directory, chain=True)
        bundle = write_bundle(directory / f"{self.leaf.name}-trust.pem", self.trust)
        return cert_path, key_path, bundle


def scenario(factory: PKIFactory, name: str) -> Scenario:
    """Build a named scenario. Each gets its own CA names, so scenarios never share keys
    with each other (they do share them with the same scenario built again)."""
    now = factory.now
    root = factory.root(f"{name} Root CA", name=f"{name}-root")
    inter_kw: dict[str, object] = {}
    leaf_kw: dict[str, object] = {}
    extra: dict[str, object] = {}
    match name:
        case "ok" | "fake_root" | "wrong_key" | "wrong_host":
            pass
        case "expired":
            leaf_kw = {"not_before": now - timedelta(days=30), "not_after": now - timedelta(days=1)}
        case "not_yet_valid":
            leaf_kw = {"not_before": now + timedelta(days=1), "days": 30}
        case "expiring_intermediate":
            inter_kw = {"not_after": now + timedelta(days=10)}
            leaf_kw = {"not_after": now + timedelta(days=300)}
        case "expired_intermediate":
            inter_kw = {
                "not_before": now - timedelta(days=400),
                "not_after": now - timedelta(days=2),
            }
            leaf_kw = {"not_before": now - timedelta(days=100)}  # issued while it was valid
        case "sha1_signed":
            root = factory.root(f"{name} Root CA", name=f"{name}-root", key_type="rsa2048")
            inter_kw = {"key_type": "rsa2048"}
            leaf_kw = {"hash_alg": "sha1", "key_type": "rsa2048"}
        case "rsa1024":
            leaf_kw = {"key_type": "rsa1024"}
        case "expiring_leaf_20d":
            leaf_kw = {"not_after": now + timedelta(days=20)}
        case "expiring_leaf_3d":
            leaf_kw = {"not_after": now + timedelta(days=3)}
        case _:
            raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    inter = factory.intermediate(root, f"{name} Intermediate CA", name=f"{name}-int", **inter_kw)  # type: ignore[arg-type]
    sans = ("wrong.example",) if name == "wrong_host" else ("localhost", "127.0.0.1")
    leaf = factory.leaf(
        inter,
        f"{name}.test",
        name=f"{name}-leaf",
        usage="both",
        sans=sans,
        **leaf_kw,  # type: ignore[arg-type]
    )
    if name == "fake_root":
        # Same subject DN, another key: a name-only trust check would accept it.
        extra["fake_root"] = factory.root(f"{name} Root CA", name=f"{name}-fake-root")
    if name == "wrong_key":
        extra["wrong_key"] = factory.key("p256", f"{name}-other-key")
    return Scenario(name, root, [inter], leaf, [root], extra)


SCENARIOS = (
    "ok",
    "expired",
    "not_yet_valid",
    "expiring_intermediate",
    "expired_intermediate",
    "fake_root",
    "wrong_key",
    "wrong_host",
    "sha1_signed",
    "rsa1024",
    "expiring_leaf_20d",
    "expiring_leaf_3d",
)
