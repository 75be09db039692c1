"""`python -m certmon.config module:Class` prints the Markdown reference of a schema
(the tables docs/config.md embeds). Owns only this command line; must not do more
than import the named module and render its schema."""

from __future__ import annotations

import importlib
import sys

from certmon.config import render_reference


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        sys.stderr.write("usage: python -m certmon.config module:Class "
                         "(e.g. agent.config:AgentConfig)\n")
        return 2
    module, _, name = argv[0].partition(":")
    sys.stdout.write(render_reference(getattr(importlib.import_module(module), name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
