"""Updates in parts: split, encode, reassemble bit for bit, and every way a part is refused
(each refusal of a signed message leaves no state behind)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from qflare.crypto.testing import MemoryFederation, make_federation
from qflare.messages import Limits, MessageRejected, Reason, encode, open_envelope
from qflare.messages.bodies import UpdateManifest, UpdatePart
from qflare.messages.envelope import Envelope, peek_header
from qflare.messages.parts import (
    PartAssembler,
    RunningCheck,
    SplitUpdate,
    encode_update_parts,
    max_part_values,
    split_update,
)
from qflare.messages.tensors import Layout

JOB = "job-p"
ROUND = 3
PV = 10  # values per part: divides none of the tensors' sizes below


@pytest.fixture(scope="module")
def fed() -> MemoryFederation:
    return make_federation(clients=2)


def make_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "w": rng.standard_normal((4, 6)).astype(np.float32),  # 24 values
        "b": rng.standard_normal(7).astype(np.float32),
        "conv": rng.standard_normal((2, 3, 5)).astype(np.float32),
        "scale": np.array(1.5, np.float32),  # a scalar
        "empty": np.zeros((0, 3), np.float32),
        # not C-contiguous, and float64: values cast to float32 as Layout.flatten does
        "t": rng.standard_normal((5, 3)).T,
        "big": rng.standard_normal(43).astype(np.float32),  # spans several whole parts
    }


def opened(fed: MemoryFederation, data: bytes, **kw: Any) -> Envelope[Any]:
    return open_envelope(data, fed.trust(), kem_key=fed["ingest"].kem, **kw)


def send(
    fed: MemoryFederation, tensors: dict[str, np.ndarray], *, who: str = "client-000", **kw: Any
) -> tuple[Envelope[Any], list[Envelope[Any]]]:
    options: dict[str, Any] = dict(
        job=JOB, round=ROUND, base_version=2, num_samples=9, part_values=PV
    )
    datas = list(encode_update_parts(fed[who], tensors, **{**options, **kw}))
    return opened(fed, datas[0]), [opened(fed, d) for d in datas[1:]]


def craft(
    fed: MemoryFederation,
    split: SplitUpdate,
    bodies: Iterable[UpdatePart],
    *,
    who: str = "client-000",
    **changes: Any,
) -> tuple[Envelope[Any], list[Envelope[Any]]]:
    """A manifest naming exactly ``bodies`` (however wrong they are), signed by ``who``."""
    datas = [encode("update.part", b, fed[who], job=JOB, round=ROUND) for b in bodies]
    manifest = UpdateManifest(
        base_version=2,
        num_samples=9,
        transfer=split.transfer,
        tensors=split.shapes(),
        part_values=split.part_values,
        part_digests=[peek_header(d).body_digest for d in datas],
    ).model_copy(update=changes)
    data = encode("update.manifest", manifest, fed[who], job=JOB, round=ROUND)
    return opened(fed, data), [opened(fed, d) for d in datas]


def refused(call: Any, *args: Any, **kw: Any) -> Reason:
    with pytest.raises(MessageRejected) as exc:
        call(*args, **kw)
    return exc.value.reason


def key(env: Envelope[Any]) -> tuple[str, bytes]:
    return (env.sender, env.body.transfer)


# --- round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_parts_rebuild_layouts_flat_vector_bit_for_bit(fed: MemoryFederation, sealed: bool) -> None:
    tensors = make_tensors()
    layout = Layout.of(tensors)
    seal = {"seal_to": [fed["ingest"].cert, fed["aggregator"].cert]} if sealed else {}
    manifest, parts = send(fed, tensors, metrics={"loss": 0.5}, **seal)
    assert manifest.sealed == sealed and all(p.sealed == sealed for p in parts)
    assert manifest.body.base_version == 2 and manifest.body.metrics == {"loss": 0.5}
    assert len(parts) == math.ceil(layout.size / PV) == len(manifest.body.part_digests)

    asm = PartAssembler()
    expected = Layout(layout.names, layout.shapes, ("float32",) * len(layout.names))
    info = asm.start(manifest, expected=expected)
    assert info.total == layout.size and info.manifest_digest == manifest.body_digest
    check = RunningCheck(info.layout)
    row = np.full(info.total, np.nan, np.float32)
    for i, part in enumerate(parts):
        assert not asm.done(*key(manifest))
        start, values = asm.add(part)
        assert start == i * PV and values.dtype == np.float32 and not values.flags.writeable
        check.update(start, values)
        row[start : start + values.size] = values
    assert asm.done(*key(manifest))
    assert asm.finish(*key(manifest)) == info and asm.pending == 0
    assert row.tobytes() == layout.flatten(tensors).tobytes()
    assert check.values == layout.size
    assert check.norm == pytest.approx(float(np.linalg.norm(row.astype(np.float64))), rel=1e-12)


def test_a_reader_ingest_vouched_for_opens_parts_by_the_manifests_digests(
    fed: MemoryFederation,
) -> None:
    manifest, parts = send(fed, make_tensors())
    for part, digest in zip(parts, manifest.body.part_digests, strict=True):
        env = open_envelope(encode_roundtrip(fed, part), fed.trust(), vouched_digest=digest)
        assert env.body.index == part.body.index


def encode_roundtrip(fed: MemoryFederation, part: Envelope[Any]) -> bytes:
    """The same part encoded again (a fresh signature and nonce: the same body digest)."""
    data = encode("update.part", part.body, fed[part.sender], job=JOB, round=ROUND)
    assert peek_header(data).body_digest == part.body_digest
    return data


def test_a_part_inside_one_float32_tensor_is_a_view_of_it() -> None:
    tensors = {"a": np.arange(25, dtype=np.float32), "b": np.arange(5, dtype=np.float32)}
    split = split_update(tensors, part_values=10)
    parts = list(split.parts())
    assert [p.values.size for p in parts] == [10, 10, 10]
    assert np.shares_memory(parts[0].values, tensors["a"])  # inside "a"
    assert not np.shares_memory(parts[2].values, tensors["a"])  # spans "a" and "b": a copy
    assert np.concatenate([p.values for p in parts]).tolist() == list(range(25)) + list(range(5))


def test_sealed_parts_spool_to_a_file_that_is_gone_afterwards(
    fed: MemoryFederation, tmp_path: Any
) -> None:
    tensors = make_tensors()
    manifest, parts = send(
        fed, tensors, seal_to=fed["ingest"].cert, spool_bytes=0, spool_dir=str(tmp_path)
    )
    asm = PartAssembler()
    asm.start(manifest)
    row = np.concatenate([asm.add(p)[1] for p in parts])
    assert row.tobytes() == Layout.of(tensors).flatten(tensors).tobytes()
    assert list(tmp_path.iterdir()) == []


def test_tensors_changed_while_sending_are_caught_before_the_part_goes(
    fed: MemoryFederation,
) -> None:
    tensors = make_tensors()
    out = encode_update_parts(
        fed["client-000"],
        tensors,
        job=JOB,
        round=ROUND,
        base_version=0,
        num_samples=1,
        part_values=PV,
    )
    next(out)  # the manifest: every part's digest is taken
    tensors["b"][0] += 1  # "b" is first in layout order
    with pytest.raises(RuntimeError, match="tensors changed"):
        next(out)


@pytest.mark.parametrize(
    ("tensors", "options", "match"),
    [
        ({}, {}, "at least one tensor"),
        ({"a": np.zeros(0, np.float32)}, {}, "at least one value"),
        ({"a": np.zeros(3, np.int32)}, {}, "float32"),
        ({"a": np.zeros(3, np.float32)}, {"part_values": 0}, "positive"),
        ({"a": np.zeros(3, np.float32)}, {"part_values": max_part_values() + 1}, "envelope"),
        ({"a": np.zeros(3, np.float32)}, {"transfer": b"short"}, "16 bytes"),
    ],
    ids=["no-tensor", "no-value", "int", "zero-part", "part-too-big", "transfer-id"],
)
def test_split_refuses_what_cannot_be_sent(
    tensors: dict[str, np.ndarray], options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        split_update(tensors, **options)


# --- parts refused ---------------------------------------------------------------------


def test_a_missing_part_never_completes_and_expires(fed: MemoryFederation) -> None:
    now = [100.0]
    asm = PartAssembler(ttl_s=60, clock=lambda: now[0])
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    for part in parts[:-1]:
        asm.add(part)
    assert not asm.done(*key(manifest)) and key(manifest) in asm
    now[0] += 59
    assert asm.expire() == []  # the last part came at 100: not yet
    now[0] += 2
    assert asm.expire() == [key(manifest)]
    assert key(manifest) not in asm and not asm.done(*key(manifest))
    assert refused(asm.add, parts[-1]) is Reason.CHUNK_MISMATCH


def test_finishing_an_incomplete_transfer_is_refused_and_drops_it(
    fed: MemoryFederation,
) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    asm.add(parts[0])
    assert refused(asm.finish, *key(manifest)) is Reason.CHUNK_MISMATCH
    assert asm.pending == 0


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        ([1], Reason.CHUNK_MISMATCH),  # reordered: 0 is next
        ([0, 2], Reason.CHUNK_MISMATCH),  # one skipped
        ([0, 0], Reason.DUPLICATE),
        ([0, 1, 0], Reason.DUPLICATE),
    ],
    ids=["reordered", "skipped", "repeated", "repeated-later"],
)
def test_parts_out_of_order_or_repeated_drop_the_transfer(
    fed: MemoryFederation, order: list[int], reason: Reason
) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    *good, bad = order
    for i in good:
        asm.add(parts[i])
    assert refused(asm.add, parts[bad]) is reason
    assert key(manifest) not in asm and asm.pending == 0
    assert refused(asm.add, parts[bad + 1]) is Reason.CHUNK_MISMATCH  # no transfer now


def test_a_surplus_part_drops_the_transfer(fed: MemoryFederation) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    for part in parts:
        asm.add(part)
    surplus = UpdatePart(
        transfer=manifest.body.transfer, index=len(parts), values=np.zeros(PV, np.float32)
    )
    data = encode("update.part", surplus, fed["client-000"], job=JOB, round=ROUND)
    assert refused(asm.add, opened(fed, data)) is Reason.CHUNK_MISMATCH
    assert asm.pending == 0


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.zeros(PV, np.float32), Reason.TOO_LARGE),  # the last part holds 3
        (np.zeros(2, np.float32), Reason.CHUNK_MISMATCH),
        (np.zeros(3, np.float64), Reason.DTYPE_NOT_ALLOWED),
        (np.zeros((3, 1), np.float32), Reason.CHUNK_MISMATCH),
    ],
    ids=["oversized", "short", "float64", "two-dimensional"],
)
def test_a_last_part_of_the_wrong_size_or_type_drops_the_transfer(
    fed: MemoryFederation, values: np.ndarray, reason: Reason
) -> None:
    split = split_update({"a": np.ones(23, np.float32)}, part_values=PV)
    bodies = list(split.parts())
    bodies[-1] = UpdatePart(transfer=split.transfer, index=2, values=values)
    manifest, parts = craft(fed, split, bodies)  # the manifest names these very parts
    asm = PartAssembler()
    asm.start(manifest)
    asm.add(parts[0])
    asm.add(parts[1])
    assert refused(asm.add, parts[2]) is reason
    assert asm.pending == 0


def test_a_part_its_sender_signed_but_the_manifest_does_not_name_is_bad_digest(
    fed: MemoryFederation,
) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    body = parts[0].body
    other = UpdatePart(transfer=body.transfer, index=0, values=body.values + np.float32(1))
    data = encode("update.part", other, fed["client-000"], job=JOB, round=ROUND)
    assert refused(asm.add, opened(fed, data)) is Reason.BAD_DIGEST
    assert asm.pending == 0


def test_a_part_another_client_signed_belongs_to_no_transfer_of_its_own(
    fed: MemoryFederation,
) -> None:
    """Signed by client-001 with client-000's transfer id: refused as client-001's, and
    client-000's transfer is not dropped (else anyone who read a transfer id could cancel
    another client's update); client-001 holds nothing."""
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    forged = encode("update.part", parts[0].body, fed["client-001"], job=JOB, round=ROUND)
    env = opened(fed, forged)
    assert refused(asm.add, env) is Reason.CHUNK_MISMATCH
    assert key(env) not in asm and asm.pending == 1
    for part in parts:
        asm.add(part)
    assert asm.done(*key(manifest))


@pytest.mark.parametrize("where", ["body", "signature"])
def test_a_changed_byte_does_not_open_and_drops_nothing(fed: MemoryFederation, where: str) -> None:
    """open_envelope refuses it (BAD_DIGEST, BAD_SIGNATURE) before the assembler sees it:
    it names no one, so the transfer stays and completes with the genuine part."""
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    data = bytearray(encode_roundtrip(fed, parts[0]))
    # the envelope's signature follows its body_digest (the certificate holds a "sig" too)
    sig = data.index(b"\xa3sig", data.index(b"\xabbody_digest"))
    at = len(data) - 5 if where == "body" else sig + 10
    data[at] ^= 1
    expected = Reason.BAD_DIGEST if where == "body" else Reason.BAD_SIGNATURE
    assert refused(opened, fed, bytes(data)) is expected
    for part in parts:
        asm.add(part)
    assert asm.done(*key(manifest))


@pytest.mark.parametrize("field", ["job", "round"])
def test_a_part_for_another_job_or_round_drops_the_transfer(
    fed: MemoryFederation, field: str
) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    asm.add(parts[0])
    where = {"job": JOB, "round": ROUND, field: "other" if field == "job" else ROUND + 1}
    data = encode("update.part", parts[1].body, fed["client-000"], **where)
    assert refused(asm.add, opened(fed, data)) is Reason.CHUNK_MISMATCH
    assert asm.pending == 0


# --- manifests refused -----------------------------------------------------------------


def test_a_second_manifest_of_a_transfer_drops_it(fed: MemoryFederation) -> None:
    asm = PartAssembler()
    manifest, parts = send(fed, make_tensors())
    asm.start(manifest)
    asm.add(parts[0])
    assert refused(asm.start, manifest) is Reason.DUPLICATE
    assert asm.pending == 0


def shapes_of(tensors: dict[str, np.ndarray], **changes: tuple[int, ...]) -> Layout:
    layout = Layout.of(tensors)
    shapes = tuple(changes.get(n, s) for n, s in zip(layout.names, layout.shapes, strict=True))
    return Layout(layout.names, shapes, layout.dtypes)


@pytest.mark.parametrize(
    "expected",
    [
        lambda t: shapes_of(t, w=(6, 4)),
        lambda t: Layout.of({**t, "extra": np.zeros(1, np.float32)}),
        lambda t: Layout.of({k: v for k, v in t.items() if k != "b"}),
    ],
    ids=["shape", "extra-name", "missing-name"],
)
def test_a_manifest_unlike_the_rounds_layout_is_shape_mismatch(
    fed: MemoryFederation, expected: Any
) -> None:
    tensors = make_tensors()
    manifest, _ = send(fed, tensors)
    asm = PartAssembler()
    assert refused(asm.start, manifest, expected=expected(tensors)) is Reason.SHAPE_MISMATCH
    assert asm.pending == 0


@pytest.mark.parametrize(
    ("changes", "limits", "reason"),
    [
        ({"part_digests": [bytes(32)] * 2}, Limits(), Reason.CHUNK_MISMATCH),
        ({"part_digests": [bytes(32)] * 4}, Limits(), Reason.CHUNK_MISMATCH),
        ({}, Limits(max_body_bytes=4 * 22), Reason.TOO_LARGE),
        ({}, Limits(max_total_elements=22), Reason.TOO_LARGE),
        ({"part_values": max_part_values() + 1}, Limits(), Reason.TOO_LARGE),
        ({"tensors": "reversed"}, Limits(), Reason.SHAPE_MISMATCH),
        ({"tensors": "repeated"}, Limits(), Reason.SHAPE_MISMATCH),
    ],
    ids=["few-digests", "many-digests", "bytes", "values", "part-size", "unsorted", "dup-name"],
)
def test_a_manifest_that_does_not_add_up_is_refused(
    fed: MemoryFederation, changes: dict[str, Any], limits: Limits, reason: Reason
) -> None:
    split = split_update(
        {"a": np.ones(13, np.float32), "b": np.ones(10, np.float32)}, part_values=PV
    )
    shapes = split.shapes()
    if changes.get("tensors") == "reversed":
        changes["tensors"] = shapes[::-1]
    elif changes.get("tensors") == "repeated":
        changes["tensors"] = [shapes[0], shapes[0]]
    manifest, _ = craft(fed, split, split.parts(), **changes)
    asm = PartAssembler(limits)
    assert refused(asm.start, manifest) is reason
    assert asm.pending == 0


def test_a_sender_has_few_transfers_unfinished(fed: MemoryFederation) -> None:
    asm = PartAssembler(max_per_sender=1)
    first, _ = send(fed, make_tensors())
    second, _ = send(fed, make_tensors())
    other, _ = send(fed, make_tensors(), who="client-001")
    asm.start(first)
    assert refused(asm.start, second) is Reason.TOO_LARGE
    assert key(second) not in asm and key(first) in asm
    asm.start(other)
    assert asm.pending == 2


def test_kinds_are_checked(fed: MemoryFederation) -> None:
    manifest, parts = send(fed, make_tensors())
    asm = PartAssembler()
    assert refused(asm.start, parts[0]) is Reason.WRONG_KIND
    assert refused(asm.add, manifest) is Reason.WRONG_KIND


# --- the running check -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_running_check_names_the_first_non_finite_value(bad: float) -> None:
    tensors = make_tensors()
    tensors["conv"][1, 2, 3] = bad
    tensors["w"][3, 5] = bad  # later in layout order ("conv" < "w")
    layout = Layout.of(tensors)
    flat = layout.flatten(tensors)
    check = RunningCheck(layout)
    with pytest.raises(MessageRejected) as exc:
        for start in range(0, flat.size, PV):
            check.update(start, flat[start : start + PV])
    assert exc.value.reason is Reason.NON_FINITE
    assert exc.value.detail.startswith("conv[1, 2, 3] is ")


def test_running_check_does_not_overflow_on_large_finite_values() -> None:
    layout = Layout(("a",), ((3, 1000),), ("float32",))
    values = np.full(3000, np.finfo(np.float32).max, np.float32)
    check = RunningCheck(layout)
    check.update(0, values[:1700])
    check.update(1700, values[1700:])
    assert check.norm == pytest.approx(float(np.finfo(np.float32).max) * math.sqrt(3000))
    with pytest.raises(ValueError):
        check.update(2999, values[:2])
