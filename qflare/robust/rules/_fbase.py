"""A rule parametrised by f, the number of Byzantine updates it tolerates (ByzFL's f)."""

from __future__ import annotations

from typing import Any

from .._base import Aggregator
from .._core import check_int, require


class FRule(Aggregator):
    #: smallest n as a function of f, with the text for the error.
    def __init__(self, f: int = 0) -> None:
        self.f = check_int("f", f)

    def params(self) -> dict[str, Any]:
        return {"f": self.f}

    def check_n(self, n: int) -> None:
        require(n > 2 * self.f, self.name, f"needs n > 2f, got n={n}, f={self.f}")
