"""Every error QFLARE raises on purpose shares one root, so a caller can catch them all."""

from __future__ import annotations

import pytest

from qflare import bus
from qflare.errors import QflareError
from qflare.sim.config import SimConfigError


@pytest.mark.parametrize(
    "cls",
    [
        bus.BusError,
        bus.MessageTooLarge,
        bus.BusUnavailable,
        bus.PublishFailed,
        bus.TopologyError,
        bus.AccessRefused,
        bus.BusClosed,
        bus.InvalidHeaders,
    ],
)
def test_bus_errors_share_the_root(cls: type[Exception]) -> None:
    assert issubclass(cls, QflareError)


def test_sim_config_error_is_a_qflare_value_error() -> None:
    with pytest.raises(QflareError):
        raise SimConfigError("x")
    with pytest.raises(ValueError, match="x"):
        raise SimConfigError("x")
