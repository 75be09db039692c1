"""A long fuzzing campaign against the collector's ingest path (a seeded random mutator).

The same promise as tests/test_fuzz_ingest.py, at volume: `Ingestor.process` with a
real SQLite store and a CertCache of real device certificates is fed one hostile
message at a time — mutated valid statuses (byte flips, truncation, JWS part swaps,
edited headers, spliced bytes), random bytes, deeply nested and huge JSON and wrongly
typed fields signed with a real device key (so they reach the decoder), unicode
device ids and topics — plus a share of fresh valid statuses that must be stored.

A case *fails* when an exception escapes `process`, when accepted + rejected +
duplicates does not grow by exactly one, when a valid fresh status is not stored, or
when a rejection's reason is `internal_error` (an exception the pipeline contained but
did not expect). Failing inputs are written to --out for replay.

Run: `.venv/bin/python bench/fuzz_ingest.py [--cases 100000] [--seed 1] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

from kit.fleet import SimDevice, make_ca, make_devices, status  # noqa: E402
from kit.mutate import b64url, json_paths  # noqa: E402

from certmon import wire as p  # noqa: E402
from certmon.mqtt import Incoming  # noqa: E402
from collector.admission import Budget  # noqa: E402
from collector.ingest import Ingestor  # noqa: E402
from collector.store import open_store  # noqa: E402
from collector.verify import REASONS, CertCache  # noqa: E402

PREFIX = p.DEFAULT_PREFIX
KNOWN_REASONS = {*REASONS, "oversized"}
UNICODE_SAMPLES = ["gw-ünïcødé", "☃", "設備-01", "\u202egw", "a\u0301", "\U0001f600" * 20,
                   "fleet", "_x", "a/b", "+", "#", "x" * 65, "gw\x00", " ", "\ufeff", "é" * 64]


class Campaign:
    def __init__(self, rng: random.Random, db: Path) -> None:
        self.rng = rng
        self.now = datetime.now(UTC)
        root = make_ca("fuzz campaign root", self.now)
        self.devices: list[SimDevice] = make_devices(root, 3, self.now, prefix="fz")
        self.store = open_store(f"sqlite:///{db}")
        self.store.migrate()
        cache = CertCache([root.cert])
        for dev in self.devices:
            cache.add([dev.cert, *dev.chain], self.now)
        # No admission budget: every mutation must reach verification.
        self.ingestor = Ingestor(self.store, cache, prefix=PREFIX, now=lambda: datetime.now(UTC),
                                 budget=Budget(rate_per_s=1e9, burst=1e9))
        self.seq = 0
        self.template = self.fresh_doc(self.devices[0])
        self.paths = list(json_paths(self.template))

    # -- inputs --------------------------------------------------------------------
    def fresh_doc(self, dev: SimDevice) -> dict[str, Any]:
        self.seq += 1
        return json.loads(p.encode_status(status(dev, self.seq, self.now)))  # type: ignore[no-any-return]

    def sign(self, dev: SimDevice, body: bytes) -> bytes:
        return p.sign_jws(body, dev.key, dev.cert)

    def valid(self) -> tuple[str, bytes, str]:
        dev = self.rng.choice(self.devices)
        return p.status_topic(PREFIX, dev.device_id), self.sign(
            dev, json.dumps(self.fresh_doc(dev), sort_keys=True, separators=(",", ":"),
                            ensure_ascii=False).encode()), "valid"

    def mutated(self) -> tuple[str, bytes, str]:
        rng = self.rng
        topic, token, _ = self.valid()
        buf = bytearray(token)
        how = rng.choice(["flip", "truncate", "swap", "header", "splice", "dots"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
        elif how == "truncate":
            del buf[rng.randint(1, len(buf) - 1):]
        elif how == "swap":
            parts = bytes(buf).split(b".")
            other = self.valid()[1].split(b".")
            parts[rng.randrange(3)] = other[rng.randrange(3)]
            buf = bytearray(b".".join(parts))
        elif how == "header":
            h64, rest = bytes(buf).split(b".", 1)
            header = json.loads(base64.urlsafe_b64decode(h64 + b"=" * (-len(h64) % 4)))
            key = rng.choice(["alg", "typ", "x5t#S256", "x5c", "crit", "b64", "kid"])
            header[key] = rng.choice([None, 0, True, "", "none", "HS256", "EdDSA", "ES384",
                                      "A" * 43, ["MIIB" + "A" * 40], {"a": 1}, "x" * 1000])
            if rng.random() < 0.2:
                header.pop(key, None)
            buf = bytearray(b64url(json.dumps(header).encode()) + b"." + rest)
        elif how == "splice":
            i = rng.randint(0, len(buf))
            buf[i:i] = rng.randbytes(rng.randint(1, 64))
        else:
            buf = bytearray(bytes(buf).replace(b".", rng.choice([b"", b"..", b"..."]), 1))
        return topic, bytes(buf), f"mutated-{how}"

    def random_bytes(self) -> tuple[str, bytes, str]:
        dev = self.rng.choice(self.devices)
        return (p.status_topic(PREFIX, dev.device_id),
                self.rng.randbytes(self.rng.randint(1, 4096)), "random")

    def wrong_type(self) -> tuple[str, bytes, str]:
        rng = self.rng
        dev = rng.choice(self.devices)
        doc = self.fresh_doc(dev)
        path = rng.choice(self.paths)
        node = doc
        try:
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = rng.choice([None, True, 0, -1, 2**64, 1.5, "", "x", [], {},
                                         "2026-13-45T99:99:99Z", "0" * 64, "fleet", "\x00"])
        except (KeyError, IndexError, TypeError):
            pass
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        return p.status_topic(PREFIX, dev.device_id), self.sign(dev, body), "signed-wrong-type"

    def nested(self) -> tuple[str, bytes, str]:
        rng = self.rng
        dev = rng.choice(self.devices)
        depth = rng.choice([10, 100, 1000, 5000, 20000])
        body = ("[" * depth + "]" * depth) if rng.random() < 0.5 else (
            '{"a":' * depth + "1" + "}" * depth)
        if rng.random() < 0.5:
            doc = json.dumps(self.fresh_doc(dev))
            body = doc[:-1] + ',"extra":' + body + "}"
        return p.status_topic(PREFIX, dev.device_id), self.sign(dev, body.encode()), \
            "signed-nested"

    def huge(self) -> tuple[str, bytes, str]:
        rng = self.rng
        dev = rng.choice(self.devices)
        doc = self.fresh_doc(dev)
        size = rng.choice([1000, 10_000, 40_000, 100_000])
        doc["agent"]["version"] = rng.choice(["v" * size, [1] * (size // 2),
                                              int("9" * min(size, 4000))])
        return p.status_topic(PREFIX, dev.device_id), self.sign(dev, json.dumps(doc).encode()), \
            "signed-huge"

    def unicode(self) -> tuple[str, bytes, str]:
        rng = self.rng
        dev = rng.choice(self.devices)
        doc = self.fresh_doc(dev)
        device_id = rng.choice(UNICODE_SAMPLES) if rng.random() < 0.6 else "".join(
            chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0xd7ff),
                            rng.randint(0xe000, 0x10ffff)])) for _ in range(rng.randint(1, 70)))
        doc["device_id"] = device_id
        topic_id = device_id if rng.random() < 0.7 else dev.device_id
        return p.status_topic(PREFIX, topic_id) if p.validate_device_id(topic_id) is None \
            else f"{PREFIX}/devices/{topic_id}/status", self.sign(
                dev, json.dumps(doc, ensure_ascii=False).encode()), "unicode"

    # -- the loop ------------------------------------------------------------------
    def total(self) -> int:
        ing = self.ingestor
        return ing.accepted + sum(ing.rejected.values()) + ing.duplicates

    def run(self, cases: int, out: Path | None, progress_every: int) -> dict[str, Any]:
        makers: list[tuple[float, Callable[[], tuple[str, bytes, str]]]] = [
            (0.10, self.valid), (0.40, self.mutated), (0.15, self.random_bytes),
            (0.15, self.wrong_type), (0.05, self.nested), (0.03, self.huge),
            (0.12, self.unicode)]
        weights = [w for w, _ in makers]
        kinds: Counter[str] = Counter()
        failures: list[str] = []
        start = time.perf_counter()
        for n in range(1, cases + 1):
            maker = self.rng.choices(makers, weights)[0][1]
            topic, payload, kind = maker()
            kinds[kind] += 1
            before, accepted_before = self.total(), self.ingestor.accepted
            problem = None
            try:
                self.ingestor.process([Incoming(topic, payload, self.rng.random() < 0.1, 1)])
            except Exception as exc:  # noqa: BLE001 - a crash is what the campaign looks for
                problem = f"exception {type(exc).__name__}: {exc}"
            if problem is None and self.total() - before != 1:
                problem = f"counted {self.total() - before} times"
            is_stored = self.ingestor.accepted == accepted_before + 1
            if problem is None and kind == "valid" and not is_stored:
                problem = f"valid status not stored: {dict(self.ingestor.rejected)}"
            if problem is None and "internal_error" in self.ingestor.rejected:
                problem = "internal_error: " + repr(self.store.rejection_samples(
                    "internal_error")[:1])
                del self.ingestor.rejected["internal_error"]
            if problem is not None:
                failures.append(f"case {n} ({kind}, topic {topic[:80]!r}): {problem}")
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"case-{n}.bin").write_bytes(topic.encode() + b"\n" + payload)
            if progress_every and n % progress_every == 0:
                rate = n / (time.perf_counter() - start)
                print(f"  {n:>8} cases  {rate:6.0f}/s  failures {len(failures)}", flush=True)
        elapsed = time.perf_counter() - start
        unknown = set(self.ingestor.rejected) - KNOWN_REASONS
        return {"cases": cases, "elapsed_s": elapsed, "rate": cases / elapsed, "kinds": kinds,
                "accepted": self.ingestor.accepted, "duplicates": self.ingestor.duplicates,
                "rejected": dict(self.ingestor.rejected), "failures": failures,
                "unknown_reasons": unknown, "integrity_ok": self.store.integrity_check()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write failing inputs here")
    parser.add_argument("--progress-every", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign(random.Random(args.seed), Path(tmp) / "fuzz.db")
        result = campaign.run(args.cases, args.out, args.progress_every)
        campaign.store.close()
    print(f"\nfuzz campaign, seed {args.seed}: {result['cases']} cases in "
          f"{result['elapsed_s']:.1f} s = {result['rate']:.0f} cases/s")
    print("inputs:    " + ", ".join(f"{k}={v}" for k, v in sorted(result["kinds"].items())))
    print(f"stored:    {result['accepted']}   duplicates: {result['duplicates']}")
    print("rejected:  " + ", ".join(f"{k}={v}" for k, v in
                                    sorted(result["rejected"].items(), key=lambda kv: -kv[1])))
    print(f"store integrity_check: {'ok' if result['integrity_ok'] else 'FAILED'}")
    print(f"unknown rejection reasons: {sorted(result['unknown_reasons']) or 'none'}")
    print(f"failures (crash, miscount, internal_error, valid not stored): "
          f"{len(result['failures'])}")
    for line in result["failures"][:20]:
        print("  " + line)
    is_ok = not result["failures"] and not result["unknown_reasons"] and result["integrity_ok"]
    return 0 if is_ok else 1


if __name__ == "__main__":
    sys.exit(main())
