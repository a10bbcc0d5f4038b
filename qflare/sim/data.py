"""Data for simulated federations: offline data sets and client partitions.

Everything here works without a network. The default data set is scikit-learn's bundled
handwritten digits (1797 images of 8x8 pixels, 10 classes); ``fashion-mnist`` reads the IDX
files that Debian's ``dataset-fashion-mnist`` package installs. A user's own data plugs in
through :func:`from_torch_dataset` (any object with ``__len__`` and ``__getitem__`` returning
``(features, label)``, which every ``torch.utils.data.Dataset`` of that shape is) or by
building an :class:`ArrayDataset` directly, and registering a loader with
:func:`register_dataset`, installing one as an entry point of the group ``qflare.datasets``,
or naming it ``module:function`` (a loader is ``loader() -> SplitData``).

Non-IID splits follow the label-Dirichlet scheme of Hsu, Qi and Brown, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification" (2019): for every
class, the share of its samples each client gets is drawn from Dirichlet(alpha); small alpha
gives clients few classes, large alpha approaches an IID split.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# The test split is fixed (not drawn from the run's seed) so accuracies of runs with
# different seeds are measured on the same held-out images.
_SPLIT_SEED = 20240601


class DatasetUnavailable(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class ArrayDataset:
    """Features and integer labels held in memory.

    ``x`` is float32 with the sample axis first (``(n, features)`` or ``(n, c, h, w)``),
    ``y`` is int64 in ``[0, num_classes)``.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")
        if self.y.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {self.y.shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.y.size and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got [{self.y.min()}, {self.y.max()}]"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices], self.num_classes)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])


@dataclass(frozen=True)
class SplitData:
    """A named data set with its training part (to be partitioned) and a held-out test part."""

    name: str
    train: ArrayDataset
    test: ArrayDataset


class SampleDataset(Protocol):
    """What :func:`from_torch_dataset` needs: a map-style data set of ``(features, label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, Any]: ...


def from_torch_dataset(dataset: SampleDataset, num_classes: int) -> ArrayDataset:
    """Materialise a map-style (torch) data set into an :class:`ArrayDataset`.

    Features may be tensors or arrays of any fixed shape; labels ints or 0-d tensors.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the data set is empty")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for i in range(n):
        features, label = dataset[i]
        xs.append(np.asarray(features, dtype=np.float32))
        ys.append(int(label))
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise ValueError(f"samples must share one shape, got {sorted(shapes)[:3]}...")
    return ArrayDataset(np.stack(xs), np.asarray(ys, dtype=np.int64), num_classes)


def _standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Statistics from the training part only, so nothing of the test set leaks into training.
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True)
    std[std < 1e-6] = 1.0
    return ((train_x - mean) / std).astype(np.float32), ((test_x - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.2) -> SplitData:
    """scikit-learn's bundled 8x8 digits (1797 x 64, 10 classes), standardised, fixed split."""
    from sklearn.datasets import load_digits as _sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_x, test_x = _standardise(x[train_idx], x[test_idx])
    return SplitData(
        "digits",
        ArrayDataset(train_x, y[train_idx], 10),
        ArrayDataset(test_x, y[test_idx], 10),
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (as used by MNIST and Fashion-MNIST), gzipped or not.

    Format: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    then one big-endian uint32 per dimension, then the data.
    """
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported, type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {expected} bytes of data, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetUnavailable(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}. Install the Debian package "
        f"'{FASHION_MNIST_PACKAGE}' (apt-get install {FASHION_MNIST_PACKAGE}) or pass the "
        "folder holding the IDX files."
    )


def load_fashion_mnist(
    root: Path | str = FASHION_MNIST_DIR, train_limit: int | None = None
) -> SplitData:
    """Fashion-MNIST (60000 + 10000 images of 28x28, 10 classes) from local IDX files.

    ``train_limit`` keeps the first that many training images (a quicker sweep); the test set
    is always the full official one. Images are returned as ``(n, 1, 28, 28)``, standardised
    with the training part's mean and standard deviation.
    """
    root = Path(root)
    paths = {
        stem: _find_idx(root, stem)
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    train_x = read_idx(paths["train-images-idx3-ubyte"]).astype(np.float32) / 255.0
    train_y = read_idx(paths["train-labels-idx1-ubyte"]).astype(np.int64)
    test_x = read_idx(paths["t10k-images-idx3-ubyte"]).astype(np.float32) / 255.0
    test_y = read_idx(paths["t10k-labels-idx1-ubyte"]).astype(np.int64)
    if (
        train_x.ndim != 3
        or train_x.shape[0] != train_y.shape[0]
        or test_x.shape[0] != test_y.shape[0]
    ):
        raise ValueError(f"unexpected Fashion-MNIST shapes {train_x.shape}, {train_y.shape}")
    if train_limit is not None:
        if train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {train_limit}")
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    # One global mean/std (not per pixel): border pixels are constant and per-pixel scaling
    # would blow their rare non-zero values up.
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    train_x = ((train_x - mean) / std)[:, None, :, :].astype(np.float32)
    test_x = ((test_x - mean) / std)[:, None, :, :].astype(np.float32)
    return SplitData(
        "fashion-mnist",
        ArrayDataset(train_x, train_y, 10),
        ArrayDataset(test_x, test_y, 10),
    )


_LOADERS: dict[str, Callable[[], SplitData]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
}


#: entry-point group of installed data-set loaders
DATASETS_GROUP = "qflare.datasets"


def register_dataset(name: str, loader: Callable[[], SplitData]) -> None:
    """Make ``loader`` available as ``--dataset name`` (e.g. wrapping :func:`from_torch_dataset`)."""
    if not name or name in _LOADERS or ":" in name:
        raise ValueError(f"data set name {name!r} is empty, has a ':' or is already registered")
    _LOADERS[name] = loader


def _plugin_loader(name: str) -> Callable[[], SplitData] | None:
    """The loader a plug-in name stands for (``module:function`` or an entry point of
    ``qflare.datasets``); None when it is neither."""
    loader: Callable[[], SplitData] | None = callable_plugin(
        name, DATASETS_GROUP, "--dataset", "loader() -> qflare.sim.data.SplitData"
    )
    return loader


def callable_plugin(name: str, group: str, flag: str, shape: str) -> Any:
    """A simulator plug-in (``module:function`` or an entry point of ``group``) that must be
    callable; None when ``name`` is neither. One that cannot be used raises
    :class:`qflare.sim.config.SimConfigError` naming ``flag`` and the reason."""
    from qflare.robust import PluginError, load_plugin
    from qflare.sim.config import SimConfigError

    try:
        obj = load_plugin(name, group)
    except PluginError as exc:
        raise SimConfigError(f"{flag} {name}: {exc}") from None
    if obj is not None and not callable(obj):
        raise SimConfigError(
            f"{flag} {name}: {type(obj).__name__} is not callable; a plug-in here is {shape}"
        )
    return obj


def dataset_names() -> list[str]:
    """Data sets ``--dataset`` takes: registered ones and installed plug-ins (listed), and
    (by ``in``) any ``module:function`` that loads."""
    from qflare.robust import PluginNames, entry_point_names

    names = sorted({*_LOADERS, *entry_point_names(DATASETS_GROUP)})
    return PluginNames(names, lambda name: _plugin_loader(name) is not None)


def load_dataset(name: str) -> SplitData:
    loader = _LOADERS.get(name) or _plugin_loader(name)
    if loader is None:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(dataset_names())}")
    data = loader()
    if not isinstance(data, SplitData):
        raise TypeError(
            f"data set {name!r} returned {type(data).__name__}, not qflare.sim.data.SplitData"
        )
    return data


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the samples out in near-equal shares."""
    if num_clients < 1 or num_samples < num_clients:
        raise ValueError(f"cannot split {num_samples} samples among {num_clients} clients")
    order = np.random.default_rng([seed, 1]).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-Dirichlet non-IID split with equal client sizes (Hsu et al., 2019).

    Each client draws its label distribution ``p ~ Dirichlet(alpha * 1)`` and receives
    ``len(labels) // num_clients`` samples, each drawn (without replacement) from a class
    chosen by ``p`` among the classes that still have samples left. Equal sizes, as in the
    paper, keep "how much data a client has" from masquerading as "how different its data
    is": with unequal sizes the largest clients' updates are outliers for no reason a
    detector should act on.
    """
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    n = int(labels.shape[0])
    if num_clients < 1 or n < num_clients:
        raise ValueError(f"cannot split {n} samples among {num_clients} clients")
    rng = np.random.default_rng([seed, 2])
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    per_client = n // num_clients
    parts: list[np.ndarray] = []
    for _ in range(num_clients):
        p = rng.dirichlet(np.full(len(classes), alpha))
        taken: list[int] = []
        for _ in range(per_client):
            left = np.array([len(pool) > 0 for pool in pools])
            weights = p * left
            total = weights.sum()
            # A client whose favourite classes ran out takes from what is left, uniformly.
            probs = weights / total if total > 0 else left / left.sum()
            k = int(rng.choice(len(classes), p=probs))
            taken.append(int(pools[k].pop()))
        parts.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return parts
