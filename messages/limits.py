"""Size limits for untrusted input, all checked before the matching allocation."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

#: Tensor dtypes accepted on the wire, by their canonical name (always little-endian).
ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
    )
}

MiB = 1024 * 1024

#: Envelopes above this size are encoded, verified and decoded in a worker thread, so the
#: event loop keeps serving (ML-DSA and SHA-256 release the GIL).
OFF_LOOP_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a decoder accepts. Defaults suit model updates of a few hundred MB
    sent in parts; ``max_envelope_bytes`` stays under RabbitMQ's 128 MiB message limit."""

    max_envelope_bytes: int = 120 * MiB
    """One envelope on the wire (a part, or a whole small message)."""
    max_body_bytes: int = 1024 * MiB
    """An update or a model sent in parts, whole (the size its manifest declares)."""
    max_depth: int = 8
    """Container nesting (maps/arrays) inside a body."""
    max_container_len: int = 100_000
    """Entries in one map or array."""
    max_str_len: int = 4096
    """Bytes in one string (names, ids, details)."""
    max_bin_len: int = 120 * MiB
    """Bytes in one non-tensor binary field."""
    max_tensors: int = 4096
    """Tensors in one body."""
    max_ndim: int = 8
    """Dimensions of one tensor."""
    max_elements: int = 512 * MiB
    """Elements of one tensor."""
    max_total_elements: int = 512 * MiB
    """Elements of all tensors in one body together."""
    max_clock_skew_s: float = 300.0
    """How far in the future an envelope's timestamp may lie."""

    def with_(self, **changes: Any) -> Limits:
        return replace(self, **changes)


DEFAULT_LIMITS = Limits()
