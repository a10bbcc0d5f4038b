"""The accountant's SQLite ledger: a restarted accountant continues exactly where it stopped."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qflare.privacy import BudgetPolicy, Decision, epsilon
from qflare.services.accountant.core import AccountantCore
from qflare.services.accountant.store import LedgerStore

Q, Z, DELTA = 0.1, 1.0, 1e-5


async def _ask(
    core: AccountantCore, store: LedgerStore, job: str, round_no: int, q: float = Q, z: float = Z
) -> Decision:
    """What the service shell does: decide, persist if fresh, then apply."""
    decision = core.decide(job, round_no, q, z, 1.0)
    if decision.fresh:
        await store.record(decision)
        core.apply(decision)
    return decision


def _answer(d: Decision) -> tuple:
    return (
        d.job,
        d.round,
        d.granted,
        d.reason,
        d.epsilon_total,
        d.epsilon_requested,
        d.rounds_granted,
    )


async def test_restart_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "accountant.sqlite"
    budget = (epsilon(Q, Z, 5, DELTA) + epsilon(Q, Z, 6, DELTA)) / 2
    policies = {"a": BudgetPolicy(budget, DELTA), "b": BudgetPolicy(50.0, DELTA)}

    # reference: one accountant that never stops
    ref_store = await LedgerStore.open(tmp_path / "ref.sqlite")
    ref = AccountantCore(policies.get)
    reference = [await _ask(ref, ref_store, job, r) for r in range(8) for job in ("a", "b")]
    await ref_store.close()

    # the same requests, with a restart after round 2 and again after round 5
    answers: list[Decision] = []
    store = await LedgerStore.open(path)
    core = AccountantCore(policies.get)
    for r in range(8):
        if r in (3, 6):
            await store.close()
            store = await LedgerStore.open(path)
            jobs, stored = await store.load()
            # configuration changed in between: stored budgets still rule known jobs
            core = AccountantCore.restore({"a": BudgetPolicy(99.0, DELTA)}.get, jobs, stored)
            for d in stored:  # every stored round is answered from the ledger, unchanged
                again = core.decide(d.job, d.round, d.q, d.z, d.clip)
                assert not again.fresh and _answer(again) == _answer(d)
        for job in ("a", "b"):
            answers.append(await _ask(core, store, job, r))
    assert [(d.job, d.round, d.granted, d.reason, d.rounds_granted) for d in answers] == [
        (d.job, d.round, d.granted, d.reason, d.rounds_granted) for d in reference
    ]
    for mine, theirs in zip(answers, reference, strict=True):
        assert mine.epsilon_total == pytest.approx(theirs.epsilon_total, rel=1e-9)
    assert [d.granted for d in answers if d.job == "a"] == [True] * 5 + [False] * 3

    jobs, stored = await store.load()
    assert jobs == policies
    assert len(stored) == 16  # one row per (job, round): nothing charged twice
    await store.close()


async def test_a_round_cannot_be_stored_twice(tmp_path: Path) -> None:
    store = await LedgerStore.open(tmp_path / "a.sqlite")
    core = AccountantCore(BudgetPolicy(5.0, DELTA))
    decision = core.decide("j", 0, Q, Z, 1.0)
    await store.record(decision)
    with pytest.raises(sqlite3.IntegrityError):
        await store.record(decision)
    await store.close()


async def test_floats_come_back_bit_identical(tmp_path: Path) -> None:
    store = await LedgerStore.open(tmp_path / "f.sqlite")
    core = AccountantCore(BudgetPolicy(1 / 3, DELTA))
    first = await _ask(core, store, "j", 7, q=0.1 + 0.2, z=2 / 3)
    await store.close()
    store = await LedgerStore.open(tmp_path / "f.sqlite")
    jobs, [loaded] = await store.load()
    assert jobs["j"].epsilon == 1 / 3
    assert _answer(loaded) == _answer(first) and (loaded.q, loaded.z) == (0.1 + 0.2, 2 / 3)
    await store.close()
