"""The ``qflare`` command line.

Every module in :mod:`qflare.commands` contributes its subcommands through a
``register(subparsers)`` function, so areas of the code add commands without touching
this file. A subcommand's handler takes the parsed namespace and returns an exit code, or
raises.

:func:`main` is the one place errors are reported: whatever a command raises becomes one
line on stderr, ``qflare <command>: <what went wrong>``, never a traceback, and the exit
code says what kind of failure it was (a command line that does not parse raises
``SystemExit(2)``, as argparse does):

- 2: usage: bad flags, a bad or missing configuration, a value a command cannot use
  (:class:`~qflare.errors.UsageError`, and any QFLARE ``ValueError``/``TypeError``);
- 130: interrupted (SIGINT, Ctrl-C);
- 1: anything else, a runtime failure (the broker unreachable or refusing the login, a
  file that cannot be written, a service that did not start).

``QFLARE_TRACEBACK=1`` adds the traceback, for a bug report.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import qflare
import qflare.commands
from qflare.errors import CommandFailed, QflareError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ArgumentError(UsageError):
    """argparse's complaint about the command line; ``prog`` is the (sub)command."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are raised (and reported by :func:`main` as one
    line) instead of printing the usage and exiting. Subcommand parsers are of this class
    too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self.prog, message)


#: The broker a tool that joins a running federation tries when neither a flag nor
#: ``$QFLARE_BROKER`` names one: RabbitMQ's default account on this machine.
LOCAL_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def add_federation_flags(
    parser: argparse.ArgumentParser, broker_help: str = "amqp://user:pass@host:port/"
) -> None:
    """``--broker`` and ``--prefix`` of a command or script that joins a running federation
    (``qflare tui``, examples/): defaults from ``$QFLARE_BROKER`` (else
    :data:`LOCAL_BROKER`) and ``$QFLARE_PREFIX`` (else none)."""
    parser.add_argument(
        "--broker",
        default=os.environ.get("QFLARE_BROKER", LOCAL_BROKER),
        help=f"{broker_help} ($QFLARE_BROKER)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("QFLARE_PREFIX", ""),
        help="exchange/queue name prefix of the federation ($QFLARE_PREFIX)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qflare",
        description="Federated learning with post-quantum signed envelopes, "
        "Byzantine-robust aggregation and differential privacy.",
    )
    parser.add_argument("--version", action="version", version=f"qflare {qflare.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(qflare.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"qflare.commands.{info.name}")
        module.register(sub)
    return parser


def exit_code(exc: BaseException) -> int:
    """The exit code for an error that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, CommandFailed):
        return exc.code
    if isinstance(exc, QflareError) and isinstance(exc, (ValueError, TypeError)):
        return EXIT_USAGE
    return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """What went wrong, on one line."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split())
    if isinstance(exc, (QflareError, OSError)):
        return text or type(exc).__name__
    # not raised on purpose: name the exception, it is probably a bug
    hint = "" if os.environ.get("QFLARE_TRACEBACK") else " (QFLARE_TRACEBACK=1 shows where)"
    return f"unexpected {type(exc).__name__}: {text}{hint}"


def _command_in(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The subcommand named on a command line (for errors the top parser reports)."""
    names = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    word = next((a for a in argv if not a.startswith("-")), None)
    return f"qflare {word}" if word in names else None


def main(argv: Sequence[str] | None = None) -> int:
    prog = "qflare"
    parser: argparse.ArgumentParser | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        prog = f"qflare {args.command}" if getattr(args, "command", None) else "qflare"
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            raise ArgumentError("qflare", "give a command")
        return int(func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, ArgumentError):
            prog = exc.prog
            if prog == "qflare" and parser is not None:
                # the top parser reports what a subcommand left over
                prog = _command_in(parser, sys.argv[1:] if argv is None else argv) or prog
        if os.environ.get("QFLARE_TRACEBACK"):
            traceback.print_exception(exc, file=sys.stderr)
        line = f"{prog}: {one_line(exc)}"
        if isinstance(exc, ArgumentError):
            line += f" (see `{prog} --help`)"
        with contextlib.suppress(OSError, ValueError):  # stderr gone: the exit code says it
            print(line, file=sys.stderr, flush=True)
        if isinstance(exc, ArgumentError) and parser is not None:
            # argparse's convention, which callers of main() rely on: a command line that
            # does not parse exits (code 2) rather than returning
            raise SystemExit(EXIT_USAGE) from None
        return exit_code(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
