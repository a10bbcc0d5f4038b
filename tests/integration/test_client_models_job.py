"""A job with a ResNet-style model with BatchNorm, in one process on the embedded bus with
the five real services: one participant holds the plain model, one the model wrapped as
Opacus wraps it (``_module.``), one as DDP does (``module.``). The job's model (from
``model_tensors``) has the running statistics and no ``num_batches_tracked``; every
participant ends with the same global model and its own batch counter. A second job has a
participant made private by Opacus itself (``PrivacyEngine.make_private``, DP-SGD)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qflare.bus import connect_bus
from qflare.client import Participant, RoundInfo, model_tensors
from qflare.crypto import Federation, provision
from qflare.runtime import JobSpec, load_settings, run_in_process

ROUNDS = 2
STEPS = 4


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block = BasicBlock(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(out.mean(dim=(2, 3)))


class OpacusLike(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)


class DDPLike(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def make_model() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet()


def train(model: nn.Module, info: RoundInfo) -> int:
    """SGD on images whose class is the sign of their mean, seeded by client and round."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{info.client}/{info.round}".encode()))
    x = torch.randn(64, 1, 6, 6, generator=g) + torch.randn(64, 1, 1, 1, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        xb, yb = x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return len(x)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=3)


async def run_job(
    fed: Federation,
    tmp_path: Path,
    job_id: str,
    initial: dict[str, np.ndarray],
    models: list[nn.Module],
    trainers: list[Callable[[nn.Module, RoundInfo], int]],
) -> list[Participant]:
    """One job of ``ROUNDS`` rounds, rule mean, one participant per model; returns them
    stopped, the job ended."""
    clients = sorted(fed.clients)[: len(models)]
    spec = JobSpec.model_validate(
        dict(
            job_id=job_id,
            rounds=ROUNDS,
            participants=clients,
            rule="mean",
            detection=False,
            noise_multiplier=0.0,
            clip=100.0,
            seed=3,
            deadline_s=60.0,
            min_updates=len(clients),
        )
    )
    bus = await connect_bus(f"memory://{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path / "data"), pki_dir=str(fed.root))
    services = ["alerting", "accountant", "detector", "ingest", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in services}
    parts = [
        Participant.from_kit(fed.clients[c], m, fit, broker=bus, jobs=[job_id])
        for c, m, fit in zip(clients, models, trainers, strict=True)
    ]
    async with run_in_process(settings, bus, services=services, identities=ids) as running:
        for p in parts:
            await p.start()
        await running.submit_job(spec, initial)
        await asyncio.wait_for(asyncio.gather(*(p.ended_event(job_id).wait() for p in parts)), 90)
        for p in parts:
            await p.stop()
    await bus.close()
    assert {p.ended[job_id] for p in parts} == {"completed"}
    assert all(p.stats.updates_sent == ROUNDS and p.stats.rejected == 0 for p in parts)
    return parts


async def test_batchnorm_and_wrapped_models_take_part_in_one_job(
    fed: Federation, tmp_path: Path
) -> None:
    initial = model_tensors(make_model())
    assert "block.bn1.running_mean" in initial
    assert not any(k.endswith("num_batches_tracked") for k in initial)
    inner = [make_model() for _ in range(3)]
    models: list[nn.Module] = [inner[0], OpacusLike(inner[1]), DDPLike(inner[2])]
    await run_job(fed, tmp_path, "resnet", initial, models, [train] * 3)

    finals = [model_tensors(m) for m in models]  # plain names, wrapped or not
    assert all(set(f) == set(initial) for f in finals)
    for name in initial:
        for other in finals[1:]:
            np.testing.assert_array_equal(other[name], finals[0][name])
    # the running statistics travelled (they moved from their initial values), the batch
    # counters did not (each participant counts its own steps)
    assert np.abs(finals[0]["block.bn1.running_mean"] - initial["block.bn1.running_mean"]).sum()
    assert not np.array_equal(finals[0]["fc.weight"], initial["fc.weight"])
    for m in inner:
        assert int(m.block.bn1.num_batches_tracked) == ROUNDS * STEPS


async def test_an_opacus_private_model_takes_part_in_a_job(fed: Federation, tmp_path: Path) -> None:
    """Opacus' own ``PrivacyEngine.make_private``: the participant holds the
    ``GradSampleModule`` (names under ``_module.``) and trains it with DP-SGD through
    Opacus' optimizer and Poisson-sampled loader; BatchNorm, which DP-SGD cannot use, is
    replaced by GroupNorm with Opacus' ``ModuleValidator.fix`` in the job's model itself."""
    from opacus import PrivacyEngine
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    def make_private_ready() -> nn.Module:
        torch.manual_seed(0)
        return ModuleValidator.fix(TinyResNet())

    initial = model_tensors(make_private_ready())
    assert "bn.weight" in initial and not any("running" in k for k in initial)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 1, 6, 6, generator=g) + torch.randn(64, 1, 1, 1, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    engine = PrivacyEngine()
    inner = make_private_ready()
    private, optimizer, loader = engine.make_private(
        module=inner,
        optimizer=torch.optim.SGD(inner.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=16
        ),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
    )
    assert isinstance(private, GradSampleModule)
    assert all(k.startswith("_module.") for k in private.state_dict())
    steps = 0

    def train_private(model: nn.Module, info: RoundInfo) -> int:
        nonlocal steps
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            steps += 1
        return len(x)

    plain = make_private_ready()
    await run_job(fed, tmp_path, "opacus", initial, [plain, private], [train, train_private])

    final_plain, final_private = model_tensors(plain), model_tensors(private)
    assert set(final_private) == set(initial)
    for name in initial:
        np.testing.assert_array_equal(final_private[name], final_plain[name])
    assert not np.array_equal(final_plain["fc.weight"], initial["fc.weight"])
    # Opacus accounted every DP-SGD step the participant took, in both rounds
    assert steps == ROUNDS * len(loader)
    assert engine.accountant.history == [(0.5, 16 / 64, steps)]
    assert engine.get_epsilon(1e-5) > 0
