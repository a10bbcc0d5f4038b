"""A row of a round's matrix written a range at a time (RoundRows.writer, the SpilledRows
file's positioned writes): an update received in parts lands bit for bit where the same
update sent whole lands, and counts as held only once every value is in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qflare.messages.tensors import Layout, RoundRows
from qflare.runtime.spill import SpilledRows, release

CLIENTS = ("c0", "c1", "c2", "c3")


def update(client: str) -> dict[str, np.ndarray]:
    w = np.random.default_rng(int(client[1:])).standard_normal(23).astype(np.float32)
    return {"w": w[:15].reshape(3, 5), "b": w[15:]}


LAYOUT = Layout(("b", "w"), ((8,), (3, 5)), ("float32", "float32"))


def flat(u: dict[str, np.ndarray]) -> np.ndarray:
    return LAYOUT.flatten(u)


def read(rows: RoundRows, refs: list[tuple[str, bytes]]) -> np.ndarray:
    if isinstance(rows, SpilledRows):
        _clients, src = rows.source(refs)
        return np.array(src.block(0, LAYOUT.size))
    return np.array(rows.matrix(refs)[1])


@pytest.fixture(params=["memory", "file"])
def make(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[RoundRows] = []

    def new(capacity: int = 4, clients: tuple[str, ...] = CLIENTS) -> RoundRows:
        rows = (
            RoundRows(capacity, clients)
            if request.param == "memory"
            else SpilledRows(tmp_path, capacity, clients)
        )
        made.append(rows)
        return rows

    yield new
    for rows in made:
        release(rows)


@pytest.mark.parametrize("part", [1, 4, 7, 23])
def test_parts_in_any_order_give_the_row_of_the_whole_update(make, part: int) -> None:  # type: ignore[no-untyped-def]
    whole, parted = make(), make()
    order = list(range(0, LAYOUT.size, part))
    for k, c in enumerate(CLIENTS):
        whole.add((c, b"d"), update(c))
        w = parted.writer((c, b"d"), LAYOUT)
        assert w is not None
        values = flat(update(c))
        for start in order[k:] + order[:k]:  # each client's parts in another order
            assert w.write(start, values[start : start + part])
            assert (c, b"d") not in parted
        assert w.commit() and (c, b"d") in parted
    refs = [(c, b"d") for c in CLIENTS]
    np.testing.assert_array_equal(read(parted, refs), read(whole, refs))
    assert read(parted, refs).tobytes() == np.stack([flat(update(c)) for c in CLIENTS]).tobytes()


def test_an_aborted_or_incomplete_row_holds_nothing_and_is_free_again(make) -> None:  # type: ignore[no-untyped-def]
    rows = make()
    values = flat(update("c0"))
    w = rows.writer(("c0", b"bad"), LAYOUT)
    assert w is not None and w.write(0, values[:10])
    w.abort()
    assert ("c0", b"bad") not in rows and len(rows) == 0
    short = rows.writer(("c0", b"short"), LAYOUT)
    assert short is not None and short.write(0, values[:22])  # one value missing
    assert not short.commit() and ("c0", b"short") not in rows
    assert not short.write(22, values[22:])  # a committed or aborted writer writes no more
    rows.add(("c0", b"d"), update("c0"))  # the home row is free again
    assert rows._rows[("c0", b"d")] == 0
    np.testing.assert_array_equal(read(rows, [("c0", b"d")])[0], values)


def test_two_writers_of_one_update_share_its_row(make) -> None:  # type: ignore[no-untyped-def]
    """The read-ahead and a fetch may read the same update in parts at once: the same
    digest, the same values; the first to finish makes it held, the other then stops."""
    rows = make()
    values = flat(update("c1"))
    a, b = rows.writer(("c1", b"d"), LAYOUT), rows.writer(("c1", b"d"), LAYOUT)
    assert a is not None and b is not None
    assert a.write(0, values[:12]) and b.write(0, values[:12])
    assert b.write(12, values[12:]) and b.commit()
    assert not a.write(12, values[12:])  # held already
    assert a.commit()  # it holds the update
    assert rows.writer(("c1", b"d"), LAYOUT) is None
    np.testing.assert_array_equal(read(rows, [("c1", b"d")])[0], values)


def test_a_writer_of_a_round_reset_writes_nothing(make) -> None:  # type: ignore[no-untyped-def]
    rows = make()
    w = rows.writer(("c0", b"d"), LAYOUT)
    assert w is not None
    generation = rows.reset(4, CLIENTS, LAYOUT) if type(rows) is RoundRows else None
    if generation is None:  # a file's rows are given back instead
        release(rows)
    assert not w.write(0, flat(update("c0"))) and not w.commit()
    if generation is not None:
        assert rows.writer(("c0", b"d"), LAYOUT, generation - 1) is None


def test_a_writer_of_another_layout_is_refused(make) -> None:  # type: ignore[no-untyped-def]
    rows = make()
    rows.add(("c0", b"d"), update("c0"))
    other = Layout(("b", "w"), ((8,), (5, 3)), ("float32", "float32"))
    with pytest.raises(ValueError, match="do not match"):
        rows.writer(("c1", b"d"), other)
    w = rows.writer(("c1", b"d"), LAYOUT)
    assert w is not None
    with pytest.raises(ValueError, match="outside a row"):
        w.write(20, np.zeros(4, np.float32))


def test_a_row_being_written_keeps_its_place_when_the_matrix_is_reordered() -> None:
    """matrix() moves rows in place; a row still being written moves with them and its
    next part lands in it."""
    rows = RoundRows(2)  # no home rows: rows in arrival order
    values = flat(update("c0"))
    w = rows.writer(("c0", b"d"), LAYOUT)
    assert w is not None and w.write(0, values[:10])
    for c in ("c3", "c2"):
        rows.add((c, b"d"), update(c))
    clients, x = rows.matrix([("c3", b"d"), ("c2", b"d")])
    assert clients == ["c2", "c3"]
    np.testing.assert_array_equal(x, np.stack([flat(update("c2")), flat(update("c3"))]))
    assert w.write(10, values[10:]) and w.commit()
    clients, x = rows.matrix([("c0", b"d"), ("c2", b"d")])
    np.testing.assert_array_equal(x, np.stack([values, flat(update("c2"))]))
