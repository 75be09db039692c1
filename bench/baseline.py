"""A baseline source tree for side-by-side benchmarks: packages as of a git revision.

Owns one thing: `git archive` of chosen top-level packages at a revision into a
directory, never touching the repository's state (other people work in the tree), so
a bench can run the baseline with PYTHONPATH=<that directory> next to this tree in
the same run on the same noisy machine. Must not measure anything.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def baseline_tree(revision: str, into: Path, packages: Sequence[str]) -> Path:
    """`packages` (e.g. certmon, collector) as of `revision`, extracted into `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, *packages],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into
