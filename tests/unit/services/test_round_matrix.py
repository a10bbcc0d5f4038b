"""The aggregator's round matrix: the kept updates written into rows as they arrive
(qflare.messages.tensors.RoundRows) give, bit for bit, the model of stacking the decoded
updates at the verdict (core.aggregate), whatever the arrival order, the kept set, a reuse
of the matrix for the next round, or a rebuild from the stream after a restart."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qflare.messages.jobs import JobSpec
from qflare.messages.tensors import Layout, RoundRows
from qflare.runtime.spill import (
    SPILL_BLOCK_BYTES,
    SpilledRows,
    release,
    round_rows,
    spill_block,
)
from qflare.services.aggregator.core import (
    Aggregate,
    AggregationResult,
    aggregate,
    aggregate_matrix,
    aggregate_rows,
    aggregate_source,
)

CLIENTS = tuple(f"c{i:03d}" for i in range(24))
BASE = {
    "w": np.random.default_rng(0).standard_normal((16, 9)).astype(np.float32),
    "b": np.zeros(5, np.float16),
    "s": np.ones(3, np.float64),
}


def spec(rule: str = "mean", **kw: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        job_id="j",
        rounds=5,
        participants=CLIENTS,
        rule=rule,
        f=4,
        detection=False,
        noise_multiplier=1.0,
        clip=1.5,
        seed=99,
    )
    return JobSpec.model_validate({**base, **kw})


def update(client: str, round_no: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([round_no, int(client[1:])])
    scale = rng.uniform(0.2, 3.0)  # some inside the clip, some clipped
    return {k: (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in BASE.items()}


def command(round_no: int, kept: list[str], population: int = len(CLIENTS)) -> Aggregate:
    refs = tuple((c, digest(c, round_no), i) for i, c in enumerate(sorted(kept)))
    return Aggregate(
        round_no, round_no - 1, tuple(sorted(kept)), (), refs, 1.2, population=population
    )


def digest(client: str, round_no: int) -> bytes:
    return f"{client}/{round_no}".encode()


def stacked(s: JobSpec, cmd: Aggregate) -> AggregationResult:
    """Today's path: the decoded updates, stacked at the verdict."""
    return aggregate(s, cmd, BASE, {c: update(c, cmd.round) for c in cmd.kept})


def from_rows(s: JobSpec, cmd: Aggregate, rows: RoundRows) -> AggregationResult:
    clients, x = rows.matrix([(c, d) for c, d, _o in cmd.updates])
    return aggregate_matrix(s, cmd, BASE, clients, x)


def assert_same(a: AggregationResult, b: AggregationResult) -> None:
    assert a.kept == b.kept and a.next_clip == b.next_clip and a.update_norm == b.update_norm
    for name, tensor in a.model.items():
        assert tensor.dtype == b.model[name].dtype
        assert np.array_equal(tensor, b.model[name]), name


#: rules and settings every way of building the round's rows must agree on
RULE_CASES = [
    ("mean", {}),
    ("median", {}),
    ("krum", {}),
    ("trimmed_mean", {}),
    ("mean", {"noise_multiplier": 0.0}),
    ("mean", {"adaptive_clip": True, "clip_count_noise_std": 2.0}),
]


def fill(rows: RoundRows, clients: list[str], round_no: int, generation: int | None = None) -> None:
    for c in clients:
        rows.add((c, digest(c, round_no)), update(c, round_no), generation)


@pytest.mark.parametrize("rule,kw", RULE_CASES)
def test_any_arrival_order_gives_the_model_of_stacking(rule: str, kw: dict[str, Any]) -> None:
    s = spec(rule, **kw)
    participants = list(CLIENTS[:20])  # the round's selection, in client-id order
    sent = [c for c in participants if c not in ("c003", "c011")]
    kept = [c for c in sent if c not in ("c007", "c019")]  # flagged
    want = stacked(s, command(1, kept))
    for seed in range(3):
        arrival = sent.copy()
        random.Random(seed).shuffle(arrival)
        rows = RoundRows(len(participants), participants, Layout.of(BASE))
        fill(rows, arrival, 1)
        rows.add(("c007", b"a second digest"), update("c008", 1))  # held, never kept
        assert_same(from_rows(s, command(1, kept), rows), want)


def test_the_matrix_is_reused_round_after_round_with_other_kept_sets() -> None:
    s = spec("median")
    layout = Layout.of(BASE)
    rows = RoundRows(len(CLIENTS), CLIENTS, layout)
    matrices = []
    for round_no, (selected, kept) in enumerate(
        [
            (CLIENTS, [c for c in CLIENTS if c != "c005"]),
            (CLIENTS[3:], list(CLIENTS[3:10])),
            (CLIENTS, list(CLIENTS)),
        ],
        start=1,
    ):
        generation = rows.reset(len(selected), selected, layout) if round_no > 1 else 0
        arrival = list(selected)
        random.Random(round_no).shuffle(arrival)
        fill(rows, arrival, round_no, generation)
        clients, x = rows.matrix([(c, digest(c, round_no)) for c in sorted(kept)])
        matrices.append(x)
        got = aggregate_matrix(s, command(round_no, kept), BASE, clients, x)
        assert_same(got, stacked(s, command(round_no, kept)))
    assert all(np.shares_memory(matrices[0], m) for m in matrices[1:])


def test_a_restart_rebuilds_the_matrix_from_the_stream() -> None:
    """After a restart the read-ahead reads the round again from its start offset and the
    verdict reads what it still lacks at the recorded offsets (UpdateFeed.fetch hands them
    over by client): in whatever order and split, the same model."""
    s = spec("trimmed_mean")
    kept = [c for c in CLIENTS if c not in ("c001", "c002")]
    want = stacked(s, command(1, kept))
    read_ahead = [c for c in CLIENTS if int(c[1:]) % 3 == 0]
    fetched = {c: update(c, 1) for c in reversed(kept) if c not in read_ahead}
    rows = RoundRows(len(CLIENTS), CLIENTS, Layout.of(BASE))
    fill(rows, read_ahead, 1)
    for c, tensors in fetched.items():
        rows.add((c, digest(c, 1)), tensors)
    assert_same(from_rows(s, command(1, kept), rows), want)


def test_a_round_that_keeps_nobody_releases_noise_only_as_before() -> None:
    s = spec()
    rows = RoundRows(4, CLIENTS[:4], Layout.of(BASE))
    fill(rows, list(CLIENTS[:4]), 1)
    assert_same(from_rows(s, command(1, []), rows), stacked(s, command(1, [])))


def test_rows_of_other_clients_than_the_kept_are_refused() -> None:
    s = spec()
    x = np.zeros((2, Layout.of(BASE).size), np.float32)
    with pytest.raises(ValueError, match="keeps"):
        aggregate_matrix(s, command(1, ["c000", "c001"]), BASE, ["c000", "c002"], x)
    common: dict[str, Any] = dict(
        job="j",
        round_no=1,
        seed=1,
        base=BASE,
        rule="mean",
        f=0,
        clip=1.0,
        noise_multiplier=0.0,
        expected_clients=2.0,
    )
    with pytest.raises(ValueError, match="client-id order"):
        aggregate_rows(clients=["c001", "c000"], rows=x, **common)
    with pytest.raises(ValueError, match="rows of"):
        aggregate_rows(clients=["c000", "c001"], rows=x[:, :5], **common)


# -- a round too large for memory: the rows in a file (qflare.runtime.spill) -----------------
@pytest.mark.parametrize("rule,kw", RULE_CASES)
@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_spilled_rows_aggregated_by_blocks_give_the_model_of_stacking(
    rule: str, kw: dict[str, Any], block: int, tmp_path: Path
) -> None:
    s = spec(rule, **kw)
    participants = list(CLIENTS[:20])
    sent = [c for c in participants if c not in ("c003", "c011")]
    kept = [c for c in sent if c not in ("c007", "c019")]
    cmd = command(1, kept)
    rows = SpilledRows(tmp_path, len(participants), participants, Layout.of(BASE))
    arrival = sent.copy()
    random.Random(block).shuffle(arrival)
    fill(rows, arrival, 1)
    rows.add(("c007", b"a second digest"), update("c008", 1))  # held, never kept
    clients, src = rows.source([(c, d) for c, d, _o in cmd.updates])
    assert_same(aggregate_source(s, cmd, BASE, clients, src, block), stacked(s, cmd))
    rows.close()


def test_spilled_rows_hold_what_was_written_and_nothing_in_memory(tmp_path: Path) -> None:
    layout = Layout.of(BASE)
    rows = SpilledRows(tmp_path / "rows", 2, ["c001", "c002"], layout)
    assert list(tmp_path.joinpath("rows").iterdir()) == []  # unlinked at once
    generation = rows.generation
    fill(rows, ["c002", "c001", "c005"], 1, generation)  # c005: no home row, grows past 2
    assert len(rows) == 3 and ("c005", digest("c005", 1)) in rows
    clients, src = rows.source([(c, digest(c, 1)) for c in ("c005", "c001")])
    assert clients == ["c001", "c005"] and src.shape == (2, layout.size)
    want = np.stack([layout.flatten(update(c, 1)) for c in clients])
    assert np.array_equal(src.block(0, layout.size), want)
    assert np.array_equal(src.block(3, 11), want[:, 3:11])
    with pytest.raises(TypeError, match="source"):
        rows.matrix([("c001", digest("c001", 1))])
    with pytest.raises(KeyError):
        rows.source([("c003", digest("c003", 1))])
    with pytest.raises(ValueError, match="within"):
        src.block(5, layout.size + 1)
    # a write for the round before a reset is dropped; the next round reuses the rows
    later = rows.reset(2, ["c001", "c002"], layout)
    assert not rows.add(("c002", digest("c002", 2)), update("c002", 2), generation)
    assert rows.add(("c002", digest("c002", 2)), update("c002", 2), later)
    _clients, again = rows.source([("c002", digest("c002", 2))])
    assert np.array_equal(again.block(0, layout.size)[0], layout.flatten(update("c002", 2)))
    rows.close()


def test_a_round_spills_only_past_its_budget(tmp_path: Path) -> None:
    layout = Layout.of(BASE)
    size = 20 * layout.size * 4
    assert type(round_rows(tmp_path, size, 20, CLIENTS[:20], layout)) is RoundRows
    spilled = round_rows(tmp_path, size - 1, 20, CLIENTS[:20], layout)
    assert isinstance(spilled, SpilledRows)
    release(spilled)
    assert type(round_rows(tmp_path, 0, 20, CLIENTS[:20])) is RoundRows  # no layout yet
    assert spill_block(0, 100) == 65_536  # never narrower than the aggregation's grid
    # a block holds at most SPILL_BLOCK_BYTES of rows (a quarter of the budget if less),
    # whatever the budget: a spilled round costs the same memory at any size
    assert spill_block(2**30, 100) == SPILL_BLOCK_BYTES // 400 == spill_block(2**40, 100)
    assert spill_block(2**26, 2) == 2**24 // 8


def test_released_spilled_rows_take_no_more_writes(tmp_path: Path) -> None:
    layout = Layout.of(BASE)
    rows = SpilledRows(tmp_path, 2, ["c001", "c002"], layout)
    generation = rows.generation
    release(rows)
    # a late write for the round is dropped; one without a generation is refused
    assert not rows.add(("c001", digest("c001", 1)), update("c001", 1), generation)
    with pytest.raises(ValueError, match="released"):
        rows.add(("c002", digest("c002", 1)), update("c002", 1))
