"""A job whose model cannot travel in one message is refused when it is submitted, with a
typed error, before any service stores it; the services keep running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qflare.bus import connect_bus
from qflare.crypto import Federation, provision
from qflare.errors import QflareError
from qflare.messages import DEFAULT_LIMITS
from qflare.runtime import JobSpec, load_settings, run_in_process
from qflare.runtime.jobs import ModelTooLarge, check_model_size, max_model_bytes


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return provision(tmp_path_factory.mktemp("pki"), clients=2)


def _model(nbytes: int, tensors: int = 1) -> dict[str, np.ndarray]:
    """``tensors`` float32 arrays of ``nbytes`` in all (np.empty: no memory is touched)."""
    n = nbytes // 4
    sizes = [n // tensors] * tensors
    sizes[-1] += n - sum(sizes)
    return {f"t{i}": np.empty(s, np.float32) for i, s in enumerate(sizes)}


def test_the_limit_is_the_envelope_limit_less_headers() -> None:
    limit = max_model_bytes(1)
    assert (
        DEFAULT_LIMITS.max_envelope_bytes - 128 * 1024 < limit < DEFAULT_LIMITS.max_envelope_bytes
    )
    assert max_model_bytes(10) < limit  # each tensor's name and shape take room too
    assert check_model_size("j", _model(limit // 4 * 4)) == limit // 4 * 4


@pytest.mark.parametrize("tensors", [1, 7])
def test_one_element_over_the_limit_is_refused_with_a_reason(tensors: int) -> None:
    limit = max_model_bytes(tensors)
    check_model_size("j", _model(limit // 4 * 4, tensors))
    with pytest.raises(ModelTooLarge) as err:
        check_model_size("j", _model(limit // 4 * 4 + 4, tensors))
    assert err.value.reason == "TOO_LARGE" and err.value.job_id == "j"
    assert isinstance(err.value, ValueError) and isinstance(err.value, QflareError)
    assert "MiB" in str(err.value) and "chunks" in str(err.value)


def _spec(job_id: str) -> JobSpec:
    return JobSpec.model_validate(
        dict(
            job_id=job_id,
            rounds=1,
            participants=["client-000", "client-001"],
            rule="mean",
            f=0,
            detection=False,
            noise_multiplier=0.0,
            epsilon_budget=10.0,
            seed=1,
            min_updates=2,
        )
    )


async def test_services_refuse_the_job_before_storing_it_and_keep_running(
    fed: Federation, tmp_path: Path
) -> None:
    bus = await connect_bus(f"memory://size-{tmp_path.name}")
    settings = load_settings(None, env={}, data_dir=str(tmp_path / "data"))
    names = ["detector", "accountant", "aggregator"]
    ids = {n: (fed.identity(n), fed.trust()) for n in names}
    big = _model(max_model_bytes(1) + 4)
    async with run_in_process(settings, bus, services=names, identities=ids) as running:
        with pytest.raises(ModelTooLarge):
            await running.submit_job(_spec("big"), big)
        aggregator = running.services["aggregator"]
        with pytest.raises(ModelTooLarge):  # the aggregator checks on its own too
            await aggregator.submit_job(_spec("big2"), big)  # type: ignore[attr-defined]
        for name in names:
            assert "big" not in running.services[name].specs  # type: ignore[attr-defined]
        assert await aggregator.store.job_spec("big") is None  # type: ignore[attr-defined]
        assert await aggregator.store.job_spec("big2") is None  # type: ignore[attr-defined]
        # a job that fits is still taken, by the same running services
        await running.submit_job(_spec("small"), {"w": np.zeros(4, np.float32)})
        assert await aggregator.store.job_spec("small") is not None  # type: ignore[attr-defined]
    await bus.close()


def test_serve_exits_2_naming_the_job_when_its_model_file_is_too_large(
    fed: Federation, tmp_path: Path
) -> None:
    elements = (max_model_bytes(1) + 4) // 4 + 1
    save_file({"w": np.zeros(elements, np.float32)}, str(tmp_path / "big.safetensors"))
    (tmp_path / "q.toml").write_text(
        '[[jobs]]\njob_id = "huge"\nrounds = 1\nparticipants = ["client-000", "client-001"]\n'
        'noise_multiplier = 0.0\ninitial_model = "big.safetensors"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
    env["QFLARE_DATA_DIR"] = str(tmp_path / "state")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qflare",
            "serve",
            "aggregator",
            "--config",
            str(tmp_path / "q.toml"),
            "--pki-dir",
            str(fed.root),
            "--broker",
            "memory://",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    failed = [
        json.loads(x)
        for x in proc.stderr.splitlines()
        if x.startswith("{") and '"serve.failed"' in x
    ]
    assert failed and "TOO_LARGE" in failed[0]["error"] and "'huge'" in failed[0]["error"]
