"""Signed envelopes over the transport, on the in-memory bus and on RabbitMQ.

- sign -> encode -> publish -> consume -> verify -> decode gives the same tensors bit for bit
  (plain and sealed to ingest's KEM key);
- a consumer that opens envelopes rejects each bad one with its reason code (REJECT, so it
  is dead-lettered) and goes on serving the good ones after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from qflare.bus import Bus, Delivery, Outcome, QueueSpec, topology
from qflare.crypto import context_for
from qflare.crypto.pki import canonical
from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import (
    MessageRejected,
    Reason,
    TensorSpec,
    Update,
    encode,
    open_envelope,
    validate_update,
)

JOB = "job-bus"
ROUTE = f"update.{JOB}"


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    f = make_federation(clients=2)
    f.add("expired", "client", valid_days=-1)
    f.add("revoked", "client")
    f.revoke("revoked")
    return f


def model_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 72)).astype(np.float16),
        "fc.bias": rng.standard_normal(10).astype(np.float64),
        "steps": np.array([7, -1, 2**40], dtype=np.int64),
        "mask": rng.integers(0, 2, 33).astype(bool),
    }


class Opener:
    """A consume handler in the shape services use: open, validate, ack or reject."""

    def __init__(
        self, fed: MemoryFederation, spec: list[TensorSpec] | None = None, sealed: bool = False
    ) -> None:
        self.trust = fed.trust()
        self.kem = fed["ingest"].kem if sealed else None
        self.spec = spec
        self.accepted: dict[str, dict[str, np.ndarray]] = {}
        self.rejected: dict[str, Reason] = {}
        self.changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> Outcome:
        tag = str(delivery.headers.get("tag"))
        try:
            env = open_envelope(
                delivery.body,
                self.trust,
                expect_kind="update",
                expect_job=JOB,
                expect_round=1,
                kem_key=self.kem,
            )
            if self.spec is not None:
                validate_update(env.body.tensors, self.spec)
        except MessageRejected as exc:
            self.rejected[tag] = exc.reason
            self.changed.set()
            return Outcome.REJECT
        self.accepted[tag] = dict(env.body.tensors)
        self.changed.set()
        return Outcome.ACK

    @property
    def count(self) -> int:
        return len(self.accepted) + len(self.rejected)


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
async def test_round_trip_is_bit_exact(
    bus: Bus, fed: MemoryFederation, sealed: bool, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    opener = Opener(fed, sealed=sealed)
    await bus.consume(QueueSpec("ingest", bindings=((topology.CLIENT, "update.#"),)), opener)
    sent = {}
    for i, client in enumerate(("client-000", "client-001")):
        tensors = model_tensors(i)
        sent[client] = tensors
        data = encode(
            "update",
            Update(base_version=0, num_samples=10 + i, tensors=tensors),
            fed[client],
            job=JOB,
            round=1,
            seal_to=fed["ingest"].cert if sealed else None,
        )
        assert await bus.publish(topology.CLIENT, ROUTE, data, {"tag": client})
    await wait_for(lambda: opener.count == 2, timeout=10)
    assert opener.rejected == {}
    for client, tensors in sent.items():
        got = opener.accepted[client]
        assert got.keys() == tensors.keys()
        for name, array in tensors.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape
            assert got[name].tobytes() == array.tobytes(), (client, name)


def _raw(fed: MemoryFederation, body: bytes, ctx: str = "update") -> bytes:
    ident = fed["client-000"]
    h = {
        "v": 1,
        "kind": "update",
        "sender": ident.id,
        "cert": ident.cert.to_bytes(),
        "job": JOB,
        "round": 1,
        "ts": int(time.time() * 1000),
        "nonce": b"n" * 16,
    }
    h["body_digest"] = hashlib.sha256(body).digest()
    return msgpack.packb({**h, "sig": ident.key.sign(canonical(h), context_for(ctx)), "body": body})


async def test_consumer_rejects_each_bad_message_and_keeps_serving(
    bus: Bus, fed: MemoryFederation, wait_for: Callable[..., Awaitable[Any]]
) -> None:
    spec = [TensorSpec(name="w", dtype="float32", shape=[4, 4])]
    good_t = {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}

    def upd(who: str = "client-000", tensors: dict[str, np.ndarray] = good_t, **kw: Any) -> bytes:
        return encode(
            "update",
            Update(base_version=0, num_samples=1, tensors=tensors),
            fed[who],
            job=JOB,
            round=kw.pop("round", 1),
            **kw,
        )

    good = upd()
    fields = msgpack.unpackb(good)
    fields["sig"] = bytes([fields["sig"][0] ^ 1]) + fields["sig"][1:]
    forged = msgpack.packb(fields)
    nan = good_t["w"].copy()
    nan[1, 2] = np.nan
    from qflare.messages import packb

    body = packb({"base_version": 0, "num_samples": 1, "tensors": good_t})
    cases: list[tuple[str, bytes, Reason | None]] = [
        ("good-1", good, None),
        ("forged", bytes(forged), Reason.BAD_SIGNATURE),
        ("other-kind", _raw(fed, body, ctx="update.accepted"), Reason.BAD_SIGNATURE),
        ("garbled", b"\x8b\xc1" + good[2:200], Reason.MALFORMED),
        ("truncated", good[: len(good) // 2], Reason.MALFORMED),
        ("bomb", b"\x91" * 50_000 + b"\xc0", Reason.TOO_DEEP),
        (
            "unknown-signer",
            encode(
                "update",
                Update(base_version=0, num_samples=1, tensors=good_t),
                make_federation(1, services=())["client-000"],
                job=JOB,
                round=1,
            ),
            Reason.UNKNOWN_SIGNER,
        ),
        ("expired", upd("expired"), Reason.EXPIRED),
        ("revoked", upd("revoked"), Reason.REVOKED),
        ("stale", upd(round=0), Reason.STALE_ROUND),
        ("shape", upd(tensors={"w": np.zeros((2, 8), np.float32)}), Reason.SHAPE_MISMATCH),
        ("dtype", upd(tensors={"w": np.zeros((4, 4), np.float64)}), Reason.DTYPE_NOT_ALLOWED),
        ("nan", upd(tensors={"w": nan}), Reason.NON_FINITE),
        ("good-2", upd("client-001"), None),
    ]
    opener = Opener(fed, spec)
    dead: list[Delivery] = []
    dead_seen = asyncio.Event()

    async def drain(d: Delivery) -> Outcome:
        dead.append(d)
        dead_seen.set()
        return Outcome.ACK

    await bus.consume(topology.dead_letters("dead", "update.#"), drain)
    await bus.consume(
        QueueSpec("ingest", bindings=((topology.CLIENT, "update.#"),)), opener, prefetch=4
    )
    for tag, data, _ in cases:
        await bus.publish(topology.CLIENT, ROUTE, data, {"tag": tag})
    await wait_for(lambda: opener.count == len(cases), timeout=15)
    assert set(opener.accepted) == {"good-1", "good-2"}
    assert opener.rejected == {tag: r for tag, _, r in cases if r is not None}
    await wait_for(lambda: len(dead) == len(cases) - 2, timeout=15)
    assert {d.headers.get("tag") for d in dead} == set(opener.rejected)
