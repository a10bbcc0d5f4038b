"""Jobs as the running system loads them: the ``[[jobs]]`` tables of a configuration file.
The spec itself is wire vocabulary: :class:`qflare.messages.jobs.JobSpec`. A model of any
size is taken: versions larger than one message travel in parts (qflare.messages.models)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qflare.messages import MessageRejected, Reason
from qflare.messages.jobs import JobSpec


def job_of(specs: Mapping[str, JobSpec], job: str) -> JobSpec:
    """The spec of ``job`` among the jobs a service runs (``specs``, by job id); a message
    for any other job is refused with ``WRONG_JOB``."""
    spec = specs.get(job)
    if spec is None:
        raise MessageRejected(Reason.WRONG_JOB, f"no job {job!r} here")
    return spec


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
