"""``qflare.aio.blocking``: the blocking form of a coroutine function keeps its parameters
and result, and refuses to run inside a running event loop."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from qflare.aio import blocking
from qflare.client.flower import run_numpy_client, serve_numpy_client


async def scaled(x: int, *, by: int = 2) -> int:
    await asyncio.sleep(0)
    if x < 0:
        raise ValueError("negative")
    return x * by


run_scaled = blocking(scaled, "run_scaled")


def test_same_parameters_and_result() -> None:
    assert run_scaled(3) == 6
    assert run_scaled(3, by=5) == 15
    assert inspect.signature(run_scaled) == inspect.signature(scaled)
    assert run_scaled.__name__ == "run_scaled"
    assert "scaled" in (run_scaled.__doc__ or "")


def test_errors_come_through() -> None:
    with pytest.raises(ValueError, match="negative"):
        run_scaled(-1)


async def test_not_inside_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside an event loop, await scaled"):
        run_scaled(1)


def test_the_flower_bridge_blocking_entry_has_the_async_ones_parameters() -> None:
    assert inspect.signature(run_numpy_client) == inspect.signature(serve_numpy_client)
    assert run_numpy_client.__name__ == "run_numpy_client"
