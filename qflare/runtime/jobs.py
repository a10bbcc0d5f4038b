"""Jobs as the running system loads them: the ``[[jobs]]`` tables of a configuration file,
and the size check a job's model must pass before any service stores it. The spec itself is
wire vocabulary: :class:`qflare.messages.jobs.JobSpec`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qflare.errors import QflareError
from qflare.messages import DEFAULT_LIMITS, MessageRejected, Reason
from qflare.messages.jobs import JobSpec

#: What one envelope carries besides the tensors: header, certificate, signature, sealing
#: (a KEM ciphertext and an AEAD tag), with room to spare; plus per tensor its name and shape.
ENVELOPE_OVERHEAD = 64 * 1024
TENSOR_OVERHEAD = 1024


class ModelTooLarge(ValueError, QflareError):
    """A job's model does not fit in one message: the services would fail to broadcast it
    and no update for it would pass ingest. Refused at submission, before the job is
    stored."""

    reason = "TOO_LARGE"

    def __init__(self, job_id: str, nbytes: int, limit: int) -> None:
        self.job_id, self.nbytes, self.limit = job_id, nbytes, limit
        super().__init__(
            f"TOO_LARGE: job {job_id!r}: the model's tensors take {nbytes / 2**20:.1f} MiB, and one "
            f"message (the global model broadcast, each client update) carries at most "
            f"{limit / 2**20:.1f} MiB of tensors (the envelope limit under RabbitMQ's 128 MiB "
            f"message size); the services do not yet send models or updates in chunks"
        )


def job_of(specs: Mapping[str, JobSpec], job: str) -> JobSpec:
    """The spec of ``job`` among the jobs a service runs (``specs``, by job id); a message
    for any other job is refused with ``WRONG_JOB``."""
    spec = specs.get(job)
    if spec is None:
        raise MessageRejected(Reason.WRONG_JOB, f"no job {job!r} here")
    return spec


def max_model_bytes(
    num_tensors: int, envelope_limit: int = DEFAULT_LIMITS.max_envelope_bytes
) -> int:
    """The most tensor bytes a model of ``num_tensors`` tensors may have so that its
    broadcast and its updates each fit in one envelope."""
    return envelope_limit - ENVELOPE_OVERHEAD - TENSOR_OVERHEAD * num_tensors


def check_model_size(
    job_id: str, model: dict[str, Any], envelope_limit: int = DEFAULT_LIMITS.max_envelope_bytes
) -> int:
    """Raise :class:`ModelTooLarge` when ``model`` (name -> array) does not fit in one
    message; returns its tensor bytes."""
    nbytes = sum(int(np.asarray(v).nbytes) for v in model.values())
    limit = max_model_bytes(len(model), envelope_limit)
    if nbytes > limit:
        raise ModelTooLarge(job_id, nbytes, limit)
    return nbytes


def load_jobs(tables: list[dict[str, Any]], base_dir: Path | None = None) -> tuple[JobSpec, ...]:
    """Build specs from the ``[[jobs]]`` tables of a config file; relative model paths are
    taken relative to the file's folder."""
    if not isinstance(tables, list):
        raise TypeError(f"[[jobs]] must be an array of tables, got {type(tables).__name__}")
    jobs = []
    for table in tables:
        data = dict(table)
        if base_dir is not None and data.get("initial_model"):
            path = Path(data["initial_model"])
            data["initial_model"] = path if path.is_absolute() else base_dir / path
        jobs.append(JobSpec.model_validate(data))
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"job ids must be unique, got {ids}")
    return tuple(jobs)
