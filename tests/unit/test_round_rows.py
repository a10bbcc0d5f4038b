"""RoundRows (qflare.messages.tensors): a round's updates as the rows of one float32 matrix,
written as they arrive, shared by the aggregator and the detector."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from qflare.messages import tensors as tensors_module
from qflare.messages.tensors import Layout, RoundRows, _gather_rows, fresh_rows

CLIENTS = tuple(f"c{i}" for i in range(10))


def update(client: str, round_no: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([round_no, int(client[1:])])
    w = rng.standard_normal(200).astype(np.float32)
    return {"w": w[:150].reshape(10, 15), "b": w[150:]}


def flat(u: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([u["b"], u["w"].ravel()])


def stacked(clients: list[str] | tuple[str, ...], round_no: int = 1) -> np.ndarray:
    """Today's stacking: one flattened row per client, in client-id order."""
    return np.stack([flat(update(c, round_no)) for c in sorted(clients)])


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The permutations RoundRows applies in place."""
    seen: list[list[int]] = []
    real = tensors_module._gather_rows

    def spy(x: np.ndarray, idx: list[int], live: Any = None) -> None:
        seen.append(list(idx))
        real(x, idx, live)

    monkeypatch.setattr(tensors_module, "_gather_rows", spy)
    return seen


def test_rows_hold_tensors_in_name_order_as_float32() -> None:
    rows = RoundRows(2)
    rows.add(("c1", b"d"), {"b": np.array([3.0]), "a": np.array([[1.0, 2.0]])})
    clients, x = rows.matrix([("c1", b"d")])
    assert clients == ["c1"] and x.tolist() == [[1.0, 2.0, 3.0]] and x.dtype == np.float32


@pytest.mark.parametrize("capacity", [1, 3, 10])
@pytest.mark.parametrize("homes", [(), CLIENTS])
def test_rows_in_any_arrival_order_give_the_sorted_matrix(
    capacity: int, homes: tuple[str, ...]
) -> None:
    expected = stacked(CLIENTS)
    for arrival in (
        sorted(CLIENTS),
        sorted(CLIENTS, reverse=True),
        list(np.random.default_rng(0).permutation(CLIENTS)),
    ):
        rows = RoundRows(capacity, homes)  # small capacities grow while rows arrive
        for c in arrival:
            assert rows.add((c, c.encode()), update(c))
        # a redelivery is ignored
        assert not rows.add((arrival[0], arrival[0].encode()), update(arrival[1]))
        assert len(rows) == 10
        refs = [(c, c.encode()) for c in arrival]
        clients, x = rows.matrix(refs)
        assert clients == sorted(CLIENTS) and np.array_equal(x, expected)
        clients, again = rows.matrix(refs)  # asking again after the reorder
        assert np.array_equal(again, expected)


def test_with_a_home_row_per_client_a_full_round_moves_nothing(moves: list[list[int]]) -> None:
    rows = RoundRows(len(CLIENTS), CLIENTS)
    for c in reversed(CLIENTS):
        rows.add((c, b"d"), update(c))
    _clients, x = rows.matrix([(c, b"d") for c in CLIENTS])
    assert moves == [] and np.array_equal(x, stacked(CLIENTS))
    assert x.base is not None and x.flags.c_contiguous  # a view of the matrix, not a copy


def test_kept_rows_are_compacted_in_place_and_the_rest_stay_held(
    moves: list[list[int]],
) -> None:
    # c2 and c5 never sent; c7 sent twice (its second digest goes after the home rows); c3
    # is not kept
    rows = RoundRows(len(CLIENTS), CLIENTS)
    sent = [c for c in CLIENTS if c not in ("c2", "c5")]
    for c in reversed(sent):
        rows.add((c, b"d"), update(c))
    rows.add(("c7", b"second"), update("c7", round_no=9))
    kept = [c for c in sent if c != "c3"]
    clients, x = rows.matrix([(c, b"d") for c in kept])
    assert clients == kept and np.array_equal(x, stacked(kept))
    assert len(moves) == 1 and x.base is not None
    assert len(rows) == len(sent) + 1  # nothing dropped
    _c, other = rows.matrix([("c3", b"d"), ("c7", b"second")])
    assert np.array_equal(other, np.stack([flat(update("c3")), flat(update("c7", 9))]))
    with pytest.raises(KeyError):
        rows.matrix([("c1", b"other digest")])
    with pytest.raises(ValueError, match="one row per client"):
        rows.matrix([("c1", b"d"), ("c1", b"e")])


def test_a_second_update_of_a_client_goes_after_the_home_rows() -> None:
    rows = RoundRows(2, ("a", "b"))
    rows.add(("a", b"2"), {"w": np.full(2, 2.0, np.float32)})
    rows.add(("a", b"1"), {"w": np.full(2, 1.0, np.float32)})
    rows.add(("z", b"1"), {"w": np.full(2, 9.0, np.float32)})  # a client not named: after too
    rows.add(("b", b"1"), {"w": np.full(2, 3.0, np.float32)})
    assert np.array_equal(rows.matrix([("a", b"1"), ("b", b"1")])[1], [[1.0, 1.0], [3.0, 3.0]])
    assert np.array_equal(rows.matrix([("a", b"2"), ("z", b"1")])[1], [[2.0, 2.0], [9.0, 9.0]])
    assert np.array_equal(rows.matrix([("b", b"1")])[1], [[3.0, 3.0]])


def test_reset_reuses_the_matrix_for_another_round_and_kept_set(moves: list[list[int]]) -> None:
    layout = Layout.of(update("c0"))
    rows = RoundRows(len(CLIENTS), CLIENTS, layout)
    for c in CLIENTS:
        rows.add((c, b"1"), update(c, 1))
    kept1 = [c for c in CLIENTS if c not in ("c4", "c8")]
    _c, x1 = rows.matrix([(c, b"1") for c in kept1])
    assert np.array_equal(x1, stacked(kept1, 1))
    x1 *= 0.5  # the aggregation clips the rows in place
    # round 2: other participants (fewer), another kept set, the same memory
    round2 = CLIENTS[2:9]
    generation = rows.reset(len(round2), round2, layout)
    assert len(rows) == 0 and ("c0", b"1") not in rows
    late = rows.generation - 1  # a write meant for round 1, after the reset: ignored
    assert not rows.add(("c0", b"1"), update("c0", 1), late) and len(rows) == 0
    for c in reversed(round2):
        assert rows.add((c, b"2"), update(c, 2), generation)
    kept2 = [c for c in round2 if c != "c5"]
    clients, x2 = rows.matrix([(c, b"2") for c in kept2])
    assert clients == kept2 and np.array_equal(x2, stacked(kept2, 2))
    assert np.shares_memory(x1, x2), "the matrix is reused"


def test_reset_allocates_anew_when_the_round_does_not_fit() -> None:
    rows = RoundRows(2)
    rows.add(("a", b""), {"w": np.ones(3, np.float32)})
    _c, x1 = rows.matrix([("a", b"")])
    rows.reset(4, ("a", "b", "c", "d"))  # more rows than reserved
    rows.add(("d", b""), {"w": np.ones(3, np.float32)})
    assert not np.shares_memory(x1, rows.matrix([("d", b"")])[1])
    rows.reset(4, (), Layout.of({"w": np.ones(5, np.float32)}))  # another width
    rows.add(("a", b""), {"w": np.full(5, 2.0, np.float32)})
    assert rows.matrix([("a", b"")])[1].tolist() == [[2.0] * 5]
    with pytest.raises(ValueError, match="unique"):
        rows.reset(2, ("a", "a"))


def test_an_update_of_another_layout_is_refused() -> None:
    rows = RoundRows(4)
    rows.add(("c0", b""), {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="c1"):
        rows.add(("c1", b""), {"w": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="c2"):
        rows.add(("c2", b""), {"v": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="c3"):  # same size, another shape
        rows.add(("c3", b""), {"w": np.zeros((3, 1), np.float32)})
    with pytest.raises(ValueError, match="c4"):  # same shape, another dtype
        rows.add(("c4", b""), {"w": np.zeros(3, np.float64)})
    assert len(rows) == 1
    with pytest.raises(ValueError):
        RoundRows(0)


def test_a_given_layout_refuses_even_the_first_update() -> None:
    rows = RoundRows(2, layout=Layout.of({"w": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="c0"):
        rows.add(("c0", b""), {"w": np.zeros(4, np.float32)})
    assert len(rows) == 0
    assert rows.matrix([])[1].shape == (0, 3)


def test_gather_rows_applies_every_permutation_in_place() -> None:
    base = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    for perm in itertools.permutations(range(5)):
        x = base.copy()
        _gather_rows(x, list(perm))
        assert np.array_equal(x, base[list(perm)])


def test_gather_rows_moves_every_live_row() -> None:
    base = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    rng = np.random.default_rng(1)
    for perm in itertools.permutations(range(5)):
        live = [bool(b) for b in rng.integers(0, 2, 5)]
        x = base.copy()
        _gather_rows(x, list(perm), live)
        for i, k in enumerate(perm):
            if live[k]:
                assert np.array_equal(x[i], base[k]), (perm, live)


@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (2, 0), (64, 1 << 16)])
def test_fresh_rows_are_a_writable_float32_matrix(shape: tuple[int, int]) -> None:
    x = fresh_rows(*shape)
    assert x.shape == shape and x.dtype == np.float32 and x.flags.c_contiguous
    x[...] = 1.5
    assert np.all(x == 1.5)
