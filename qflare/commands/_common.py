"""What several commands share: output paths checked before any work (a path a command
cannot write is a usage error naming the flag, exit code 2, not a failure after the work is
done) and the help formatter.

Kept free of heavy imports: building the parser must stay fast (tests/unit/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from qflare.errors import UsageError


def output_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder that exists (created if needed) and can be written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: the folder is not writable")
    return folder


def output_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a file that can be written: not a folder, in a folder that exists."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{flag} {file}: is a folder; give a file name")
    parent = file.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {file}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise UsageError(f"{flag} {file}: not writable")
    return file


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already says
    what the default is (``default``, ``unset``, ``%(default)s``), and not for defaults
    that say nothing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        said = any(w in text.lower() for w in ("default", "unset", "%(default)"))
        empty = action.default is None or action.default is False or action.default == []
        if said or empty or action.default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)"
