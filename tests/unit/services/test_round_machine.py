"""The aggregator's round as a pure state machine (``services/aggregator/core.py``: ``step``):
every transition, every refusal, the re-announcements, and a property: a redelivered input
changes nothing."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.messages import Reason
from qflare.privacy.policy import charge_of
from qflare.runtime import JobSpec
from qflare.services.aggregator.core import (
    Accepted,
    Aggregate,
    Alert,
    Announce,
    Close,
    Denied,
    Effect,
    EndJob,
    Granted,
    Held,
    Input,
    NextRound,
    Note,
    OpenUnaccounted,
    Publish,
    Refused,
    Reject,
    RequestPrivacy,
    Restart,
    Round,
    RoundState,
    Tick,
    Verdict,
    aggregate,
    aggregate_round,
    begin,
    expected_participants,
    malformed_of,
    select_participants,
    step,
    unknown_round,
)
from qflare.services.aggregator.store import AggregatorStore

CLIENTS = ("a", "b", "c", "d")
D1, D2 = b"\x01" * 32, b"\x02" * 32
T0 = 1000.0


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(
        job_id="j",
        rounds=2,
        participants=CLIENTS,
        rule="mean",
        f=1,
        noise_multiplier=1.0,
        clip=2.0,
        seed=7,
        deadline_s=10.0,
        min_updates=2,
        max_extensions=1,
    )
    base.update(kw)
    return JobSpec.model_validate(base)


SPEC = spec()


def requested(s: JobSpec = SPEC, round_no: int = 1) -> Round:
    r, _effects = begin(s, round_no, round_no - 1, T0)
    return r


def opened(s: JobSpec = SPEC, round_no: int = 1) -> Round:
    r, _effects = step(s, requested(s, round_no), Granted(0.5, updates_from=40), T0)
    assert r.state == RoundState.OPEN
    return r


def accepted(client: str, digest: bytes = D1, base_version: int = 0, offset: int = 50) -> Accepted:
    return Accepted(client, digest, offset, num_samples=10, base_version=base_version)


def feed(s: JobSpec, r: Round, *events: Input, now: float = T0) -> tuple[Round, list[Effect]]:
    out: list[Effect] = []
    for e in events:
        r, effects = step(s, r, e, now)
        out.extend(effects)
    return r, out


def kinds(effects: list[Effect] | tuple[Effect, ...]) -> list[str]:
    return [type(e).__name__ for e in effects]


def rejected(effects: tuple[Effect, ...]) -> Reason:
    (effect,) = effects
    assert isinstance(effect, Reject)
    return effect.reason


def closed(s: JobSpec = SPEC, clients: tuple[str, ...] = CLIENTS) -> Round:
    r, _ = feed(s, opened(s), *(accepted(c, offset=50 + i) for i, c in enumerate(clients)))
    if r.state == RoundState.OPEN:
        r, _ = step(s, r, Tick(), T0 + s.deadline_s)
    assert r.state == RoundState.CLOSED
    return r


# -- REQUESTED ---------------------------------------------------------------------------------


def test_a_round_begins_requested_and_asks_the_accountant() -> None:
    r, effects = begin(SPEC, 3, 2, T0)
    assert (r.job, r.round, r.state, r.base_version, r.updated) == (
        "j",
        3,
        RoundState.REQUESTED,
        2,
        T0,
    )
    charge = charge_of(SPEC)
    assert effects == (RequestPrivacy(charge.q, charge.z, SPEC.clip, charge.coverage),)


def test_dp_off_a_round_is_granted_by_the_aggregator_itself() -> None:
    _r, effects = begin(spec(noise_multiplier=0.0), 1, 0, T0)
    assert effects == (OpenUnaccounted(),)


def test_a_grant_opens_the_round_with_the_sampled_participants() -> None:
    s = spec(sample_rate=0.5, participants=tuple(f"c{i}" for i in range(20)), min_updates=3)
    r, effects = step(s, requested(s), Granted(1.25, updates_from=40), T0)
    chosen = select_participants(s.participants, 0.5, s.seed, "j", 1)
    assert r.state == RoundState.OPEN and r.participants == chosen
    assert (r.deadline, r.epsilon, r.updates_from, r.updated) == (T0 + 10.0, 1.25, 40, T0)
    note, announce = effects
    assert note == Note(
        "round.opened", {"participants": len(chosen), "population": 20, "epsilon": 1.25}
    )
    assert announce == Announce(
        broadcast=True,
        base_version=0,
        participants=chosen,
        deadline=T0 + 10.0,
        min_updates=min(3, len(chosen)),
        updates_from=40,
        clip=s.clip,
    )


def test_a_denial_ends_the_job_with_an_alert() -> None:
    r, effects = step(SPEC, requested(), Denied("budget", 3.5, 4.0), T0 + 1)
    assert r.state == RoundState.DENIED and r.updated == T0 + 1
    alert, end = effects
    assert isinstance(alert, Alert) and (alert.kind, alert.severity, alert.reason) == (
        "budget.exhausted",
        "warning",
        "budget",
    )
    assert alert.detail == "epsilon spent 3.5 of 4; round 1 not released"
    assert end == EndJob("budget_exhausted", "accountant denied round 1: budget")


def test_an_update_before_the_grant_is_stale() -> None:
    r = requested()
    after, effects = step(SPEC, r, accepted("a"), T0)
    assert after == r and rejected(effects) == Reason.STALE_ROUND


@pytest.mark.parametrize("event", [Granted(0.9), Denied("budget")], ids=["granted", "denied"])
def test_a_grant_or_denial_after_the_round_moved_changes_nothing(event: Input) -> None:
    r = opened()
    assert step(SPEC, r, event, T0 + 1) == (r, ())


def test_a_round_never_requested() -> None:
    assert rejected(unknown_round(SPEC, 9, accepted("a"))) == Reason.STALE_ROUND
    assert rejected(unknown_round(SPEC, 9, Verdict(("a",)))) == Reason.STALE_ROUND
    for event in (Granted(1.0), Denied("x"), Refused("a", "NON_FINITE"), Tick(), Restart()):
        assert unknown_round(SPEC, 9, event) == ()


# -- OPEN: updates -------------------------------------------------------------------------------


def test_an_accepted_update_is_held_first_wins() -> None:
    r, effects = step(SPEC, opened(), accepted("b", offset=51), T0 + 1)
    assert r.held == (Held("b", D1, 51, 10),)
    assert effects == (Note("update.held", {"client": "b", "offset": 51}),)
    assert r.updated == T0  # holding an update does not move the state
    # the same digest again is the same update: no change, no effect
    assert step(SPEC, r, accepted("b", offset=51), T0 + 2) == (r, ())
    # another digest of the same client is a second submission
    again, effects = step(SPEC, r, accepted("b", D2, offset=60), T0 + 2)
    assert again == r and rejected(effects) == Reason.DUPLICATE


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (accepted("z"), Reason.NOT_PARTICIPANT),
        (accepted("a", base_version=1), Reason.STALE_BASE),
    ],
    ids=["not-participant", "stale-base"],
)
def test_an_update_the_open_round_cannot_take(event: Accepted, reason: Reason) -> None:
    r = opened()
    after, effects = step(SPEC, r, event, T0)
    assert after == r and rejected(effects) == reason


def test_held_updates_stay_sorted_by_client() -> None:
    r, _ = feed(SPEC, opened(), accepted("c"), accepted("a"))
    assert [h.client for h in r.held] == ["a", "c"]


def test_the_round_closes_when_every_participant_is_in() -> None:
    r, _ = feed(SPEC, opened(), *(accepted(c, offset=60 - i) for i, c in enumerate("dcb")))
    assert r.state == RoundState.OPEN
    r, effects = step(SPEC, r, accepted("a", offset=70), T0 + 3)
    assert r.state == RoundState.CLOSED and r.updated == T0 + 3
    expected = (("a", D1, 70), ("b", D1, 58), ("c", D1, 59), ("d", D1, 60))
    assert r.closed == expected
    assert effects == (
        Note("update.held", {"client": "a", "offset": 70}),
        Note("round.closed", {"updates": 4}),
        Close(expected),
    )


@pytest.mark.parametrize(
    ("state", "held", "digest", "reason"),
    [
        (RoundState.CLOSED, True, D2, Reason.DUPLICATE),
        (RoundState.CLOSED, False, D1, Reason.ROUND_CLOSED),
        (RoundState.PUBLISHED, True, D2, Reason.DUPLICATE),
        (RoundState.PUBLISHED, False, D1, Reason.ROUND_CLOSED),
        (RoundState.ABORTED, False, D1, Reason.ROUND_CLOSED),
        (RoundState.DENIED, False, D1, Reason.ROUND_CLOSED),
    ],
)
def test_an_update_after_the_round_closed(
    state: RoundState, held: bool, digest: bytes, reason: Reason
) -> None:
    r = replace(opened(), state=state, held=(Held("a", D1, 50, 10),) if held else ())
    after, effects = step(SPEC, r, accepted("a", digest), T0)
    assert after == r and rejected(effects) == reason


def test_the_held_update_again_after_the_round_closed_is_a_redelivery() -> None:
    r = closed()
    assert step(SPEC, r, accepted("a", offset=50), T0 + 99) == (r, ())


# -- OPEN: refusals ------------------------------------------------------------------------------


def test_refused_clients_count_as_answered_once_the_minimum_is_in() -> None:
    r, _ = feed(SPEC, opened(), accepted("a"), accepted("b"), Refused("c", "NON_FINITE"))
    assert r.state == RoundState.OPEN and r.refused == (("c", "NON_FINITE"),)
    r, effects = step(SPEC, r, Refused("d", "BAD_SIGNATURE"), T0 + 1)
    assert r.state == RoundState.CLOSED
    assert [c for c, _d, _o in r.closed or ()] == ["a", "b"]  # the refused are not in the set
    assert kinds(effects) == ["Note", "Note", "Close"]
    assert effects[0] == Note("update.refused", {"client": "d", "reason": "BAD_SIGNATURE"})


def test_the_close_counts_clients_refused_for_a_malformed_update() -> None:
    # non-finite and wrong shapes are the client's own update; a bad signature names no one
    # for sure, and a client whose later update was accepted is in the set
    r, _ = feed(
        SPEC,
        opened(),
        Refused("a", "NON_FINITE"),
        accepted("a"),
        accepted("b"),
        Refused("c", "SHAPE_MISMATCH"),
    )
    r, effects = step(SPEC, r, Refused("d", "BAD_SIGNATURE"), T0 + 1)
    assert r.state == RoundState.CLOSED and malformed_of(r) == 1
    assert effects[-2] == Note("round.closed", {"updates": 2, "malformed": 1})
    assert effects[-1] == Close(r.closed or (), 1)


def test_refusals_below_the_minimum_wait_for_the_deadline() -> None:
    r, effects = feed(
        SPEC, opened(), accepted("a"), *(Refused(c, "NON_FINITE") for c in ("b", "c", "d"))
    )
    assert r.state == RoundState.OPEN and kinds(effects) == ["Note"] * 4


def test_an_update_on_another_model_is_not_an_answer() -> None:
    # the client's message was trained before it had the round's model (sent before the
    # round opened, held by ingest until it did): the round waits for its real update
    r, _ = feed(SPEC, opened(), accepted("a"), accepted("b"), accepted("c"))
    r, effects = step(SPEC, r, Refused("d", "STALE_BASE"), T0 + 1)
    assert r.state == RoundState.OPEN and r.refused == ()
    assert effects == (
        Note("update.refused", {"client": "d", "reason": "STALE_BASE", "answer": False}),
    )
    r, _ = step(SPEC, r, accepted("d", offset=53), T0 + 2)
    assert r.state == RoundState.CLOSED
    assert [c for c, _d, _o in r.closed or ()] == ["a", "b", "c", "d"]


def test_a_stale_base_does_not_hide_the_clients_later_refusal() -> None:
    r, _ = feed(SPEC, opened(), accepted("a"), accepted("b"), Refused("c", "STALE_BASE"))
    r, _ = feed(SPEC, r, Refused("c", "NON_FINITE"), Refused("d", "NON_FINITE"))
    assert r.state == RoundState.CLOSED and malformed_of(r) == 2


def test_a_refusal_does_not_ban_a_later_valid_update() -> None:
    r, _ = feed(SPEC, opened(), Refused("a", "NON_FINITE"), accepted("a"))
    assert r.holding("a") == Held("a", D1, 50, 10)


@pytest.mark.parametrize(
    "r",
    [requested(), closed(), replace(opened(), state=RoundState.ABORTED)],
    ids=["requested", "closed", "aborted"],
)
def test_a_refusal_outside_an_open_round_is_ignored(r: Round) -> None:
    assert step(SPEC, r, Refused("a", "NON_FINITE"), T0) == (r, ())


def test_a_refusal_of_no_participant_is_ignored() -> None:
    r = opened()
    # ingest names a sender whose signature failed "<id> (unverified)": no participant id
    assert step(SPEC, r, Refused("a (unverified)", "BAD_SIGNATURE"), T0) == (r, ())


def test_the_first_refusal_is_kept() -> None:
    r, _ = feed(SPEC, opened(), Refused("a", "NON_FINITE"))
    assert step(SPEC, r, Refused("a", "TOO_LARGE"), T0) == (r, ())


# -- OPEN: the clock -------------------------------------------------------------------------------


def test_before_the_deadline_a_tick_waits() -> None:
    r, _ = feed(SPEC, opened(), accepted("a"), accepted("b"))
    assert step(SPEC, r, Tick(), T0 + 9.9) == (r, ())


def test_at_the_deadline_the_round_closes_with_its_minimum() -> None:
    r, _ = feed(SPEC, opened(), accepted("b"), accepted("a"))
    r, effects = step(SPEC, r, Tick(), T0 + 10)
    assert r.state == RoundState.CLOSED and r.closed == (("a", D1, 50), ("b", D1, 50))
    assert kinds(effects) == ["Note", "Close"]


def test_at_the_deadline_too_few_extend_then_abort() -> None:
    r, _ = feed(SPEC, opened(), accepted("a"))
    r, effects = step(SPEC, r, Tick(), T0 + 10)
    assert r.state == RoundState.OPEN and (r.deadline, r.extensions) == (T0 + 20, 1)
    alert, announce = effects
    assert isinstance(alert, Alert) and (alert.kind, alert.severity, alert.reason) == (
        "round.extended",
        "info",
        "too_few_updates",
    )
    assert alert.detail == "1 of 4 updates at the deadline; extension 1 of 1"
    # announced again into the broadcast stream: a participant that connected late joins
    assert isinstance(announce, Announce) and announce.broadcast and announce.deadline == T0 + 20
    assert step(SPEC, r, Tick(), T0 + 19) == (r, ())
    r, effects = step(SPEC, r, Tick(), T0 + 20)
    assert r.state == RoundState.ABORTED
    alert, end = effects
    assert isinstance(alert, Alert) and (alert.kind, alert.severity) == (
        "round.aborted",
        "critical",
    )
    assert alert.detail == "1 updates, 2 needed"
    assert end == EndJob("too_few_updates", "round 1 had 1 updates")


def test_on_short_abort_aborts_at_the_first_deadline() -> None:
    s = spec(on_short="abort")
    r, _ = feed(s, opened(s), accepted("a"))
    r, effects = step(s, r, Tick(), T0 + 10)
    assert r.state == RoundState.ABORTED and kinds(effects) == ["Alert", "EndJob"]


def test_an_update_after_the_deadline_settles_the_round_at_once() -> None:
    r, _ = feed(SPEC, opened(), accepted("a"))
    r, effects = step(SPEC, r, accepted("b"), T0 + 11)
    assert r.state == RoundState.CLOSED and kinds(effects) == ["Note", "Note", "Close"]


def test_an_empty_sample_closes_at_the_first_tick() -> None:
    s = spec(sample_rate=0.01, participants=tuple(f"c{i}" for i in range(4)), min_updates=1)
    r, _ = step(s, requested(s), Granted(0.1), T0)
    assert r.participants == ()
    r, effects = step(s, r, Tick(), T0)
    assert r.state == RoundState.CLOSED and r.closed == () and effects[-1] == Close(())


# -- CLOSED: the verdict ---------------------------------------------------------------------------


def test_a_verdict_publishes_the_round_and_requests_the_next() -> None:
    r = closed()
    verdict = Verdict(("a", "c", "d"), (("b", 4.0),))
    new, effects = step(SPEC, r, verdict, T0 + 30)
    assert new.state == RoundState.PUBLISHED and new.updated == T0 + 30
    assert (new.kept, new.removed) == (("a", "c", "d"), ("b",))
    refs = tuple(ref for ref in r.closed or () if ref[0] != "b")
    assert effects == (
        Aggregate(1, 0, ("a", "c", "d"), ("b",), refs, SPEC.clip, population=4),
        Note(
            "model.published",
            {"version": 1, "kept": 3, "flagged": 1, "epsilon": 0.5, "clip": SPEC.clip},
        ),
        Publish(1),
        NextRound(2, base_version=1),
    )


def test_the_last_round_ends_the_job() -> None:
    s = spec(rounds=1)
    _new, effects = step(s, closed(s), Verdict(CLIENTS), T0)
    assert effects[-1] == EndJob("completed", "1 rounds done")


def test_a_bound_removes_only_the_k_highest_scored() -> None:
    s = spec(dp_filter_bound=1)
    verdict = Verdict(("a", "d"), (("b", 2.0), ("c", 7.5)))
    new, effects = step(s, closed(s), verdict, T0)
    assert (new.kept, new.removed) == (("a", "b", "d"), ("c",))
    assert effects[0] == Note("verdict.capped", {"flagged": 2, "removed": 1, "bound": 1})
    aggregate_effect = effects[1]
    assert isinstance(aggregate_effect, Aggregate)
    assert aggregate_effect.kept == ("a", "b", "d") and aggregate_effect.removed == ("c",)


@pytest.mark.parametrize(
    "verdict",
    [
        Verdict(("a", "b", "c")),  # one missing
        Verdict(("a", "b", "c"), (("z", 1.0),)),  # a stranger
        Verdict(("a", "b", "c", "d"), (("d", 1.0),)),  # one twice
    ],
    ids=["missing", "stranger", "twice"],
)
def test_a_verdict_must_cover_exactly_the_closed_set(verdict: Verdict) -> None:
    r = closed()
    after, effects = step(SPEC, r, verdict, T0)
    assert after == r and rejected(effects) == Reason.BAD_SCHEMA


@pytest.mark.parametrize(
    "r",
    [requested(), opened(), replace(opened(), state=RoundState.ABORTED)],
    ids=["requested", "open", "aborted"],
)
def test_a_verdict_for_a_round_not_waiting_for_one_is_stale(r: Round) -> None:
    after, effects = step(SPEC, r, Verdict(CLIENTS), T0)
    assert after == r and rejected(effects) == Reason.STALE_ROUND


def test_a_verdict_again_after_publishing_changes_nothing() -> None:
    r, _ = step(SPEC, closed(), Verdict(CLIENTS), T0)
    assert step(SPEC, r, Verdict(CLIENTS), T0 + 1) == (r, ())
    assert step(SPEC, r, Verdict(("a",)), T0 + 1) == (r, ())


def test_the_aggregate_effect_uses_the_jobs_settings() -> None:
    s = spec(sample_rate=0.5, noise_multiplier=0.7, rule="median", server_lr=0.5)
    base = {"w": np.zeros(3, np.float32)}
    updates = {c: {"w": np.full(3, i, np.float32)} for i, c in enumerate(CLIENTS)}
    command = Aggregate(2, 1, ("a", "c", "d"), ("b",), ())
    got = aggregate(s, command, base, updates)
    want = aggregate_round(
        job="j",
        round_no=2,
        seed=s.seed,
        base=base,
        updates=updates,
        kept=["a", "c", "d"],
        rule="median",
        f=1,
        clip=2.0,
        noise_multiplier=0.7,
        expected_clients=expected_participants(0.5, 4),
        server_lr=0.5,
    )
    assert np.array_equal(got.model["w"], want.model["w"]) and got.kept == ("a", "c", "d")
    other = aggregate(s, replace(command, clip=0.5), base, updates)
    assert not np.array_equal(other.model["w"], got.model["w"])


# -- reminders: ticks with remind_after, restarts ---------------------------------------------


def test_an_open_round_is_announced_again_on_events_only() -> None:
    r = opened()
    after, effects = step(SPEC, r, Tick(remind_after=3.0), T0 + 1)
    assert after == r
    (announce,) = effects
    assert isinstance(announce, Announce) and not announce.broadcast


def test_a_restarted_shell_announces_an_open_round_to_the_clients() -> None:
    r = opened()
    after, effects = step(SPEC, r, Restart(), T0 + 1)
    (announce,) = effects
    assert after == r and isinstance(announce, Announce) and announce.broadcast


def _published(s: JobSpec = SPEC) -> Round:
    r, _ = step(s, closed(s), Verdict(CLIENTS), T0)
    return r


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (requested(), [RequestPrivacy(*(lambda c: (c.q, c.z, 2.0, c.coverage))(charge_of(SPEC)))]),
        (closed(), [Close(closed().closed or ())]),
        (_published(), [NextRound(2, 1)]),
        (_published(spec(rounds=1)), [EndJob("completed", "1 rounds done")]),
        (
            replace(requested(), state=RoundState.DENIED),
            [EndJob("budget_exhausted", "round 1 denied")],
        ),
        (
            replace(opened(), state=RoundState.ABORTED),
            [EndJob("too_few_updates", "round 1 aborted")],
        ),
    ],
    ids=["requested", "closed", "published", "published-last", "denied", "aborted"],
)
def test_a_stale_round_resends_what_it_waits_for(r: Round, expected: list[Effect]) -> None:
    s = spec(rounds=1) if expected == [EndJob("completed", "1 rounds done")] else SPEC
    r = replace(r, updated=T0)
    assert step(s, r, Tick(remind_after=3.0), T0 + 2.9) == (r, ())  # not stale yet
    assert step(s, r, Tick(), T0 + 99) == (r, ())  # not a reminder pass
    after, effects = step(s, r, Tick(remind_after=3.0), T0 + 3.0)
    assert after == r and list(effects) == expected


def test_a_restart_resends_what_each_state_waits_for() -> None:
    assert kinds(step(SPEC, requested(), Restart(), T0)[1]) == ["RequestPrivacy"]
    assert kinds(step(spec(noise_multiplier=0.0), requested(), Restart(), T0)[1]) == [
        "OpenUnaccounted"
    ]
    assert kinds(step(SPEC, closed(), Restart(), T0)[1]) == ["Close"]
    # a published round is announced again (it may not have gone out), then what follows
    assert step(SPEC, _published(), Restart(), T0)[1] == (Publish(1), NextRound(2, 1))


# -- a redelivered input changes nothing -------------------------------------------------------------

_accepted = st.builds(
    Accepted,
    st.sampled_from([*CLIENTS, *CLIENTS, "z"]),
    st.sampled_from([D1, D1, D2]),
    st.integers(0, 9),
    st.just(10),
    st.sampled_from([0, 0, 0, 1]),
)
_kinds: list[st.SearchStrategy[Input | str]] = [
    st.builds(Tick, st.sampled_from([None, 3.0])),
    *[_accepted] * 5,  # mostly updates: rounds that get as far as a verdict
    st.builds(Refused, st.sampled_from([*CLIENTS, "z"]), st.sampled_from(["NON_FINITE", "X"])),
    st.just("verdict"),  # a verdict over the round's closed set (or a bad one when not closed)
    st.just("verdict"),
    st.builds(Granted, st.sampled_from([0.5, 0.9]), st.integers(0, 3)),
    st.builds(Denied, st.just("budget"), st.just(1.0), st.just(1.0)),
]
_events = st.integers(0, len(_kinds) - 1).flatmap(lambda i: _kinds[i])


def _verdict(r: Round, flag: int) -> Verdict:
    clients = sorted(c for c, _d, _o in r.closed or ())
    return Verdict(
        tuple(clients[flag:]), tuple((c, float(i)) for i, c in enumerate(clients[:flag]))
    )


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(_events, st.floats(0.0, 3.0), st.integers(0, 2)), max_size=30),
    bound=st.sampled_from([None, 0, 1]),
    on_short=st.sampled_from(["extend", "abort"]),
    granted=st.booleans(),
)
def test_a_redelivered_input_changes_nothing(
    events: list[tuple[Input | str, float, int]], bound: int | None, on_short: str, granted: bool
) -> None:
    s = spec(dp_filter_bound=bound, on_short=on_short)
    r = opened(s) if granted else requested(s)
    now = T0
    took_effect: list[Input] = []
    for raw, dt, flag in events:
        now += dt
        event = _verdict(r, flag) if raw == "verdict" else raw
        assert not isinstance(event, str)
        new, effects = step(s, r, event, now)
        if isinstance(event, Tick):
            r = new
            continue
        # delivered twice in a row: the second changes nothing, and at most refuses again
        again, repeat = step(s, new, event, now)
        assert again == new
        assert all(isinstance(e, Reject) for e in repeat), repeat
        if any(isinstance(e, Reject) for e in effects):
            assert new == r and len(effects) == 1
            assert repeat == effects
        elif new != r:
            took_effect.append(event)
        r = new
        # redelivered later, any input that took effect changes nothing and sends nothing
        for old in took_effect:
            assert step(s, r, old, now) == (r, ())


def test_the_whole_round_through_the_machine() -> None:
    """One round from request to the next request: the effects a shell performs, in order."""
    s = spec(noise_multiplier=0.0)
    r, effects = begin(s, 1, 0, T0)
    trail = kinds(effects)
    r, effects = step(s, r, Granted(math.inf), T0)
    trail += kinds(effects)
    for c in CLIENTS:
        r, effects = step(s, r, accepted(c), T0 + 1)
        trail += kinds(effects)
    r, effects = step(s, r, Verdict(CLIENTS), T0 + 2)
    trail += kinds(effects)
    assert trail == [
        "OpenUnaccounted",
        "Note",
        "Announce",
        *["Note"] * 4,
        "Note",
        "Close",
        "Aggregate",
        "Note",
        "Publish",
        "NextRound",
    ]
    assert r.state == RoundState.PUBLISHED and r.epsilon == math.inf


# -- the store keeps the machine's rounds --------------------------------------------------------


async def test_the_store_saves_each_step_with_a_compare_and_set(tmp_path: Path) -> None:
    store = await AggregatorStore.open(tmp_path)
    try:
        model = {"w": np.zeros(2, np.float32)}
        await store.add_job(SPEC, model, b"\0" * 32)
        assert await store.request_round("j", 1, base_version=0)
        r = await store.load_round("j", 1)
        assert r is not None and r.state == RoundState.REQUESTED and r.base_version == 0
        assert await store.load_round("j", 2) is None
        steps: list[Input] = [
            Granted(0.5, updates_from=7),
            accepted("b", offset=9),
            Refused("c", "NON_FINITE"),
            accepted("a", offset=8),
            Refused("d", "NON_FINITE"),  # everyone answered: closed
        ]
        for event in steps:
            new, _effects = step(SPEC, r, event, T0)
            assert await store.save_round(r, new)
            assert await store.load_round("j", 1) == new
            if event == steps[1]:
                # from a stale copy: another digest for a held client writes nothing
                stale, _ = step(SPEC, r, accepted("b", D2, offset=11), T0)
                assert not await store.save_round(r, stale)
                assert await store.load_round("j", 1) == new
            r = new
        assert r.state == RoundState.CLOSED and r.closed == (("a", D1, 8), ("b", D1, 9))
        assert await store.held("j", 1, "b") == (D1, 9)
        # a stale copy of the open round cannot take an update any more
        late, _ = step(SPEC, replace(r, state=RoundState.OPEN, closed=None), accepted("c"), T0)
        assert not await store.save_round(replace(r, state=RoundState.OPEN), late)
        published, _effects = step(SPEC, r, Verdict(("a",), (("b", 3.0),)), T0)
        with pytest.raises(ValueError, match="publish_model"):
            await store.save_round(r, published)
        verdict = {"kept": ["a"], "flagged": ["b"], "step_norm": 0.0}
        assert await store.publish_model("j", 1, 1, model, b"\1" * 32, 0.5, verdict)
        loaded = await store.load_round("j", 1)
        assert loaded is not None and (loaded.state, loaded.kept, loaded.removed) == (
            RoundState.PUBLISHED,
            ("a",),
            ("b",),
        )
    finally:
        await store.close()
