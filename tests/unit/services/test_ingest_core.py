"""Ingest's pure checks: every rule raises its reason code, plain data only."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from qflare.messages import TensorSpec, Update
from qflare.messages.envelope import Envelope
from qflare.messages.errors import MessageRejected, Reason
from qflare.messages.tensors import Layout
from qflare.services.ingest.core import (
    UNVERIFIED,
    OpenRound,
    PartRoutes,
    RejectionBudget,
    RoundBook,
    Route,
    SeenUpdates,
    Shed,
    accepted_update,
    check_layout,
    check_norm_bound,
    check_round,
    check_tensors,
    check_update_round,
    max_envelope_bytes,
    needs_round_news,
    round_layout,
)


def tensor_specs(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=n, dtype=d, shape=list(s)) for n, d, s in entries)


SPEC = tensor_specs([("w", "float32", (3, 2)), ("b", "float32", (2,))])


def _round(**kw) -> OpenRound:
    base = dict(
        job="j1",
        round=4,
        base_version=3,
        tensors=SPEC,
        participants=frozenset({"c1", "c2"}),
        deadline=100.0,
        max_norm=10.0,
    )
    base.update(kw)
    return OpenRound(**base)


def _book(*rounds: OpenRound) -> RoundBook:
    book = RoundBook()
    for r in rounds or (_round(),):
        book.opened(r)
    return book


def _good() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), 0.5, np.float32), "b": np.ones(2, np.float32)}


def _code(fn, *a, **kw) -> Reason:
    with pytest.raises(MessageRejected) as e:
        fn(*a, **kw)
    return e.value.reason


def test_good_update_passes_and_returns_norm() -> None:
    info = check_round(_book(), job="j1", round_=4, base_version=3, client="c1", now=50)
    assert info.round == 4
    assert check_tensors(info, _good()) == pytest.approx(np.sqrt(6 * 0.25 + 2))


def _update_env(*, sender: str = "c1", round_: int = 4, base_version: int = 3) -> Envelope:
    body = Update(base_version=base_version, num_samples=7, tensors=_good())
    return Envelope(
        kind="update",
        sender=sender,
        cert=None,
        job="j1",
        round=round_,
        ts=0,
        nonce=b"n",
        body_digest=b"d" * 32,
        body=body,
        sealed=False,
        size=0,
    )


def test_update_envelope_is_checked_by_its_header_and_base_version() -> None:
    assert check_update_round(_book(), _update_env(), 50).round == 4
    assert (
        _code(check_update_round, _book(), _update_env(sender="c9"), 50) == Reason.NOT_PARTICIPANT
    )
    assert _code(check_update_round, _book(), _update_env(round_=3), 50) == Reason.STALE_ROUND
    assert _code(check_update_round, _book(), _update_env(base_version=2), 50) == Reason.STALE_BASE
    assert _code(check_update_round, _book(), _update_env(), 101) == Reason.ROUND_CLOSED


def test_accepted_update_names_the_bytes_not_the_tensors() -> None:
    got = accepted_update(_update_env(), 12)
    assert (got.client, got.update_digest, got.offset) == ("c1", b"d" * 32, 12)
    assert (got.base_version, got.num_samples) == (3, 7)


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"job": "jx"}, Reason.WRONG_JOB),
        ({"round_": 3}, Reason.STALE_ROUND),
        ({"round_": 5}, Reason.STALE_ROUND),
        ({"base_version": 2}, Reason.STALE_BASE),
        ({"client": "c9"}, Reason.NOT_PARTICIPANT),
        ({"now": 100.5}, Reason.ROUND_CLOSED),
    ],
    ids=["wrong-job", "older-round", "future-round", "stale-base", "not-selected", "past-deadline"],
)
def test_round_checks(kw: dict, reason: Reason) -> None:
    args = dict(job="j1", round_=4, base_version=3, client="c1", now=50.0)
    args.update(kw)
    assert _code(check_round, _book(), **args) is reason


def test_closed_round_and_job_without_open_round() -> None:
    book = _book()
    book.closed("j1", 4)
    assert (
        _code(check_round, book, job="j1", round_=4, base_version=3, client="c1", now=1)
        is Reason.ROUND_CLOSED
    )
    assert (
        _code(check_round, book, job="j1", round_=2, base_version=3, client="c1", now=1)
        is Reason.STALE_ROUND
    )
    assert (
        _code(check_round, book, job="j1", round_=5, base_version=3, client="c1", now=1)
        is Reason.STALE_ROUND
    )


def test_needs_round_news_only_for_unknown_jobs_and_future_rounds() -> None:
    book = _book()
    assert needs_round_news(book, "jx", 0)
    assert needs_round_news(book, "j1", 5)
    assert not needs_round_news(book, "j1", 4) and not needs_round_news(book, "j1", 1)


def test_round_book_ignores_stale_and_redelivered_events() -> None:
    book = _book(_round(round=4))
    assert not book.opened(_round(round=3))  # older announcement
    book.closed("j1", 4)
    assert not book.opened(_round(round=4))  # redelivered opened after close
    assert book.get("j1") is None
    assert book.opened(_round(round=5)) and book.get("j1").round == 5
    book.closed("j1", 3)  # late close of an old round leaves 5 open
    assert book.get("j1").round == 5
    book.ended("j1")
    assert book.get("j1") is None and book.jobs() == []


def test_open_for_everyone_and_no_deadline() -> None:
    book = _book(_round(participants=None, deadline=None))
    assert (
        check_round(book, job="j1", round_=4, base_version=3, client="anyone", now=1e12).job == "j1"
    )


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t: t.pop("b"), Reason.SHAPE_MISMATCH),
        (lambda t: t.update(extra=np.zeros(1, np.float32)), Reason.SHAPE_MISMATCH),
        (lambda t: t.update(w=np.zeros((2, 3), np.float32)), Reason.SHAPE_MISMATCH),
        (lambda t: t.update(w=np.zeros(6, np.float32)), Reason.SHAPE_MISMATCH),
        (lambda t: t.update(b=np.ones(2, np.float64)), Reason.DTYPE_NOT_ALLOWED),
        (lambda t: t["w"].__setitem__((0, 0), np.nan), Reason.NON_FINITE),
        (lambda t: t["b"].__setitem__(1, -np.inf), Reason.NON_FINITE),
        (lambda t: t.update(b=np.full(2, 100, np.float32)), Reason.TOO_LARGE),
        (lambda t: t.update(b="not an array"), Reason.MALFORMED),
    ],
    ids=["missing", "extra", "transposed", "flattened", "dtype", "nan", "inf", "norm", "not-array"],
)
def test_tensor_checks(mutate, reason: Reason) -> None:
    tensors = _good()
    mutate(tensors)
    assert _code(check_tensors, _round(), tensors) is reason


def test_float32_overflowing_squares_are_caught() -> None:
    # each element is finite, but its square overflows float32: the norm is computed in float64
    big = {"w": np.full((3, 2), 3e38, np.float32), "b": np.zeros(2, np.float32)}
    norm = check_tensors(_round(max_norm=None), big)
    assert np.isfinite(norm) and norm > 1e38
    assert _code(check_tensors, _round(max_norm=1e6), big) is Reason.TOO_LARGE


def test_seen_updates_rejects_duplicates_and_is_bounded() -> None:
    seen = SeenUpdates(capacity=2)
    seen.check("j1", 4, "c1")
    seen.add("j1", 4, "c1", "ab" * 32)
    assert _code(seen.check, "j1", 4, "c1") is Reason.DUPLICATE
    seen.check("j1", 5, "c1")  # another round is fine
    seen.add("j1", 4, "c2", "d")
    seen.add("j1", 4, "c3", "d")
    assert len(seen) == 2
    seen.check("j1", 4, "c1")  # evicted: best effort, the aggregator is authoritative
    seen.forget_round("j1", keep_from=5)
    assert len(seen) == 0
    with pytest.raises(ValueError):
        SeenUpdates(capacity=0)


def test_envelope_bound_scales_with_the_round() -> None:
    small = max_envelope_bytes(_round())
    big = max_envelope_bytes(_round(tensors=tensor_specs([("w", "float32", (1000, 1000))])))
    assert small >= 8 * 4 and big - small >= 4_000_000


def test_tensor_specs_validate() -> None:
    with pytest.raises(ValidationError):
        tensor_specs([("w", "float32", (-1,))])
    with pytest.raises(ValidationError):
        tensor_specs([("w", "float99", (1,))])


def test_rejection_budget_reports_a_burst_per_sender_then_sheds_and_refills() -> None:
    budget = RejectionBudget(burst=3, per_s=2.0)
    assert [budget.take(UNVERIFIED, 0.0) for _ in range(5)] == [True, True, True, False, False]
    # another sender has a bucket of its own: a forger cannot spend an honest client's
    assert budget.take("c1", 0.0) is True
    assert budget.take(UNVERIFIED, 0.25) is False  # half a token
    assert budget.take(UNVERIFIED, 0.5) is True  # one token after 0.5 s at 2/s
    assert budget.take(UNVERIFIED, 0.5) is False
    assert [budget.take(UNVERIFIED, 100.0) for _ in range(4)] == [True, True, True, False]


def test_shed_rejections_are_summarised_per_job_and_the_buckets_forgotten() -> None:
    budget = RejectionBudget(burst=1, per_s=1.0)
    for _ in range(3):
        budget.shed("j1", UNVERIFIED, "MALFORMED")
    budget.shed("j1", "c1", "STALE_ROUND")
    budget.shed("j2", UNVERIFIED, "UNKNOWN_SIGNER")
    assert budget.pending == 5
    budget.take("c1", 0.0)
    budget.take("c2", 0.0)
    budget.take("c2", 0.0)  # refused: c2's bucket is empty
    assert budget.drain(0.5) == [
        Shed("j1", 4, {"MALFORMED": 3, "STALE_ROUND": 1}, {UNVERIFIED: 3, "c1": 1}),
        Shed("j2", 1, {"UNKNOWN_SIGNER": 1}, {UNVERIFIED: 1}),
    ]
    assert budget.pending == 0 and budget.drain(0.5) == []
    # buckets that filled up again are forgotten (memory follows the active senders)
    budget.drain(10.0)
    assert budget._buckets == {}
    with pytest.raises(ValueError):
        RejectionBudget(burst=0)


def test_a_summary_not_sent_merges_into_the_next_of_its_job() -> None:
    first = Shed("j1", 4, {"MALFORMED": 3, "STALE_ROUND": 1}, {UNVERIFIED: 3, "c1": 1})
    later = Shed("j1", 3, {"STALE_ROUND": 3}, {"c1": 2, "c2": 1})
    both = first.merged(later)
    assert both == Shed(
        "j1", 7, {"STALE_ROUND": 4, "MALFORMED": 3}, {UNVERIFIED: 3, "c1": 3, "c2": 1}
    )
    assert list(both.by_reason) == ["STALE_ROUND", "MALFORMED"]  # most common first
    with pytest.raises(ValueError, match="jobs"):
        first.merged(Shed("j2", 1, {"MALFORMED": 1}, {UNVERIFIED: 1}))


# --- updates in parts --------------------------------------------------------------------


def test_round_layout_is_sorted_float32_and_a_manifest_must_match_it() -> None:
    info = _round()
    layout = round_layout(info)
    assert layout == Layout(("b", "w"), ((2,), (3, 2)), ("float32", "float32"))
    check_layout(info, layout)
    for bad in (
        Layout(("b", "w"), ((2,), (2, 3)), ("float32", "float32")),
        Layout(("b",), ((2,),), ("float32",)),
        Layout(("a", "w"), ((2,), (3, 2)), ("float32", "float32")),
    ):
        with pytest.raises(MessageRejected) as err:
            check_layout(info, bad)
        assert err.value.reason is Reason.SHAPE_MISMATCH


def test_a_running_norm_is_bounded_like_a_whole_update() -> None:
    check_norm_bound(_round(max_norm=None), 1e30)
    check_norm_bound(_round(max_norm=2.0), 2.0)
    with pytest.raises(MessageRejected) as err:
        check_norm_bound(_round(max_norm=2.0), 2.5)
    assert err.value.reason is Reason.TOO_LARGE


D = [bytes([i]) * 32 for i in range(8)]
T1, T2 = b"\x01" * 16, b"\x02" * 16


def test_parts_go_to_the_replica_that_owns_their_manifest() -> None:
    routes = PartRoutes()
    routes.announce("a", T1, D[0:3], mine=True, now=0.0)
    routes.announce("b", T2, D[3:5], mine=False, now=0.0)
    assert [routes.route("a", d, 1.0) for d in D[0:3]] == [Route.MINE] * 3
    # a part no manifest names: the claimed sender's open transfer decides
    assert routes.route("a", D[7], 1.0) is Route.MINE
    assert routes.route("b", D[7], 1.0) is Route.OTHERS
    assert routes.route("c", D[7], 1.0) is Route.UNKNOWN
    # another replica's transfer is over once its last part went by
    assert [routes.route("b", d, 1.0) for d in D[3:5]] == [Route.OTHERS] * 2
    assert routes.route("b", D[3], 1.0) is Route.CLOSED
    assert routes.route("b", D[7], 1.0) is Route.UNKNOWN
    # this replica's transfer ends when it says so; its late parts are passed over
    routes.close("a", T1)
    assert routes.route("a", D[1], 2.0) is Route.CLOSED
    assert routes.route("a", D[7], 2.0) is Route.UNKNOWN


def test_routes_expire_other_replicas_quiet_transfers_and_stay_bounded() -> None:
    routes = PartRoutes(capacity=2)
    routes.announce("a", T1, D[0:2], mine=False, now=0.0)
    routes.announce("b", T2, D[2:4], mine=True, now=0.0)
    routes.expire(ttl_s=5.0, now=6.0)
    assert routes.route("a", D[0], 6.0) is Route.CLOSED
    assert routes.route("b", D[2], 6.0) is Route.MINE  # the assembler expires its own
    routes.announce("c", b"\x03" * 16, D[4:6], mine=True, now=7.0)
    assert len(routes) == 2 and routes.route("a", D[0], 7.0) is Route.UNKNOWN
