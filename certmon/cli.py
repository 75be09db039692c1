"""The skeleton the three programs' `main()` share: certmon-agent, certmon-collector and
certmon-scan.

Owns what they do alike around their commands: the `--version` and `-v/--verbose`
flags, the checks' `--warn-days`/`--crit-days` over a configured policy, the examples
every `--help` ends with, logging to stderr, the `--json` convention (one document on
stdout), what an error becomes (a usage error exits 3, Nagios UNKNOWN, in all three
programs, never argparse's 2, which reads as CRITICAL; a ConfigError exits 78,
EX_CONFIG, which the units' RestartPreventExitStatus=78 keeps from restart-looping;
any other CertmonError, e.g. a store, web or transport failure, prints one line
`prog: message` and exits the command's failure code, the traceback only under -v)
and the stop signals of the long-running commands.

Must not know a program's commands or its other flags, nor import a role.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, NoReturn, TextIO, TypeVar

from . import __version__
from .errors import EX_CONFIG, CertmonError, ConfigError
from .pki import Policy

__all__ = [
    "EX_UNKNOWN",
    "NagiosParser",
    "Program",
    "add_examples",
    "add_threshold_flags",
    "add_verbose",
    "new_parser",
    "on_stop_signals",
    "run",
    "with_thresholds",
    "write_json",
]

EX_UNKNOWN = 3  # Nagios UNKNOWN: a check that could not look
C = TypeVar("C")


class NagiosParser(argparse.ArgumentParser):
    """Every certmon program's parser (their exit codes are Nagios codes): a usage
    error is UNKNOWN (3), never argparse's 2, which Nagios would read as CRITICAL.
    Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_UNKNOWN, f"{self.prog}: error: {message}\n")


def new_parser(prog: str, description: str | None = None, *,
               parser_class: type[argparse.ArgumentParser] = NagiosParser
               ) -> argparse.ArgumentParser:
    """A program's parser with the shared `--version`."""
    parser = parser_class(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"certmon {__version__}")
    return parser


def add_examples(parser: argparse.ArgumentParser, *examples: str) -> argparse.ArgumentParser:
    """End the parser's `--help` with real command lines (tests/test_cli.py parses each
    with the program's own parser, so a renamed flag cannot leave a stale example)."""
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; tracebacks for errors")


def add_threshold_flags(parser: argparse.ArgumentParser) -> None:
    """`--warn-days`/`--crit-days` of the checks (certmon-agent check, certmon-scan)."""
    defaults = Policy()
    for flag, value in (("--warn-days", defaults.warn_days), ("--crit-days", defaults.crit_days)):
        parser.add_argument(flag, type=float, default=None, metavar="N",
                            help=f"default: the config's policy, else {value:g}")


def with_thresholds(configured: Policy, args: argparse.Namespace) -> Policy:
    """The configured policy, every key of it, with only the thresholds a flag names
    replaced (a flag must not reset min_rsa_bits or the fractions to their defaults)."""
    flags = {"warn_days": args.warn_days, "crit_days": args.crit_days}
    return dataclasses.replace(configured, **{k: v for k, v in flags.items() if v is not None})


def write_json(document: object, out: TextIO, *, indent: int | None = 2,
               sort_keys: bool = False, ensure_ascii: bool = True) -> None:
    """`--json`: one document on stdout, newline-terminated, nothing else there. Built
    as one string and written once: `json.dump` writes each token separately (some
    100,000 writes for a system bundle's `check --json`)."""
    out.write(json.dumps(document, indent=indent, sort_keys=sort_keys,
                         ensure_ascii=ensure_ascii) + "\n")


def run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        command: Callable[[argparse.Namespace], int],
        failure_code: Callable[[argparse.Namespace], int] = lambda _args: 1) -> int:
    """Parse `argv`, set up logging, run `command(args)` and map certmon's errors to an
    exit code: 78 for a ConfigError, `failure_code(args)` for any other CertmonError
    (1 for a service, 3 for a check). Anything else is a bug and keeps its traceback."""
    args = parser.parse_args(argv)
    verbose = bool(vars(args).get("verbose", False))  # not every command takes -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return command(args)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except CertmonError as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        # One line, even when a library's text has several (libpq adds "\n\tIs the
        # server running on that host…?"); a ConfigError above lists one problem a line.
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
        return failure_code(args)


def on_stop_signals(stop: Callable[[], None]) -> None:
    """SIGTERM (systemd's stop) and SIGINT (Ctrl-C) ask a running service to stop."""
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())


@dataclasses.dataclass(frozen=True, slots=True)
class Program(Generic[C]):
    """A program of subcommands (certmon-agent, certmon-collector): `checks` read their
    own inputs and answer with a Nagios code (an error in one is UNKNOWN, 3);
    `configured` commands get the loaded config (an error in one exits 1);
    `check-config` is the load alone."""

    name: str
    parser: Callable[[], argparse.ArgumentParser]
    load_config: Callable[[argparse.Namespace], C]
    checks: Mapping[str, Callable[[argparse.Namespace, TextIO], int]]
    configured: Mapping[str, Callable[[C, argparse.Namespace], int]]

    def main(self, argv: Sequence[str] | None = None) -> int:
        return run(self.name, self.parser(), argv, self._dispatch,
                   failure_code=lambda args: EX_UNKNOWN if args.command in self.checks else 1)

    def _dispatch(self, args: argparse.Namespace) -> int:
        if args.command in self.checks:
            return self.checks[args.command](args, sys.stdout)
        config = self.load_config(args)
        if args.command == "check-config":
            print(f"{args.config or '<command line>'}: OK")
            return 0
        return self.configured[args.command](config, args)
