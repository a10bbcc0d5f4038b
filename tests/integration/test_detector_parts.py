"""The detector on updates sent in parts (``update.manifest`` + ``update.part``), on the
memory bus and on RabbitMQ, through the production bootstrap (the Wire of
test_detector_service): read ahead or read again at the listed manifests' offsets, into
rows in memory or in a file, the verdict is the one the same updates sent whole give."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import test_detector_service as base
from test_detector_service import (
    CLIENTS,
    JOB,
    READERS,
    Wire,
    assert_verdict,
    expected,
    flat,
    tensors,
    until,
)

from qflare.messages.envelope import peek_header
from qflare.messages.parts import encode_update_parts
from qflare.runtime.updates import Ref
from qflare.services.detector import service as detector_module

PART_VALUES = 5  # 12 values: 3 parts
# the detector tests' fixtures
fed, wire, fetches, matrices = base.fed, base.wire, base.fetches, base.matrices


async def parted(wire: Wire, client: str, round_no: int) -> Ref:
    """The client's update in parts, written into the stream: its manifest's ref."""
    messages = encode_update_parts(
        wire.fed[client],
        tensors(client, round_no),
        job=JOB,
        round=round_no,
        base_version=round_no - 1,
        num_samples=10,
        seal_to=[wire.fed[r].cert for r in READERS],
        part_values=PART_VALUES,
    )
    manifest = next(messages)
    ref = Ref(client, peek_header(manifest).body_digest, await wire.write(manifest))
    for data in messages:
        await wire.write(data)
    return ref


async def send(wire: Wire, round_no: int, mixed: bool) -> list[Ref]:
    """Every client's update of the round; with ``mixed`` every other one sent whole."""
    return [
        await (wire.update(c, round_no) if mixed and i % 2 else parted(wire, c, round_no))
        for i, c in enumerate(CLIENTS)
    ]


@pytest.mark.parametrize("rows", ["in-memory", "spilled"])
@pytest.mark.parametrize("path", ["read-ahead", "read-again"])
@pytest.mark.parametrize("mixed", [False, True], ids=["all-in-parts", "mixed"])
async def test_a_verdict_on_updates_in_parts_is_the_one_on_whole_updates(
    wire: Wire,
    fetches: list[list[Ref]],
    matrices: list[tuple[list[str], np.ndarray]],
    monkeypatch: pytest.MonkeyPatch,
    rows: str,
    path: str,
    mixed: bool,
) -> None:
    judged: list[str] = []
    real_source = detector_module.decide_source
    monkeypatch.setattr(
        detector_module,
        "decide_source",
        lambda *a, **kw: judged.append("source") or real_source(*a, **kw),
    )
    if rows == "spilled":
        wire.options = {"rows_in_memory_mb": 0}
    if path == "read-ahead":
        await wire.start_detector()
        refs = await send(wire, 1, mixed)
        await until(lambda: all((r.client, r.digest) in wire.held(1) for r in refs))
    else:  # started after the writes: every update read again at its listed offset
        refs = await send(wire, 1, mixed)
        await wire.start_detector()
    await wire.closed(1, refs)
    verdict = await wire.verdict(1)
    want = expected(1, {c: tensors(c, 1) for c in CLIENTS})
    if rows == "spilled":  # judged in column blocks: scores within float tolerance
        assert verdict.body.kept == list(want.kept) and verdict.body.note == want.note
        assert [f.client for f in verdict.body.flagged] == [x.client for x in want.flagged]
        assert judged == ["source"]
    else:
        assert_verdict(verdict, want)
        clients, x = matrices[-1]
        assert clients == list(CLIENTS)
        assert x.tobytes() == np.stack([flat(tensors(c, 1)) for c in CLIENTS]).tobytes()
    assert fetches == ([] if path == "read-ahead" else [sorted(refs, key=lambda r: r.offset)])
    assert wire.detector is not None and await wire.detector.store.pending() == []


async def test_the_read_ahead_sink_never_gets_an_update_in_parts_whole(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real_keep = detector_module.Detector._keep

    async def keep(self: Any, job_id: str, update: Any) -> Any:
        seen.append(update)
        return await real_keep(self, job_id, update)

    monkeypatch.setattr(detector_module.Detector, "_keep", keep)
    await wire.start_detector()
    refs = [await parted(wire, c, 1) for c in CLIENTS]
    await until(lambda: all((r.client, r.digest) in wire.held(1) for r in refs))
    assert sorted(u.client for u in seen) == sorted(CLIENTS)
    assert all(u.tensors == {} and u.layout is not None for u in seen)
