"""qflare.tui: the operator console (``qflare tui``, ``qflare simulate --tui``).

A Textual app over a pure state model fed by typed console events: the adapter turns
verified envelopes from ``qflare.events``/``qflare.alerts`` into events, the history loader
turns stored rows into the same events. Importing this package does not import Textual;
:mod:`qflare.tui.app` does.
"""

from typing import Any

from qflare.messages import Severity
from qflare.tui.events import Link
from qflare.tui.state import AlertFilter, ConsoleState, parse_filter

__all__ = [
    "AlertFilter",
    "ConsoleState",
    "Link",
    "Severity",
    "parse_filter",
    "run_console_in_process",
]


async def run_console_in_process(*args: Any, **kwargs: Any) -> Any:
    """See :func:`qflare.tui.console.run_console_in_process` (imported lazily: Textual)."""
    from qflare.tui.console import run_console_in_process as run

    return await run(*args, **kwargs)
