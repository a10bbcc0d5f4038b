"""``qflare messages docs``: write the wire reference generated from qflare.messages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("messages", help="the wire contract (kinds, fields, reason codes)")
    sub = p.add_subparsers(dest="messages_command", metavar="ACTION", required=True)
    docs = sub.add_parser("docs", help="write the generated reference (docs/messages.md)")
    docs.add_argument("--out", default="-", help="file to write, '-' for stdout (default)")
    docs.add_argument(
        "--check", action="store_true", help="exit 1 if --out differs from what would be generated"
    )
    docs.set_defaults(func=run_docs)


def run_docs(args: argparse.Namespace) -> int:
    from qflare.commands._common import output_file
    from qflare.errors import CommandFailed
    from qflare.messages.docs import render_reference

    if args.out != "-" and not args.check:
        output_file(args.out)
    text = render_reference()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    if args.check:
        current = path.read_text() if path.is_file() else ""
        if current != text:
            raise CommandFailed(f"{path} is out of date; run: qflare messages docs --out {path}")
        return 0
    path.write_text(text)
    return 0
