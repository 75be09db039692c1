"""Signature verification in worker processes, for collectors on more than one core.

Owns only the parallel part of ingest: ECDSA/EdDSA verification and status decoding
cost ~150 µs per message and cryptography holds the GIL while verifying, so threads
do not help; processes do. The main process keeps the authority over certificates
(its CertCache decided the signer is a trusted fleet device); a worker receives the
signer's public key the first time it needs it and checks the signature, decodes the
status and checks identity and topic, exactly as collector.verify does in-process.
Results come back in order. No store, no MQTT in the workers.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from cryptography.hazmat.primitives import serialization

from certmon import wire as p
from certmon.errors import ProtocolError

from .verify import check_signed


@dataclass(frozen=True, slots=True)
class Job:
    topic_device: str
    parsed: p.ParsedJWS  # parsed once, in the collector thread that found the signer
    identity: str | None
    public_key_der: bytes | None  # sent once per worker and certificate


@dataclass(frozen=True, slots=True)
class Outcome:
    status: p.Status | None
    payload: bytes | None
    reason: str | None = None
    detail: str | None = None


def _worker(conn: Connection) -> None:  # pragma: no cover - child process
    # Ctrl-C and systemd's SIGTERM reach the whole process group; the collector decides
    # when its workers end (it closes the pipe), so a worker must not die first and take
    # the batch in flight with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keys: dict[str, Any] = {}
    while True:
        try:
            jobs: list[Job] | None = conn.recv()
        except EOFError:
            return
        if jobs is None:
            return
        conn.send([_verify_one(job, keys) for job in jobs])


def _verify_one(job: Job, keys: dict[str, Any]) -> Outcome:
    sha = job.parsed.cert_sha256
    try:
        if job.public_key_der is not None:
            keys[sha] = serialization.load_der_public_key(job.public_key_der)
        key = keys.get(sha)
        if key is None:
            raise ProtocolError("unknown_cert", "worker has no key for this certificate")
        status = check_signed(job.parsed, key, job.identity, job.topic_device)
        return Outcome(status, job.parsed.payload)
    except ProtocolError as exc:
        return Outcome(None, None, exc.reason, str(exc))
    except Exception as exc:  # noqa: BLE001 - a worker must answer for every job
        return Outcome(None, None, "internal_error", f"{type(exc).__name__}: {exc}")


class VerifierPool:
    """N worker processes; `verify(jobs)` splits a batch among them, keeps order."""

    def __init__(self, workers: int) -> None:
        # spawn, not fork: the collector has paho and worker threads running, and a
        # forked copy of a process with threads may inherit a held lock.
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._sent: list[set[str]] = []
        self._local_keys: dict[str, Any] = {}
        self._local_sent: set[str] = set()
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,),
                               name=f"certmon-verify-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
            self._sent.append(set())

    @property
    def size(self) -> int:
        return len(self._conns)

    def verify(self, jobs: Sequence[tuple[str, p.ParsedJWS, str | None, bytes]]
               ) -> list[Outcome]:
        """jobs: (topic_device, parsed JWS, signer identity, signer public key DER).

        The calling thread takes a share too instead of only waiting: it would
        otherwise sit idle while the workers verify."""
        n = len(self._conns) + 1
        chunks: list[list[Job]] = [[] for _ in range(n)]
        for i, (device, parsed, identity, key_der) in enumerate(jobs):
            sha = parsed.cert_sha256
            w = i % n
            sent = self._sent[w] if w < n - 1 else self._local_sent
            first = sha not in sent
            if first:
                sent.add(sha)
            chunks[w].append(Job(device, parsed, identity, key_der if first else None))
        for conn, chunk in zip(self._conns, chunks, strict=False):
            conn.send(chunk)
        local = [_verify_one(job, self._local_keys) for job in chunks[-1]]
        results = [conn.recv() for conn in self._conns] + [local]
        return [results[i % n][i // n] for i in range(len(jobs))]

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
