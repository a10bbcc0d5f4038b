"""A rule parametrised by f, the number of Byzantine updates it tolerates (ByzFL's f)."""

from __future__ import annotations

from .._base import Aggregator, FParam
from .._core import require


class FRule(FParam, Aggregator):
    def check_n(self, n: int) -> None:
        require(n > 2 * self.f, self.name, f"needs n > 2f, got n={n}, f={self.f}")
