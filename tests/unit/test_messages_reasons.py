"""Every reason code is produced by the decoder for the input it names (one table, so a new
code cannot be added without a case here). Codes only services produce are listed apart."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from qflare.crypto import context_for
from qflare.crypto.pki import canonical
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import (
    Limits,
    MessageRejected,
    Reason,
    TensorSpec,
    Update,
    encode,
    open_envelope,
    packb,
    validate_update,
)
from qflare.messages.parts import PartAssembler, encode_update_parts

# Decided by services against their state (ingest: open round, participants, base version).
SERVICE_ONLY = {Reason.STALE_BASE, Reason.NOT_PARTICIPANT, Reason.ROUND_CLOSED}

FED: MemoryFederation = make_federation(clients=1)
FED.add("old", "client", valid_days=-1)
FED.add("early", "client", now=time.time() + 864000)
FED.add("gone", "client")
FED.revoke("gone")
OTHER = make_federation(clients=1, services=())
T = {"w": np.ones(4, np.float32)}


def env(who: str = "client-000", fed: MemoryFederation = FED, **kw: Any) -> bytes:
    return encode(
        "update", Update(base_version=0, num_samples=1, tensors=T), fed[who], job="j", round=1, **kw
    )


def raw(body: bytes = b"", ctx: str | None = None, **over: Any) -> bytes:
    ident = FED["client-000"]
    body = body or packb({"base_version": 0, "num_samples": 1, "tensors": T})
    h = {
        "v": 1,
        "kind": "update",
        "sender": ident.id,
        "cert": ident.cert.to_bytes(),
        "job": "j",
        "round": 1,
        "ts": int(time.time() * 1000),
        "nonce": os.urandom(16),
    }
    h.update(over)
    h["body_digest"] = hashlib.sha256(body).digest()
    sig = ident.key.sign(canonical(h), context_for(ctx or h["kind"]))
    return msgpack.packb({**h, "sig": sig, "body": body})


def tensor_body(header: list[Any], data: bytes) -> bytes:
    ext = msgpack.ExtType(1, msgpack.packb(header) + data)
    return msgpack.packb({"base_version": 0, "num_samples": 1, "tensors": {"w": ext}})


def opened(data: bytes, **kw: Any) -> Callable[[], object]:
    return lambda: open_envelope(data, FED.trust(), **kw)


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1
    return bytes(b)


def parts_case(then: int) -> Callable[[], object]:
    """An update in parts (one value each) whose manifest and part 0 came: part ``then`` next."""

    def run() -> object:
        datas = encode_update_parts(
            FED["client-000"], T, job="j", round=1, base_version=0, num_samples=1, part_values=1
        )
        manifest, *parts = (open_envelope(d, FED.trust()) for d in datas)
        asm = PartAssembler()
        asm.start(manifest)
        asm.add(parts[0])
        return asm.add(parts[then])

    return run


SPEC = [TensorSpec(name="w", dtype="float32", shape=[4])]
CASES: dict[Reason, Callable[[], object]] = {
    Reason.MALFORMED: opened(env()[:-3]),
    Reason.TOO_LARGE: opened(env(), limits=Limits(max_envelope_bytes=100)),
    Reason.TOO_DEEP: opened(b"\x91" * 1000 + b"\xc0"),
    Reason.UNSUPPORTED_VERSION: opened(raw(v=9)),
    Reason.UNKNOWN_KIND: opened(raw(kind="nope")),
    Reason.BAD_SCHEMA: opened(
        raw(packb({"base_version": 0, "num_samples": 1, "tensors": T, "x": 1}))
    ),
    Reason.BAD_DIGEST: opened(flip(env(), -2)),
    Reason.BAD_SIGNATURE: opened(raw(ctx="update.accepted")),
    Reason.UNKNOWN_SIGNER: opened(env(fed=OTHER)),
    Reason.EXPIRED: opened(env("old")),
    Reason.NOT_YET_VALID: opened(env("early")),
    Reason.REVOKED: opened(env("gone")),
    Reason.SENDER_MISMATCH: opened(raw(sender="someone")),
    Reason.ROLE_NOT_ALLOWED: opened(
        raw(packb({"version": 1, "digest": bytes(32), "epsilon": 0.0}), kind="model.published")
    ),
    Reason.CLOCK_SKEW: opened(raw(ts=int(time.time() * 1000) + 10**8)),
    Reason.WRONG_KIND: opened(env(), expect_kind="update.accepted"),
    Reason.WRONG_JOB: opened(env(), expect_job="other"),
    Reason.STALE_ROUND: opened(env(), expect_round=7),
    Reason.DUPLICATE: parts_case(0),  # part 0 again
    Reason.DTYPE_NOT_ALLOWED: opened(raw(tensor_body(["complex64", [1]], bytes(8)))),
    Reason.SHAPE_MISMATCH: opened(raw(tensor_body(["float32", [9]], bytes(16)))),
    Reason.NON_FINITE: lambda: validate_update(
        {"w": np.array([0, 1, np.nan, 2], np.float32)}, SPEC
    ),
    Reason.UNSEAL_FAILED: opened(env(seal_to=FED["ingest"].cert), kem_key=FED["aggregator"].kem),
    Reason.CHUNK_MISMATCH: parts_case(2),  # part 1 missing
    Reason.BAD_METRICS: opened(
        raw(packb({"base_version": 0, "num_samples": 1, "tensors": T, "metrics": {"x": math.nan}}))
    ),
}


def test_every_reason_has_a_case() -> None:
    assert set(CASES) | SERVICE_ONLY == set(Reason)


@pytest.mark.parametrize("reason", sorted(CASES, key=str), ids=str)
def test_reason(reason: Reason) -> None:
    with pytest.raises(MessageRejected) as exc:
        CASES[reason]()
    assert exc.value.reason is reason
    assert str(exc.value).startswith(reason.value)
