"""The aggregator's round machine with revoked clients (``core.step``'s ``revoked``): they are
not selected, an open round stops waiting for them and closes over none of their updates,
and the round's DP denominator q*N counts the clients it sampled from (``Round.population``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qflare.messages import Reason
from qflare.runtime import JobSpec
from qflare.services.aggregator.core import (
    Accepted,
    Aggregate,
    Close,
    Granted,
    Note,
    Reject,
    Round,
    RoundState,
    Tick,
    Verdict,
    aggregate,
    aggregate_round,
    begin,
    expected_participants,
    sampled_population,
    select_participants,
    step,
)
from qflare.services.aggregator.store import AggregatorStore

CLIENTS = ("a", "b", "c", "d")
T0 = 1000.0


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(
        job_id="j",
        rounds=3,
        participants=CLIENTS,
        rule="mean",
        noise_multiplier=1.0,
        clip=2.0,
        seed=7,
        deadline_s=30.0,
        min_updates=2,
    )
    base.update(kw)
    return JobSpec.model_validate(base)


def opened(s: JobSpec, revoked: frozenset[str] = frozenset(), round_no: int = 1) -> Round:
    r, _ = begin(s, round_no, round_no - 1, T0)
    r, _ = step(s, r, Granted(0.5), T0, revoked)
    assert r.state == RoundState.OPEN
    return r


def update(client: str, offset: int) -> Accepted:
    return Accepted(client, bytes([offset]) * 32, offset, num_samples=10, base_version=0)


def test_a_revoked_client_is_not_selected_and_no_one_elses_coin_changes() -> None:
    many = tuple(f"c{i:02d}" for i in range(40))
    for round_no in range(1, 30):
        everyone = select_participants(many, 0.3, 11, "j", round_no)
        gone = frozenset(many[::7])
        assert select_participants(many, 0.3, 11, "j", round_no, gone) == tuple(
            c for c in everyone if c not in gone
        )
    assert select_participants(CLIENTS, 1.0, 1, "j", 1, {"b"}) == ("a", "c", "d")
    assert select_participants(CLIENTS, 1.0, 1, "j", 1, set(CLIENTS)) == ()


def test_the_grant_samples_from_the_clients_not_revoked() -> None:
    s = spec()
    r, _ = begin(s, 1, 0, T0)
    new, effects = step(s, r, Granted(0.5), T0, frozenset({"b", "zz"}))  # zz: not enrolled
    assert new.participants == ("a", "c", "d") and new.population == 3
    note = next(e for e in effects if isinstance(e, Note) and e.event == "round.opened")
    assert note.fields["population"] == 3 and note.fields["participants"] == 3
    assert opened(s).population == 4 == sampled_population(s)
    assert sampled_population(s, {"b", "zz"}) == 3


def test_an_open_round_stops_waiting_for_a_client_revoked_mid_round() -> None:
    s = spec()
    r = opened(s)
    assert r.participants == CLIENTS
    for i, client in enumerate(("b", "c", "d")):
        r, _ = step(s, r, update(client, 10 + i), T0 + 1)
    # before its deadline the round waits for a
    same, effects = step(s, r, Tick(), T0 + 2)
    assert same == r and effects == ()
    # a is revoked: the next tick closes the round with the three others, long before 30 s
    closed, effects = step(s, r, Tick(), T0 + 2, frozenset({"a"}))
    assert closed.state == RoundState.CLOSED
    assert [c for c, _d, _o in closed.closed or ()] == ["b", "c", "d"]
    assert any(isinstance(e, Close) for e in effects)
    note = next(e for e in effects if isinstance(e, Note) and e.event == "round.closed")
    assert note.fields == {"updates": 3, "revoked": 1}


def test_a_revoked_clients_held_update_is_not_closed_over() -> None:
    s = spec()
    r = opened(s)
    for i, client in enumerate(("a", "b", "c")):
        r, _ = step(s, r, update(client, 10 + i), T0 + 1)
    closed, _ = step(s, r, Tick(), T0 + 1, frozenset({"a", "d"}))
    assert closed.state == RoundState.CLOSED
    assert [c for c, _d, _o in closed.closed or ()] == ["b", "c"]


def test_an_update_of_a_revoked_client_is_refused_revoked() -> None:
    s = spec()
    r = opened(s)
    same, effects = step(s, r, update("a", 10), T0 + 1, frozenset({"a"}))
    assert same == r
    assert effects == (Reject(Reason.REVOKED, "a is revoked"),)


def test_min_updates_counts_only_the_clients_left() -> None:
    # all four needed; one revoked: the three others close the round
    s = spec(min_updates=4)
    r = opened(s)
    for i, client in enumerate(("a", "b", "c")):
        r, _ = step(s, r, update(client, 10 + i), T0 + 1)
    assert step(s, r, Tick(), T0 + 1)[0].state == RoundState.OPEN
    assert step(s, r, Tick(), T0 + 1, frozenset({"d"}))[0].state == RoundState.CLOSED


def test_a_round_whose_selected_clients_are_all_revoked_closes_at_once() -> None:
    s = spec()
    r = opened(s)
    closed, _ = step(s, r, Tick(), T0 + 1, frozenset(CLIENTS))
    assert closed.state == RoundState.CLOSED and closed.closed == ()


def test_the_denominator_is_q_times_the_population_sampled_from() -> None:
    s = spec(sample_rate=0.5, participants=tuple(f"c{i}" for i in range(8)), min_updates=1)
    everyone = {c: {"w": np.full(3, 0.25, np.float32)} for c in s.participants}
    base = {"w": np.zeros(3, np.float32)}
    r = opened(s, frozenset({"c0", "c1"}))
    assert r.population == 6 and not {"c0", "c1"} & set(r.participants)
    picked = r.participants
    for i, client in enumerate(picked):
        r, _ = step(s, r, update(client, 10 + i), T0 + 1)
    r, _ = step(s, r, Tick(), T0 + 31)
    assert r.state == RoundState.CLOSED
    _published, effects = step(s, r, Verdict(picked), T0 + 32)
    command = next(e for e in effects if isinstance(e, Aggregate))
    assert command.population == 6
    updates = {c: everyone[c] for c in picked}
    got = aggregate(s, command, base, updates)
    want = aggregate_round(
        job="j",
        round_no=1,
        seed=s.seed,
        base=base,
        updates=updates,
        kept=picked,
        rule="mean",
        f=0,
        clip=s.clip,
        noise_multiplier=s.noise_multiplier,
        expected_clients=expected_participants(0.5, 6),
    )
    np.testing.assert_array_equal(got.model["w"], want.model["w"])
    # a round stored before rounds knew their population divides by q * (enrolled)
    old = aggregate(s, Aggregate(1, 0, picked, (), command.updates), base, updates)
    assert not np.array_equal(old.model["w"], got.model["w"])


async def test_the_store_keeps_the_population(tmp_path: Path) -> None:
    s = spec()
    store = await AggregatorStore.open(tmp_path)
    try:
        await store.add_job(s, {"w": np.zeros(2, np.float32)}, b"\0" * 32)
        assert await store.request_round("j", 1, base_version=0)
        r = await store.load_round("j", 1)
        assert r is not None and r.population is None
        new, _ = step(s, r, Granted(0.5), T0, frozenset({"c"}))
        assert await store.save_round(r, new)
        loaded = await store.load_round("j", 1)
        assert loaded == new and loaded.population == 3
    finally:
        await store.close()
