"""asyncio helpers for QFLARE's public entry points."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def blocking(coro_fn: Callable[P, Coroutine[Any, Any, R]], name: str) -> Callable[P, R]:
    """The blocking form of the coroutine function ``coro_fn``, called ``name``: same
    parameters, same result; each call runs ``coro_fn`` to the end in a fresh event loop
    (:func:`asyncio.run`), so it is for scripts, not for code already inside a loop."""

    @functools.wraps(coro_fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop running here: run one
            return asyncio.run(coro_fn(*args, **kwargs))
        raise RuntimeError(f"{name} blocks; inside an event loop, await {coro_fn.__name__}")

    run.__name__ = name
    run.__qualname__ = name
    run.__doc__ = (
        f"The blocking form of :func:`{coro_fn.__name__}` (runs it in a fresh event loop)."
    )
    return run
