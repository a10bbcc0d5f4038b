"""What several commands share: output paths checked before any work (a path a command
cannot write is a usage error naming the flag, exit code 2, not a failure after the work is
done), argparse value types (numbers in a range, ``KEY=VALUE``) and the help formatter.

Kept free of heavy imports: building the parser must stay fast (tests/unit/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def number_in(
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in the interval from ``low`` to ``high`` (each
    end closed unless said open); anything else is an error naming ``name`` and the interval."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        ok = (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be in {interval}, got {text}")
        return value

    return parse


def whole_number_in(name: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` (unset: no upper bound);
    anything else is an error naming ``name`` and the range."""
    bounds = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{name} must be {bounds}, got {text}")
        return value

    return parse


def key_value(text: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    """``text`` split at its first ``=``; no ``=`` or nothing before it is an argparse error
    that shows the expected ``form``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    return key, value


def add_pairs_option(
    parser: argparse._ActionsContainer,
    flag: str,
    value: Callable[[str], Any],
    *,
    form: str = "KEY=VALUE",
    help: str,
) -> None:
    """A repeatable ``flag KEY=VALUE`` option: the parsed list holds (KEY, ``value(VALUE)``)
    pairs; text without ``=`` is an error showing ``form``, as is what ``value`` refuses."""

    def pair(text: str) -> tuple[str, Any]:
        key, raw = key_value(text, form)
        return key, value(raw)

    parser.add_argument(flag, type=pair, action="append", default=[], metavar=form, help=help)


def add_config_option(parser: argparse._ActionsContainer, *, read_for: str = "") -> None:
    """``--config``, the TOML file :func:`qflare.runtime.config.load_settings` reads
    (``$QFLARE_CONFIG`` when the flag is not given); ``read_for`` says, after "TOML config
    file", what a command reads in it."""
    parser.add_argument("--config", help=f"TOML config file{read_for} (default $QFLARE_CONFIG)")


def add_pki_dir_option(parser: argparse._ActionsContainer) -> None:
    """``--pki-dir``, the folder ``qflare provision`` wrote (``$QFLARE_PKI_DIR`` when the
    flag is not given, as :func:`qflare.runtime.config.load_settings` reads it)."""
    parser.add_argument(
        "--pki-dir", help="folder written by `qflare provision` (default $QFLARE_PKI_DIR)"
    )


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
