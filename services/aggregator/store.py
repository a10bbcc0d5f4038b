"""The aggregator's durable state: jobs, rounds, the updates each round holds, and model
versions (safetensors files indexed in SQLite).

An update's bytes stay in the job's update stream (the durable copy, docs/architecture.md
"The data plane"): its row records the client, the digest ingest accepted and the offset, and
commits before the ``update.accepted`` delivery is acknowledged, so a restarted aggregator
reads exactly those offsets again. A round records the offset from which its updates can sit
in the stream (``updates_from``), a model version the offset of its copy in the model stream.
Model files are written (fsynced, atomically renamed) before the row that names them
commits. Natural keys: (job, round) for rounds, (job, round, client) for updates (first
wins), (job, version) for models.

The round state machine's :class:`~qflare.services.aggregator.core.Round` is read from the
round's row with its updates and refusals (:meth:`AggregatorStore.load_round`) and written
back in one transaction, compare-and-set on the state it was read in
(:meth:`AggregatorStore.save_round`); a round becomes PUBLISHED only with its model
(:meth:`AggregatorStore.publish_model`).

A round's clip norm (``clip``) is stored when the round is created, and the clip its
aggregation gave the next round (``next_clip``, adaptive clipping) with its model, in the
same transaction: a restarted aggregator begins the next round, requests it and aggregates it
at the same clip, so its models stay bit for bit those of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qflare.messages.jobs import JobSpec
from qflare.runtime import ServiceStore
from qflare.runtime.modelfile import ModelFile
from qflare.services.aggregator.core import Held, Round, RoundState

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    participants TEXT NOT NULL DEFAULT '[]',
    base_version INTEGER NOT NULL,
    deadline REAL,
    extensions INTEGER NOT NULL DEFAULT 0,
    epsilon REAL,
    closed_set TEXT,
    verdict TEXT,
    updates_from INTEGER NOT NULL DEFAULT 0,
    population INTEGER,
    updated REAL NOT NULL,
    clip REAL,
    next_clip REAL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS updates (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    digest BLOB NOT NULL,
    stream_offset INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job_id, round, client)
);
CREATE TABLE IF NOT EXISTS refusals (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    reason TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job_id, round, client)
);
CREATE TABLE IF NOT EXISTS models (
    job_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    round INTEGER NOT NULL,
    digest BLOB NOT NULL,
    path TEXT NOT NULL,
    epsilon REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    stream_offset INTEGER,
    PRIMARY KEY (job_id, version)
)
"""


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    state: RoundState
    participants: tuple[str, ...]
    base_version: int
    deadline: float | None
    extensions: int
    epsilon: float | None
    closed_set: tuple[tuple[str, bytes, int], ...] | None
    verdict: dict[str, Any] | None
    updated: float = 0.0
    updates_from: int = 0
    population: int | None = None  # the clients its selection sampled from (q*N's N)
    clip: float | None = None  # the round's clip norm (None: the job's)
    next_clip: float | None = None  # what its aggregation gave the next round


@dataclass(frozen=True)
class ModelRow:
    job_id: str
    version: int
    round: int
    digest: bytes
    path: Path
    epsilon: float
    stream_offset: int | None = None


def _round(row: Any) -> RoundRow:
    closed = json.loads(row["closed_set"]) if row["closed_set"] else None
    return RoundRow(
        job_id=row["job_id"],
        round=row["round"],
        state=RoundState(row["state"]),
        participants=tuple(json.loads(row["participants"])),
        base_version=row["base_version"],
        deadline=row["deadline"],
        extensions=row["extensions"],
        epsilon=row["epsilon"],
        closed_set=None
        if closed is None
        else tuple((c, bytes.fromhex(d), o) for c, d, o in closed),
        verdict=json.loads(row["verdict"]) if row["verdict"] else None,
        updated=row["updated"],
        updates_from=row["updates_from"],
        population=row["population"],
        clip=row["clip"],
        next_clip=row["next_clip"],
    )


def _model(row: Any, root: Path) -> ModelRow:
    return ModelRow(
        row["job_id"],
        row["version"],
        row["round"],
        bytes(row["digest"]),
        root / row["path"],
        row["epsilon"],
        row["stream_offset"],
    )


class AggregatorStore(ServiceStore):
    FILE = "aggregator.sqlite"
    SCHEMA = SCHEMA

    # -- jobs ------------------------------------------------------------------------------
    async def add_job(
        self, spec: JobSpec, model: dict[str, np.ndarray] | ModelFile, digest: bytes
    ) -> bool:
        """Register a job with its version-0 model (tensors, or a model file copied a range
        at a time); False when it exists already."""
        if await self.db.fetchone("SELECT 1 FROM jobs WHERE job_id=?", (spec.job_id,)):
            return False
        rel = await self._write_model_file(spec.job_id, 0, model)
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO jobs (job_id, spec, created) VALUES (?, ?, ?)",
                (spec.job_id, spec.model_dump_json(), time.time()),
            )
            await conn.execute(
                "INSERT INTO models VALUES (?, 0, 0, ?, ?, 0, ?, NULL)",
                (spec.job_id, digest, rel, time.time()),
            )
        return True

    async def job_spec(self, job_id: str) -> JobSpec | None:
        row = await self.db.fetchone("SELECT spec FROM jobs WHERE job_id=?", (job_id,))
        return None if row is None else JobSpec.model_validate_json(row["spec"])

    async def jobs(self) -> list[tuple[JobSpec, bool, str | None]]:
        rows = await self.db.fetchall("SELECT spec, ended, end_reason FROM jobs ORDER BY created")
        return [
            (JobSpec.model_validate_json(r["spec"]), bool(r["ended"]), r["end_reason"])
            for r in rows
        ]

    async def job_ended(self, job_id: str) -> bool:
        row = await self.db.fetchone("SELECT ended FROM jobs WHERE job_id=?", (job_id,))
        return bool(row and row["ended"])

    async def end_job(self, job_id: str, reason: str) -> None:
        await self.db.execute(
            "UPDATE jobs SET ended=1, end_reason=? WHERE job_id=? AND ended=0", (reason, job_id)
        )

    # -- rounds ----------------------------------------------------------------------------
    async def latest_round(self, job_id: str) -> RoundRow | None:
        row = await self.db.fetchone(
            "SELECT * FROM rounds WHERE job_id=? ORDER BY round DESC LIMIT 1", (job_id,)
        )
        return None if row is None else _round(row)

    async def get_round(self, job_id: str, round_no: int) -> RoundRow | None:
        row = await self.db.fetchone(
            "SELECT * FROM rounds WHERE job_id=? AND round=?", (job_id, round_no)
        )
        return None if row is None else _round(row)

    async def open_rounds(self) -> list[RoundRow]:
        rows = await self.db.fetchall(
            "SELECT * FROM rounds WHERE state=?", (RoundState.OPEN.value,)
        )
        return [_round(r) for r in rows]

    async def request_round(
        self, job_id: str, round_no: int, base_version: int, clip: float | None = None
    ) -> bool:
        """Create round ``round_no`` in REQUESTED at clip norm ``clip`` (None: the job's);
        False when it exists already (with the clip it was created with)."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT OR IGNORE INTO rounds (job_id, round, state, base_version, updated, clip) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, round_no, RoundState.REQUESTED.value, base_version, time.time(), clip),
            )
            return cur.rowcount == 1

    async def next_clip(self, job_id: str, round_no: int) -> float | None:
        """The clip norm round ``round_no``'s aggregation gave the round after it (None: the
        round is not published, or was published without one)."""
        row = await self.db.fetchone(
            "SELECT next_clip FROM rounds WHERE job_id=? AND round=? AND state=?",
            (job_id, round_no, RoundState.PUBLISHED.value),
        )
        return None if row is None else row["next_clip"]

    async def transition(
        self, job_id: str, round_no: int, old: RoundState, new: RoundState, **fields: Any
    ) -> bool:
        """Compare-and-set the round's state (and fields); False when it was not ``old``,
        i.e. this is a redelivery of a message already handled."""
        sets = ["state=?", "updated=?"]
        values: list[Any] = [new.value, time.time()]
        for key, value in fields.items():
            if key in ("participants",):
                value = json.dumps(list(value))
            elif key == "closed_set":
                value = json.dumps([[c, d.hex(), o] for c, d, o in value])
            elif key == "verdict":
                value = json.dumps(value)
            elif key not in ("deadline", "extensions", "epsilon", "updates_from"):
                raise ValueError(f"unknown round field {key!r}")
            sets.append(f"{key}=?")
            values.append(value)
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                f"UPDATE rounds SET {', '.join(sets)} WHERE job_id=? AND round=? AND state=?",
                (*values, job_id, round_no, old.value),
            )
            return cur.rowcount == 1

    async def load_round(self, job_id: str, round_no: int) -> Round | None:
        """The round as the state machine sees it: its row, the updates it holds and the
        refusals it recorded (each by client)."""
        row = await self.db.fetchone(
            "SELECT * FROM rounds WHERE job_id=? AND round=?", (job_id, round_no)
        )
        if row is None:
            return None
        updates = await self.db.fetchall(
            "SELECT client, digest, stream_offset, num_samples FROM updates "
            "WHERE job_id=? AND round=? ORDER BY client",
            (job_id, round_no),
        )
        refusals = await self.db.fetchall(
            "SELECT client, reason FROM refusals WHERE job_id=? AND round=? ORDER BY client",
            (job_id, round_no),
        )
        r = _round(row)
        verdict = r.verdict or {}
        return Round(
            job=r.job_id,
            round=r.round,
            state=r.state,
            base_version=r.base_version,
            participants=r.participants,
            deadline=r.deadline,
            extensions=r.extensions,
            epsilon=r.epsilon,
            updates_from=r.updates_from,
            held=tuple(
                Held(u["client"], bytes(u["digest"]), u["stream_offset"], u["num_samples"])
                for u in updates
            ),
            refused=tuple((x["client"], x["reason"]) for x in refusals),
            closed=r.closed_set,
            kept=tuple(verdict.get("kept", ())),
            removed=tuple(verdict.get("flagged", ())),
            updated=r.updated,
            population=r.population,
            clip=r.clip,
        )

    async def save_round(self, old: Round, new: Round) -> bool:
        """Write the state machine's step from ``old`` to ``new`` in one transaction: the
        round's row (compare-and-set on ``old``'s state and extension count), the updates
        and refusals it gained. False, with nothing written, when the stored round is not
        ``old`` any more (another writer moved it) or holds another update of a client."""
        if (new.job, new.round) != (old.job, old.round):
            raise ValueError(f"round {old.job}/{old.round} cannot become {new.job}/{new.round}")
        if new.state == RoundState.PUBLISHED:
            raise ValueError("a round is published with its model: use publish_model")
        known = {h.client for h in old.held}
        refused = {c for c, _reason in old.refused}
        closed = (
            None if new.closed is None else json.dumps([[c, d.hex(), o] for c, d, o in new.closed])
        )
        try:
            async with self.db.transaction() as conn:
                cur = await conn.execute(
                    "UPDATE rounds SET state=?, participants=?, deadline=?, extensions=?, "
                    "epsilon=?, closed_set=?, updates_from=?, population=?, updated=? "
                    "WHERE job_id=? AND round=? AND state=? AND extensions=?",
                    (
                        new.state.value,
                        json.dumps(list(new.participants)),
                        new.deadline,
                        new.extensions,
                        new.epsilon,
                        closed,
                        new.updates_from,
                        new.population,
                        new.updated,
                        old.job,
                        old.round,
                        old.state.value,
                        old.extensions,
                    ),
                )
                if cur.rowcount != 1:
                    raise _Moved
                for h in new.held:
                    if h.client in known:
                        continue
                    cur = await conn.execute(
                        "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            new.job,
                            new.round,
                            h.client,
                            h.digest,
                            h.offset,
                            h.num_samples,
                            time.time(),
                        ),
                    )
                    if cur.rowcount != 1:
                        raise _Moved
                for client, reason in new.refused:
                    if client not in refused:
                        await conn.execute(
                            "INSERT OR IGNORE INTO refusals VALUES (?, ?, ?, ?, ?)",
                            (new.job, new.round, client, reason, time.time()),
                        )
        except _Moved:
            return False
        return True

    async def extend(self, job_id: str, round_no: int, deadline: float, extensions: int) -> None:
        await self.db.execute(
            "UPDATE rounds SET deadline=?, extensions=?, updated=? WHERE job_id=? AND round=? AND state=?",
            (deadline, extensions, time.time(), job_id, round_no, RoundState.OPEN.value),
        )

    # -- updates ---------------------------------------------------------------------------
    async def held(self, job_id: str, round_no: int, client: str) -> tuple[bytes, int] | None:
        """(digest, stream offset) of the update the round holds for ``client``."""
        row = await self.db.fetchone(
            "SELECT digest, stream_offset FROM updates WHERE job_id=? AND round=? AND client=?",
            (job_id, round_no, client),
        )
        return None if row is None else (bytes(row["digest"]), row["stream_offset"])

    async def add_update(
        self, job_id: str, round_no: int, client: str, digest: bytes, offset: int, num_samples: int
    ) -> tuple[bytes, int] | None:
        """Record that the round holds ``client``'s update (its bytes stay in the stream at
        ``offset``). Returns None when recorded now, else the (digest, offset) already held
        for (job, round, client): first wins."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, round_no, client, digest, offset, num_samples, time.time()),
            )
            won = cur.rowcount == 1
        return None if won else await self.held(job_id, round_no, client)

    async def round_updates(self, job_id: str, round_no: int) -> list[tuple[str, bytes, int]]:
        """(client, digest, stream offset) of every update the round holds, by client."""
        rows = await self.db.fetchall(
            "SELECT client, digest, stream_offset FROM updates WHERE job_id=? AND round=? "
            "ORDER BY client",
            (job_id, round_no),
        )
        return [(r["client"], bytes(r["digest"]), r["stream_offset"]) for r in rows]

    async def add_refusal(self, job_id: str, round_no: int, client: str, reason: str) -> None:
        """Ingest refused ``client``'s update for the round (the first refusal is kept)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO refusals VALUES (?, ?, ?, ?, ?)",
                (job_id, round_no, client, reason, time.time()),
            )

    async def refused(self, job_id: str, round_no: int) -> set[str]:
        """Clients of the round whose update ingest refused (they may still have a valid one
        in ``updates``: a refusal does not ban)."""
        rows = await self.db.fetchall(
            "SELECT client FROM refusals WHERE job_id=? AND round=?", (job_id, round_no)
        )
        return {r["client"] for r in rows}

    async def feed_start(self, job_id: str) -> int:
        """Where a restarted aggregator reads the job's update stream from: the earliest
        ``updates_from`` of a round not yet published, else of the latest round, else 0."""
        row = await self.db.fetchone(
            "SELECT MIN(updates_from) AS o FROM rounds WHERE job_id=? AND state IN (?, ?)",
            (job_id, RoundState.OPEN.value, RoundState.CLOSED.value),
        )
        if row is not None and row["o"] is not None:
            return int(row["o"])
        row = await self.db.fetchone(
            "SELECT updates_from AS o FROM rounds WHERE job_id=? ORDER BY round DESC LIMIT 1",
            (job_id,),
        )
        return int(row["o"]) if row is not None else 0

    # -- models ----------------------------------------------------------------------------
    def model_path(self, job_id: str, version: int) -> Path:
        """Where version ``version`` of ``job_id`` is stored (a model written straight into
        it, :class:`ModelFile.create <qflare.runtime.modelfile.ModelFile>`, is committed
        there by :meth:`publish_model`)."""
        return self.root / self._model_rel(job_id, version)

    @staticmethod
    def _model_rel(job_id: str, version: int) -> str:
        return f"models/{job_id}/v{version:05d}.safetensors"

    async def _write_model_file(
        self, job_id: str, version: int, model: dict[str, np.ndarray] | ModelFile
    ) -> str:
        """Store ``model`` as the file of ``version``: tensors written one at a time, a
        file being written committed in place, another model file copied a block at a
        time (never the whole model in memory twice)."""
        rel = self._model_rel(job_id, version)
        path = self.root / rel

        def write() -> None:
            if isinstance(model, ModelFile):
                if model.writing:
                    if model.target != path:
                        raise ValueError(f"{model.target} is not the file of version {version}")
                    model.commit()
                else:
                    model.copy_to(path).close()
            else:
                ModelFile.write(path, model).close()

        await asyncio.to_thread(write)
        return rel

    async def publish_model(
        self,
        job_id: str,
        round_no: int,
        version: int,
        model: dict[str, np.ndarray] | ModelFile,
        digest: bytes,
        epsilon: float,
        verdict: dict[str, Any],
        next_clip: float | None = None,
    ) -> bool:
        """Store version ``version`` and mark the round PUBLISHED with the clip norm its
        aggregation gave the next round, atomically; False when the round was not CLOSED
        (already published: a redelivered verdict)."""
        rel = await self._write_model_file(job_id, version, model)
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE rounds SET state=?, verdict=?, next_clip=?, updated=? "
                "WHERE job_id=? AND round=? AND state=?",
                (
                    RoundState.PUBLISHED.value,
                    json.dumps(verdict),
                    next_clip,
                    time.time(),
                    job_id,
                    round_no,
                    RoundState.CLOSED.value,
                ),
            )
            if cur.rowcount != 1:
                return False
            await conn.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (job_id, version, round_no, digest, rel, epsilon, time.time()),
            )
        return True

    async def set_model_offset(self, job_id: str, version: int, offset: int) -> None:
        """Where version ``version`` sits in the job's model stream."""
        await self.db.execute(
            "UPDATE models SET stream_offset=? WHERE job_id=? AND version=?",
            (offset, job_id, version),
        )

    async def latest_model(self, job_id: str) -> ModelRow | None:
        row = await self.db.fetchone(
            "SELECT * FROM models WHERE job_id=? ORDER BY version DESC LIMIT 1", (job_id,)
        )
        return None if row is None else _model(row, self.root)

    async def model(self, job_id: str, version: int) -> ModelRow | None:
        row = await self.db.fetchone(
            "SELECT * FROM models WHERE job_id=? AND version=?", (job_id, version)
        )
        return None if row is None else _model(row, self.root)

    async def load_model(self, row: ModelRow) -> dict[str, np.ndarray]:
        """The whole model in memory (for models that fit; :meth:`open_model` otherwise)."""
        return await asyncio.to_thread(_load_file, row.path)

    async def open_model(self, row: ModelRow) -> ModelFile:
        """The stored model as a file read a range at a time (the caller closes it)."""
        return await asyncio.to_thread(ModelFile.open, row.path)


class _Moved(Exception):
    """The stored round is not the one a step started from (rolls the transaction back)."""


def _load_file(path: Path) -> dict[str, np.ndarray]:
    # Our own files, written by this service (raw tensors: nothing in them is executed).
    with ModelFile.open(path) as f:
        return dict(f.tensors())
