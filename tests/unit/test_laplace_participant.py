"""The SDK's local-DP option: ``Participant(..., local_dp=LocalLaplace(...))`` noises the
update after training (and after ``update_transform``) and before it is signed and sealed;
what the aggregator opens is the noised update, and every release is accounted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qflare.client import Kit, LocalUpdate, Participant, RoundInfo
from qflare.crypto.testing import make_federation
from qflare.messages import open_envelope
from qflare.privacy import LocalLaplace, l1_norm


@pytest.fixture(scope="module")
def fed():
    return make_federation(clients=1)


def kit(fed) -> Kit:  # type: ignore[no-untyped-def]
    return Kit(
        fed["client-000"],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )


def info(round_: int = 1) -> RoundInfo:
    return RoundInfo(
        job="j1",
        round=round_,
        client="client-000",
        model_version=round_ - 1,
        model_digest=b"\0" * 32,
        deadline=1e12,
        clip_norm=1.0,
        participants=("client-000",),
        rule="mean",
    )


def add_quarter(model: torch.nn.Module, round_info: RoundInfo) -> int:
    with torch.no_grad():
        model.weight += 0.25
    return 5


GLOBAL = {"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)}


async def test_the_sealed_update_is_the_noised_one_and_each_release_counts(fed) -> None:
    torch.manual_seed(0)
    dp = LocalLaplace(epsilon=2.0, clip=0.1, seed=11)
    p = Participant(kit(fed), torch.nn.Linear(2, 1), add_quarter, jobs=["j1"], local_dp=dp)
    update = p._make_update(GLOBAL, info(1))
    # what the same mechanism makes of the clean delta (0.25, 0.25 | 0), clipped to L1 0.1
    clean = {"weight": np.full((1, 2), 0.25, np.float32), "bias": np.zeros(1, np.float32)}
    expected = LocalLaplace(epsilon=2.0, clip=0.1, seed=11)(clean)
    assert update.num_samples == 5
    for name in GLOBAL:
        np.testing.assert_array_equal(update.tensors[name], expected[name])
        assert update.tensors[name].dtype == np.float32
    assert not np.allclose(update.tensors["weight"], 0.25)
    # sealed as made: the aggregator opens exactly these tensors
    env = open_envelope(
        await p._encode(update, info(1)), fed.trust(), kem_key=fed["aggregator"].kem
    )
    for name in GLOBAL:
        np.testing.assert_array_equal(env.body.tensors[name], update.tensors[name])
    p._make_update(GLOBAL, info(2))
    account = dp.account()
    assert [(r.job, r.round) for r in account.releases] == [("j1", 1), ("j1", 2)]
    assert account.epsilon == pytest.approx(4.0)


def test_local_dp_comes_after_the_update_transform(fed) -> None:
    class Fixed(Participant):
        def compute_update(self, global_tensors, round_info):  # type: ignore[no-untyped-def]
            return LocalUpdate({k: np.full_like(v, 2.0) for k, v in global_tensors.items()}, 3)

    def triple(update, round_info):  # type: ignore[no-untyped-def]
        return {k: 3.0 * v for k, v in update.items()}

    seen: list[dict[str, np.ndarray]] = []

    class Clipped(LocalLaplace):
        """The mechanism, recording what it was given."""

        def __call__(self, update, *, job="", round=0):  # type: ignore[no-untyped-def]
            seen.append({k: np.array(v) for k, v in update.items()})
            return super().__call__(update, job=job, round=round)

    dp = Clipped(epsilon=1e9, clip=1.0, seed=0)  # b = 2e-9: the clipping alone shows
    p = Fixed(kit(fed), None, None, update_transform=triple, jobs=["j1"], local_dp=dp)
    update = p._make_update({"w": np.zeros(4, np.float32)}, info())
    assert seen[-1]["w"].tolist() == [6.0] * 4  # transformed first
    assert l1_norm(update.tensors["w"]) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(update.tensors["w"], 0.25, atol=1e-6)


def test_no_local_dp_sends_the_clean_delta(fed) -> None:
    torch.manual_seed(0)
    p = Participant(kit(fed), torch.nn.Linear(2, 1), add_quarter, jobs=["j1"])
    assert p.local_dp is None
    np.testing.assert_allclose(p._make_update(GLOBAL, info()).tensors["weight"], 0.25)
