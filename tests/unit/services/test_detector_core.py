"""The detector's pure core: verdicts over a round, quarantine, detection off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qflare.messages.tensors import Layout, RoundRows
from qflare.robust import Reputation
from qflare.runtime.spill import SpilledRows, release
from qflare.services.detector.core import OutputLayer, decide, decide_rows, decide_source


def _round(
    seed: int, byzantine: tuple[str, ...] = ("c7", "c8", "c9")
) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(200).astype(np.float32)
    out = {}
    for i in range(10):
        cid = f"c{i}"
        honest = direction + 0.3 * rng.standard_normal(200).astype(np.float32)
        w = -8.0 * direction if cid in byzantine else honest
        out[cid] = {
            "w": w[:150].reshape(10, 15).astype(np.float32),
            "b": w[150:].astype(np.float32),
        }
    return out


def test_flags_exactly_the_byzantine_and_is_order_free() -> None:
    rep = Reputation()
    updates = _round(1)
    v = decide(1, updates, f=3, detection=True, reputation=rep)
    assert {x.client for x in v.flagged} == {"c7", "c8", "c9"}
    assert v.kept == tuple(f"c{i}" for i in range(7))
    assert all(x.score > 0 and x.reasons for x in v.flagged)
    shuffled = dict(reversed(list(updates.items())))
    again = decide(1, shuffled, f=3, detection=True, reputation=Reputation())
    assert again.kept == v.kept and again.flagged == v.flagged


def test_repeat_offenders_get_quarantined() -> None:
    rep = Reputation(threshold=2.5, decay=1.0)
    decide(1, _round(1), f=3, detection=True, reputation=rep)
    decide(2, _round(2), f=3, detection=True, reputation=rep)
    v3 = decide(3, _round(3), f=3, detection=True, reputation=rep)
    assert set(v3.newly_quarantined) == {"c7", "c8", "c9"}
    # Round 4: c9 behaves, but stays out while quarantined.
    v4 = decide(4, _round(4, byzantine=("c7", "c8")), f=3, detection=True, reputation=rep)
    c9 = next(x for x in v4.flagged if x.client == "c9")
    assert "quarantined" in c9.reasons and "c9" not in v4.kept


def test_detection_off_keeps_everyone() -> None:
    rep = Reputation()
    v = decide(1, _round(1), f=3, detection=False, reputation=rep)
    assert v.kept == tuple(sorted(_round(1))) and v.flagged == () and rep.clients == {}


def test_decide_rows_is_decide_over_the_same_matrix() -> None:
    updates = _round(2)
    a = decide(2, updates, f=3, detection=True, reputation=Reputation())
    rows = RoundRows(10)
    for c in updates:
        rows.add((c, b""), updates[c])
    clients, x = rows.matrix([(c, b"") for c in updates])
    b = decide_rows(2, clients, x, f=3, reputation=Reputation())
    assert a == b and {f.client for f in a.flagged} == {"c7", "c8", "c9"}


def test_an_arrival_order_must_name_exactly_the_rows() -> None:
    updates = _round(2)
    order = {c: float(i) for i, c in enumerate(sorted(updates))}
    decide(2, updates, f=3, detection=True, reputation=Reputation(), arrival=order)
    for bad in ({c: v for c, v in order.items() if c != "c0"}, {**order, "stranger": 99.0}):
        with pytest.raises(ValueError, match="arrival"):
            decide(2, updates, f=3, detection=True, reputation=Reputation(), arrival=bad)


def test_clients_refused_for_malformed_updates_count_against_f() -> None:
    # f = 3 and all three attackers were refused by ingest (round.closed.malformed = 3):
    # what is left is honest, so an unusual honest client is not flagged in their place
    updates = {c: u for c, u in _round(4, byzantine=()).items() if c not in ("c7", "c8", "c9")}
    updates["c6"] = {k: 6.0 * v for k, v in updates["c6"].items()}
    flagged = decide(1, updates, f=3, detection=True, reputation=Reputation()).flagged
    assert [x.client for x in flagged] == ["c6"]
    v = decide(1, updates, f=3, detection=True, reputation=Reputation(), malformed=3)
    assert v.flagged == () and len(v.kept) == 7
    # one of three refused: the two attackers left are still caught
    updates = _round(4, byzantine=("c8", "c9"))
    v = decide(1, updates, f=3, detection=True, reputation=Reputation(), malformed=1)
    assert {x.client for x in v.flagged} == {"c8", "c9"}


def _job_round(
    round_no: int, shapes: dict[str, tuple[int, ...]], *, nan: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Twelve clients on non-IID data (each keeps its own offset from the round's
    direction, round after round), c09 flips its sign, c10 and c11 send one copy between
    them; with ``nan`` c08's update is not finite."""
    d = sum(int(np.prod(s)) for s in shapes.values())
    direction = np.random.default_rng([round_no, 1]).standard_normal(d)
    out: dict[str, dict[str, np.ndarray]] = {}
    copy = 2.5 * direction + np.random.default_rng([round_no, 2]).standard_normal(d)
    for i in range(12):
        cid = f"c{i:02d}"
        own = np.random.default_rng([i, 3]).standard_normal(d)  # the client's skew
        noise = np.random.default_rng([round_no, i, 4]).standard_normal(d)
        w = direction + (1.5 if i == 3 else 0.4) * own + 0.3 * noise
        if cid == "c09":
            w = -4.0 * direction
        elif cid in ("c10", "c11"):
            w = copy
        elif cid == "c08" and nan:
            w = w.copy()
            w[d // 2] = np.nan
        flat = w.astype(np.float32)
        tensors, start = {}, 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name]))
            tensors[name] = flat[start : start + size].reshape(shapes[name])
            start += size
        out[cid] = tensors
    return out


@pytest.mark.parametrize(
    ("shapes", "block"),
    [
        ({"a": (37, 20), "b": (497,)}, 100),  # d = 1237 > the sketch: a column subset
        ({"a": (37, 20), "b": (497,)}, 512),
        ({"a": (37, 20), "b": (497,)}, 4096),  # one block wider than d
        ({"a": (10, 20), "b": (100,)}, 7),  # d = 300: the sketch is every column
        # d = 70001: two chunks of the 65536-column grid, blocks across the grid's edge
        ({"a": (100, 700), "b": (1,)}, 3000),
    ],
    ids=["d1237-b100", "d1237-b512", "d1237-b4096", "d300-b7", "d70001-b3000"],
)
def test_a_spilled_round_read_in_blocks_gets_the_in_memory_verdict(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], block: int
) -> None:
    """decide_source over a SpilledRows' block source gives decide_rows' verdict over the
    same rows in memory, round after round: kept, flagged, reasons, quarantines, note and
    scores equal (both compute on one column grid, so the scores are the same bits), and
    the reputation state (history, steadiness, records) afterwards equal."""
    in_memory, spilled = Reputation(), Reputation()
    layout = Layout.of(_job_round(1, shapes)["c00"])
    assert (layout.size > in_memory.sketch) == (layout.size != 300)
    seen: set[str] = set()
    caught = 0
    for round_no in range(1, 9):
        updates = _job_round(round_no, shapes, nan=round_no == 3)
        malformed = 1 if round_no == 5 else 0
        clients = sorted(updates)
        refs = [(c, b"d") for c in clients]
        rows, file_rows = RoundRows(len(clients)), SpilledRows(tmp_path, len(clients))
        for ref in reversed(refs):  # arrival order does not matter
            rows.add(ref, updates[ref[0]])
            file_rows.add(ref, updates[ref[0]])
        try:
            with pytest.raises(TypeError):
                file_rows.matrix(refs)
            ids, x = rows.matrix(refs)
            want = decide_rows(round_no, ids, x, f=3, reputation=in_memory, malformed=malformed)
            ids_s, src = file_rows.source(refs)
            assert ids_s == ids and src.shape == x.shape
            got = decide_source(
                round_no, ids_s, src, f=3, reputation=spilled, malformed=malformed, block=block
            )
        finally:
            release(file_rows)
        assert got.kept == want.kept
        assert [(c.client, c.reasons) for c in got.flagged] == [
            (c.client, c.reasons) for c in want.flagged
        ]
        assert [c.score for c in got.flagged] == [c.score for c in want.flagged]
        assert got.newly_quarantined == want.newly_quarantined and got.note == want.note
        assert in_memory.to_dict() == spilled.to_dict()
        for c in want.flagged:
            seen.update(c.reasons)
        caught += "c09" not in want.kept
        assert "c10" not in want.kept and "c11" not in want.kept  # the copies, every round
    # the sign flip is let through only where f flags went to copies and a non-finite row;
    # the rounds went through direction, copies, non-finite rows, history and quarantine
    assert caught == 6
    assert {"cosine", "duplicate", "non_finite", "inconsistent", "quarantined"} <= seen, seen


HEAD = ("head.weight", "head.bias")
FLIPPERS = ("c01", "c05", "c07")


def _label_round(
    round_no: int, body: int, *, nan: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """Twelve clients of a classifier whose output layer ``head`` (10 classes, 16 hidden
    features) is updated as one SGD step of cross-entropy at uniform predictions: each
    client's images of class k have features proto[k] + noise, its class mix is its own
    (Dirichlet 0.3, fixed across rounds), FLIPPERS label class k as 9 - k; ``body`` other
    values are ordinary noise around a shared direction. With ``nan`` c08's head is not
    finite."""
    classes, hidden = 10, 16
    protos = np.abs(np.random.default_rng(7).standard_normal((classes, hidden))) + 0.5
    direction = np.random.default_rng([round_no, 1]).standard_normal(body)
    out: dict[str, dict[str, np.ndarray]] = {}
    for i in range(12):
        cid = f"c{i:02d}"
        counts = np.round(60 * np.random.default_rng([i, 5]).dirichlet(np.full(classes, 0.3)))
        rng = np.random.default_rng([round_no, i, 6])
        weight, bias = np.zeros((classes, hidden)), np.zeros(classes)
        for k in np.flatnonzero(counts):
            h = protos[k] + 0.3 * rng.standard_normal((int(counts[k]), hidden))
            label = classes - 1 - k if cid in FLIPPERS else k
            weight[label] += h.sum(axis=0)
            bias[label] += len(h)
            weight -= h.sum(axis=0) / classes
            bias -= len(h) / classes
        if cid == "c08" and nan:
            weight[3, 2] = np.nan
        out[cid] = {
            "body": (direction + 0.3 * rng.standard_normal(body)).astype(np.float32),
            "head.weight": (weight / 60).astype(np.float32),
            "head.bias": (bias / 60).astype(np.float32),
        }
    return out


def test_label_flippers_are_flagged_on_their_labels_and_no_one_else() -> None:
    rep, off = Reputation(), Reputation()
    for round_no in range(1, 6):
        updates = _label_round(round_no, 200)
        v = decide(1 + round_no, updates, f=3, detection=True, reputation=rep, output_layer=HEAD)
        on_labels = {x.client for x in v.flagged if "label_consistency" in x.reasons}
        # at most f flags: in round 5 a client flagged on its steadiness takes one of them
        # from a flipper, which is quarantined by then
        assert on_labels <= set(FLIPPERS) and not set(FLIPPERS) & set(v.kept)
        assert on_labels == set(FLIPPERS) or round_no == 5
        plain = decide(1 + round_no, updates, f=3, detection=True, reputation=off)
        assert not any("label_consistency" in x.reasons for x in plain.flagged)
    assert set(rep.labels) == set(_label_round(1, 200)) and off.labels == {}


@pytest.mark.parametrize(("body", "block"), [(1200, 100), (1200, 4096), (100, 7)])
def test_label_consistency_read_in_blocks_gets_the_in_memory_verdict(
    tmp_path: Path, body: int, block: int
) -> None:
    """decide_source gathers the output layer's columns in its one pass and gives
    decide_rows' verdict, label flags and windows included, round after round."""
    in_memory, spilled = Reputation(), Reputation()
    for round_no in range(1, 6):
        updates = _label_round(round_no, body, nan=round_no == 3)
        clients = sorted(updates)
        refs = [(c, b"d") for c in clients]
        rows, file_rows = RoundRows(len(clients)), SpilledRows(tmp_path, len(clients))
        for ref in refs:
            rows.add(ref, updates[ref[0]])
            file_rows.add(ref, updates[ref[0]])
        layout = rows.layout
        assert layout is not None
        output = OutputLayer.of(layout, HEAD)
        try:
            ids, x = rows.matrix(refs)
            want = decide_rows(round_no, ids, x, f=3, reputation=in_memory, output=output)
            ids_s, src = file_rows.source(refs)
            got = decide_source(
                round_no, ids_s, src, f=3, reputation=spilled, block=block, output=output
            )
        finally:
            release(file_rows)
        assert got.kept == want.kept
        assert [(c.client, c.reasons) for c in got.flagged] == [
            (c.client, c.reasons) for c in want.flagged
        ]
        assert in_memory.labels == spilled.labels
        # every flipper is flagged on its labels (the f cap lets one go in round 3, where
        # c08's non-finite update takes a flag), no one else is
        on_labels = {c.client for c in want.flagged if "label_consistency" in c.reasons}
        assert on_labels <= set(FLIPPERS) and (round_no == 3 or not set(FLIPPERS) & set(want.kept))
    assert "c08" in in_memory.labels and len(in_memory.labels["c08"]) == 4  # not round 3


def test_the_output_layer_is_found_in_the_layout_or_refused() -> None:
    layout = Layout.of(_label_round(1, 30)["c00"])  # body [30], head.bias [10], head.weight
    out = OutputLayer.of(layout, HEAD)
    assert (out.weight_at, out.bias_at, out.classes, out.hidden) == (40, 30, 10, 16)
    assert out.columns.tolist() == [*range(40, 200), *range(30, 40)]
    with pytest.raises(ValueError, match=r"'head\.w', which the model does not have"):
        OutputLayer.of(layout, ("head.w", "head.bias"))
    with pytest.raises(ValueError, match=r"'body' has shape \[30\]"):
        OutputLayer.of(layout, ("body", "head.bias"))
    with pytest.raises(ValueError, match=r"'head.weight' has shape \[10, 16\], 'body' \[30\]"):
        OutputLayer.of(layout, ("head.weight", "body"))
    one = Layout.of({"w": np.zeros((1, 4), np.float32), "b": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="at least 2 classes"):
        OutputLayer.of(one, ("w", "b"))
    with pytest.raises(ValueError, match="which the model does not have"):
        decide(
            1,
            _label_round(1, 30),
            f=3,
            detection=True,
            reputation=Reputation(),
            output_layer=("w", "b"),
        )
