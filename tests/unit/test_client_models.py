"""Any torch model in the SDK: a ResNet-style block with BatchNorm (float running statistics
travel, the int64 ``num_batches_tracked`` stays local), and wrapped modules whose names
carry a wrapper's prefix (Opacus ``_module.``, DDP ``module.``, torch.compile
``_orig_mod.``) matched to the job's plain names. Opacus and DDP are stood in for by
modules that name their child as they do; torch.compile is the real one (it compiles
nothing until called)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from qflare.client import Kit, Participant, RoundInfo, load_tensors, model_tensors, plain_name
from qflare.crypto.testing import make_federation
from qflare.messages import MessageRejected, Reason


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: two 3x3 conv + BatchNorm, identity shortcut."""

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
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block = BasicBlock(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(torch.relu(self.bn(self.stem(x))))
        return self.fc(out.mean(dim=(2, 3)))


class OpacusLike(nn.Module):
    """Names its child as Opacus' GradSampleModule does: ``_module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)


class DDPLike(nn.Module):
    """Names its child as DistributedDataParallel and DataParallel do: ``module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "opacus": OpacusLike,
    "ddp": DDPLike,
    "compile": torch.compile,
    "compile-of-ddp": lambda m: torch.compile(DDPLike(m)),
    "opacus-of-ddp": lambda m: OpacusLike(DDPLike(m)),
}

PREFIX = {
    "opacus": "_module.",
    "ddp": "module.",
    "compile": "_orig_mod.",
    "compile-of-ddp": "_orig_mod.module.",
    "opacus-of-ddp": "_module.module.",
}


def resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


def batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))] * n


def train(model: nn.Module, round_info: RoundInfo | None = None) -> int:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return 24


@pytest.fixture(scope="module")
def kit() -> Kit:
    fed = make_federation(clients=1)
    return Kit(
        fed["client-000"],
        fed.trust(),
        fed["ingest"].cert,
        aggregator_cert=fed["aggregator"].cert,
        detector_cert=fed["detector"].cert,
    )


def float_keys(model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("fc.weight", "fc.weight"),
        ("_module.fc.weight", "fc.weight"),
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("_orig_mod.module.block.bn1.running_mean", "block.bn1.running_mean"),
        ("_module.module.bias", "bias"),
        ("module", "module"),  # a tensor called "module" keeps its name
        ("encoder.module.weight", "encoder.module.weight"),  # only in front
    ],
)
def test_plain_name_takes_wrapper_prefixes_off_the_front(name: str, plain: str) -> None:
    assert plain_name(name) == plain


def test_a_batchnorm_model_sends_its_float_state_and_keeps_its_counters() -> None:
    m = resnet()
    t = model_tensors(m)
    assert set(t) == float_keys(m)
    assert "block.bn1.running_mean" in t and "block.bn1.running_var" in t
    assert not any(k.endswith("num_batches_tracked") for k in t)
    assert all(np.issubdtype(v.dtype, np.floating) for v in t.values())


def test_loading_leaves_the_counters_and_loads_the_running_statistics() -> None:
    m = resnet()
    train(m)
    counter = int(m.block.bn1.num_batches_tracked)
    assert counter == 3
    g = {k: np.full_like(v, 0.5) for k, v in model_tensors(resnet(1)).items()}
    load_tensors(m, g)
    np.testing.assert_array_equal(m.block.bn1.running_mean.numpy(), 0.5)
    np.testing.assert_array_equal(m.fc.weight.detach().numpy(), 0.5)
    assert int(m.block.bn1.num_batches_tracked) == counter
    # a job that names a counter anyway (as a float): not overwritten either
    load_tensors(m, {"block.bn1.num_batches_tracked": np.array(99.0, np.float32)})
    assert int(m.block.bn1.num_batches_tracked) == counter


def test_a_participant_with_batchnorm_sends_the_running_statistics_delta(kit: Kit) -> None:
    m = resnet()
    g = model_tensors(resnet())
    p = Participant(kit, m, train, jobs=["j"])
    info = RoundInfo("j", 1, "client-000", 0, b"\0" * 32, 1e12, 1.0, ("client-000",), "mean")
    update = p._make_update(g, info)
    assert set(update.tensors) == set(g) and update.num_samples == 24
    assert np.abs(update.tensors["block.bn1.running_mean"]).sum() > 0  # trained stats moved
    assert int(m.block.bn1.num_batches_tracked) == 3  # counted locally, not sent


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_wrapped_model_speaks_the_jobs_plain_names(wrapper: str) -> None:
    inner = resnet()
    wrapped = WRAPPERS[wrapper](inner)
    prefix = PREFIX[wrapper]
    assert all(k.startswith(prefix) for k in wrapped.state_dict())
    # its tensors are the plain model's, by the plain names
    plain = model_tensors(resnet())
    mine = model_tensors(wrapped)
    assert set(mine) == set(plain)
    for k in plain:
        np.testing.assert_array_equal(mine[k], plain[k])
    # a global model by plain names loads into the wrapped module's parameters
    g = {k: np.full_like(v, 0.25) for k, v in plain.items()}
    load_tensors(wrapped, g)
    np.testing.assert_array_equal(inner.fc.weight.detach().numpy(), 0.25)
    np.testing.assert_array_equal(inner.block.bn2.running_var.numpy(), 0.25)
    assert int(inner.block.bn2.num_batches_tracked) == 0
    assert set(model_tensors(wrapped, sorted(g))) == set(g)
    # and the other way: a job made from a wrapped model's raw state-dict names
    raw = {prefix + k: v for k, v in g.items()}
    other = resnet(3)
    load_tensors(other, raw)
    np.testing.assert_array_equal(other.fc.weight.detach().numpy(), 0.25)
    assert set(model_tensors(other, sorted(raw))) == set(raw)


def test_a_participant_trains_through_a_wrapper_and_sends_plain_names(kit: Kit) -> None:
    g = model_tensors(resnet())
    plain = Participant(kit, resnet(), train, jobs=["j"])
    wrapped = Participant(kit, OpacusLike(resnet()), train, jobs=["j"])
    info = RoundInfo("j", 1, "client-000", 0, b"\0" * 32, 1e12, 1.0, ("client-000",), "mean")
    a = plain._make_update(g, info)
    b = wrapped._make_update(g, info)
    assert set(a.tensors) == set(b.tensors) == set(g)
    for k in g:  # the same model, data and steps: the same update
        np.testing.assert_allclose(a.tensors[k], b.tensors[k], rtol=1e-5, atol=1e-7)


def test_names_that_collide_once_unwrapped_are_refused() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.module = nn.Module()
            self.module.fc = nn.Linear(2, 2)

    m = Both()
    with pytest.raises(ValueError, match=r"two tensors of the model are named 'fc.weight'"):
        model_tensors(m)
    # exact names still work, and an ambiguous wrapped name says which it could be
    assert set(model_tensors(m, ["fc.weight", "module.fc.weight"])) == {
        "fc.weight",
        "module.fc.weight",
    }
    with pytest.raises(ValueError, match=r"'_orig_mod.fc.weight' matches \['fc.weight', 'module"):
        load_tensors(m, {"_orig_mod.fc.weight": np.zeros((2, 2), np.float32)})


def test_unknown_names_and_wrong_shapes_are_still_refused() -> None:
    wrapped = OpacusLike(resnet())
    with pytest.raises(MessageRejected) as err:
        load_tensors(wrapped, {"head.weight": np.zeros((3, 4), np.float32)})
    assert err.value.reason is Reason.SHAPE_MISMATCH and "head.weight" in err.value.detail
    with pytest.raises(MessageRejected, match=r"fc.weight: global shape"):
        load_tensors(wrapped, {"fc.weight": np.zeros((4, 3), np.float32)})
    with pytest.raises(KeyError, match=r"the model has no tensor 'head.weight'"):
        model_tensors(wrapped, ["head.weight"])
