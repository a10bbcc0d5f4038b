"""qflare.runtime.modelfile: a model's safetensors file read and written by flat ranges."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from qflare.messages.tensors import Layout, model_digest
from qflare.runtime.modelfile import ModelFile, ModelFileError


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "z.bias": rng.standard_normal(7).astype(np.float32),
        "a.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "m.table": rng.standard_normal((2, 2, 3)).astype(np.float64),
        "n.count": np.arange(4, dtype=np.int64),
    }


@pytest.mark.parametrize("bounds", [(0, 0), (0, 5), (3, 17), (14, 36), (0, 38), (37, 38)])
def test_reads_any_range_of_the_flat_model(tmp_path: Path, bounds: tuple[int, int]) -> None:
    model = _model(np.random.default_rng(0))
    layout = Layout.of(model)
    flat = layout.flatten(model, dtype=np.float64)
    with ModelFile.write(tmp_path / "m.safetensors", model) as f:
        a, b = bounds
        np.testing.assert_array_equal(f.read(a, b), flat[a:b])
        assert f.layout == layout and f.size == layout.size == 38


def test_a_written_file_is_safetensors_and_a_safetensors_file_opens(tmp_path: Path) -> None:
    model = _model(np.random.default_rng(1))
    path = tmp_path / "m.safetensors"
    ModelFile.write(path, model).close()
    loaded = st_load(path.read_bytes())
    assert sorted(loaded) == sorted(model)
    for name in model:
        np.testing.assert_array_equal(loaded[name], model[name])
    # a file safetensors wrote itself (its own order of tensors) reads the same
    other = tmp_path / "st.safetensors"
    other.write_bytes(st_save(model))
    with ModelFile.open(other) as f:
        for name in model:
            np.testing.assert_array_equal(f.tensor(name), model[name])
        assert f.digest() == model_digest(model)


def test_values_written_by_range_make_the_model_and_its_digest(tmp_path: Path) -> None:
    model = _model(np.random.default_rng(2))
    layout = Layout.of(model)
    flat = layout.flatten(model, dtype=np.float64)
    path = tmp_path / "v1.safetensors"
    f = ModelFile.create(path, layout)
    assert not path.exists()  # under a temporary name until committed
    for a in range(0, layout.size, 6):  # blocks that cut tensors
        f.write_values(a, flat[a : a + 6])
    f.commit()
    f.close()
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["v1.safetensors"]
    with ModelFile.open(path) as g:
        got = g.tensors()
        assert g.digest() == model_digest(model)
    for name in model:
        assert got[name].dtype == model[name].dtype
        np.testing.assert_array_equal(got[name], model[name])


def test_a_discarded_or_abandoned_file_leaves_nothing(tmp_path: Path) -> None:
    layout = Layout.of(_model(np.random.default_rng(3)))
    ModelFile.create(tmp_path / "a.safetensors", layout).discard()
    with ModelFile.create(tmp_path / "b.safetensors", layout) as f:
        f.write_values(0, np.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_reads_outside_the_model_are_refused(tmp_path: Path) -> None:
    with ModelFile.write(tmp_path / "m.safetensors", _model(np.random.default_rng(4))) as f:
        for a, b in [(-1, 2), (3, 39), (5, 4)]:
            with pytest.raises(IndexError):
                f.read(a, b)
        with pytest.raises(IndexError):
            f.write_values(36, np.zeros(3))


def _raw(header: dict[str, object], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"abc", "shorter than 8 bytes"),
        (struct.pack("<Q", 2**40), "header of"),
        (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "bytes"),
        (_raw({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad"),
        (_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "fit"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    ],
)
def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=why):
        ModelFile.open(path)


def test_a_copy_is_the_same_model_in_layout_order(tmp_path: Path) -> None:
    model = _model(np.random.default_rng(5))
    src = tmp_path / "st.safetensors"
    src.write_bytes(st_save(model))  # safetensors' own order of tensors
    with ModelFile.open(src) as f, f.copy_to(tmp_path / "copy" / "v0.safetensors") as g:
        assert not g.writing and g.target == tmp_path / "copy" / "v0.safetensors"
        assert g.digest() == f.digest() == model_digest(model)
        np.testing.assert_array_equal(g.read(0, g.size), f.read(0, f.size))
    w = ModelFile.create(tmp_path / "w.safetensors", Layout.of(model))
    assert w.writing and w.target == tmp_path / "w.safetensors" and w.path != w.target
    w.discard()


@pytest.mark.parametrize("part_bytes", [7, 64, 1000])
async def test_a_model_file_is_published_in_the_parts_its_tensors_make(
    tmp_path: Path, part_bytes: int
) -> None:
    """The aggregator publishes a large model from its file (never loaded whole): the same
    parts, bit for bit, as from the tensors, read back into the same model."""
    from qflare.crypto.testing import make_federation
    from qflare.messages import open_envelope
    from qflare.messages.models import ModelReader, model_envelopes, opener

    fed = make_federation(clients=1)
    model = _model(np.random.default_rng(6))
    model["n.count"] = model["n.count"].astype(np.float32)  # a model's tensors are floats
    digest = model_digest(model)
    kw = dict(job="j", round=1, version=1, digest=digest, epsilon=0.5, threshold=16)
    with ModelFile.write(tmp_path / "m.safetensors", model) as f:
        assert f.read_bytes(0, f.nbytes) == b"".join(
            np.ascontiguousarray(model[n]).astype(model[n].dtype.newbyteorder("<")).tobytes()
            for n in sorted(model)
        )
        from_file = [
            d async for d in model_envelopes(fed["aggregator"], f, part_bytes=part_bytes, **kw)
        ]
    from_tensors = [
        d async for d in model_envelopes(fed["aggregator"], model, part_bytes=part_bytes, **kw)
    ]
    trust = fed.trust()
    assert len(from_file) == len(from_tensors) >= 2
    # the parts carry the same bytes (the transfer ids differ: random per transfer)

    def parts(data: list[bytes]) -> list[tuple[int, bytes]]:
        bodies = [open_envelope(d, trust).body for d in data[1:]]
        return [(b.index, np.asarray(b.data).tobytes()) for b in bodies]

    assert parts(from_file) == parts(from_tensors)
    reader = ModelReader(opener(trust))
    got = [m for d in from_file if (m := await reader.take(d)) is not None]
    assert len(got) == 1 and got[0].parted and model_digest(got[0].tensors) == digest
    for name in model:
        np.testing.assert_array_equal(got[0].tensors[name], model[name])
