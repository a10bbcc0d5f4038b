"""Data sets and client partitions of the simulator."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qflare.sim.data import (
    ArrayDataset,
    DatasetUnavailable,
    dirichlet_partition,
    from_torch_dataset,
    iid_partition,
    load_digits,
    load_fashion_mnist,
    read_idx,
)


def test_digits_is_standardised_with_a_fixed_split() -> None:
    a, b = load_digits(), load_digits()
    assert a.train.x.shape[1:] == (64,) and len(a.train) + len(a.test) == 1797
    assert a.train.num_classes == 10
    np.testing.assert_array_equal(a.test.y, b.test.y)
    np.testing.assert_allclose(a.train.x.mean(axis=0), 0.0, atol=1e-4)
    # Constant pixels (std 0) stay 0 rather than becoming NaN.
    assert np.isfinite(a.train.x).all() and np.isfinite(a.test.x).all()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_reader_on_small_idx_files(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    train_x = rng.integers(0, 256, size=(30, 28, 28))
    test_x = rng.integers(0, 256, size=(7, 28, 28))
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_x, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(30) % 10, compress)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_x, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(7) % 10, compress)
    data = load_fashion_mnist(tmp_path, train_limit=20)
    assert data.train.x.shape == (20, 1, 28, 28) and data.test.x.shape == (7, 1, 28, 28)
    assert data.train.y.tolist() == [i % 10 for i in range(20)]
    # Same pixels, same order: the standardisation is one affine map.
    flat = data.test.x.reshape(7, -1)
    assert np.corrcoef(flat.ravel(), test_x.reshape(7, -1).ravel())[0, 1] > 0.999


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="header says 5 bytes"):
        read_idx(short)


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_a_torch_dataset_plugs_in() -> None:
    x = torch.randn(12, 3, 4, 4)
    y = torch.arange(12) % 3
    data = from_torch_dataset(torch.utils.data.TensorDataset(x, y), num_classes=3)
    assert data.x.shape == (12, 3, 4, 4) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, (np.arange(12) % 3))
    with pytest.raises(ValueError, match="labels must lie"):
        ArrayDataset(np.zeros((2, 1), np.float32), np.array([0, 5]), 3)


def test_dirichlet_split_is_seeded_disjoint_equal_and_skewed() -> None:
    labels = load_digits().train.y
    a = dirichlet_partition(labels, 20, 0.5, seed=1)
    assert [p.tolist() for p in a] == [
        p.tolist() for p in dirichlet_partition(labels, 20, 0.5, seed=1)
    ]
    assert [p.tolist() for p in a] != [
        p.tolist() for p in dirichlet_partition(labels, 20, 0.5, seed=2)
    ]
    joined = np.concatenate(a)
    assert len(np.unique(joined)) == len(joined)
    assert {len(p) for p in a} == {len(labels) // 20}

    def mean_top_class_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    skewed = mean_top_class_share(dirichlet_partition(labels, 20, 0.1, seed=1))
    near_iid = mean_top_class_share(dirichlet_partition(labels, 20, 100.0, seed=1))
    assert skewed > 0.5 > 0.25 > near_iid


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_refuses_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(np.zeros(40, np.int64), 4, alpha, seed=0)


def test_iid_split_covers_everything_once() -> None:
    parts = iid_partition(103, 10, seed=3)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(103))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
