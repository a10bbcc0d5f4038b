"""The ``qflare`` command line.

Every module in :mod:`qflare.commands` contributes its subcommands through a
``register(subparsers)`` function, so areas of the code add commands without touching
this file. A subcommand's handler takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import qflare
import qflare.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
