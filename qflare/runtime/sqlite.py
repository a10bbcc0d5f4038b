"""The SQLite helper every service store uses (aiosqlite).

WAL mode lets readers (``qflare status``, the TUI) read while the service writes;
``synchronous=FULL`` makes a committed transaction survive power loss in WAL mode, which is
what "durable before ack" needs. A file written by an older QFLARE gets the columns the
schema added since (``ALTER TABLE ... ADD COLUMN``, with their defaults), keeping its rows. Transactions are explicit (``BEGIN IMMEDIATE`` takes the
write lock up front, so two writers fail fast with ``busy_timeout`` instead of deadlocking
on lock upgrade).

Each transaction, autocommit write and read is timed as ``qflare_store_seconds{service,
op}`` (:mod:`qflare.runtime.metrics`); ``service`` is the name given to :meth:`Database.open`,
by default the file's stem (``aggregator.sqlite`` -> ``aggregator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, ClassVar, Self

import aiosqlite

from qflare.runtime import metrics

#: Errors worth retrying: a locked database or a full/failing disk may clear.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)


class Database:
    """One aiosqlite connection with a schema, WAL, and explicit transactions.

    Handlers run concurrently (prefetch > 1) on one connection, and SQLite has one
    transaction per connection: writes are serialised by a lock, so one handler's statement
    never lands inside another's transaction. Reads do not take it.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path, name: str = "") -> None:
        self.conn = conn
        self.path = path
        self.name = name or path.stem
        self._write = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], schema: str = "", *, name: str = ""
    ) -> Database:
        """Open (create) the database at ``path`` and run ``schema``; ``name`` labels its
        metrics (default: the file's stem)."""
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        db = cls(conn, path, name)
        if schema:
            async with db.transaction():
                for statement in _split(schema):
                    await conn.execute(statement)
                for statement in await _missing_columns(conn, schema, path):
                    await conn.execute(statement)
        return db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        async with self._write:
            with metrics.store_timer(self.name, "transaction"):
                await self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    await self.conn.execute("ROLLBACK")
                    raise
                await self.conn.execute("COMMIT")

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        with metrics.store_timer(self.name, "read"):
            async with self.conn.execute(sql, tuple(params)) as cur:
                return await cur.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        with metrics.store_timer(self.name, "read"):
            async with self.conn.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        """One statement in its own (autocommit) transaction."""
        async with self._write:
            with metrics.store_timer(self.name, "write"):
                await self.conn.execute(sql, tuple(params))

    async def close(self) -> None:
        await self.conn.close()


class ServiceStore:
    """A service's store: one :class:`Database`, the file ``FILE`` created with ``SCHEMA``,
    in the service's data folder ``root`` (where a store may keep other files too)."""

    FILE: ClassVar[str]
    SCHEMA: ClassVar[str]

    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root

    @classmethod
    async def open(cls, root: Path) -> Self:
        return cls(await Database.open(root / cls.FILE, cls.SCHEMA), root)

    async def close(self) -> None:
        await self.db.close()


async def _missing_columns(conn: aiosqlite.Connection, schema: str, path: Path) -> list[str]:
    """The ``ALTER TABLE ... ADD COLUMN`` statements that bring a file written by an older
    QFLARE up to ``schema`` (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it
    was). The schema is laid out in a scratch in-memory database and each table's columns
    compared; a missing column is added with its declared type and default, so the rows a
    service already stored stay. A missing column that is NOT NULL without a default cannot
    be added to existing rows: that raises :class:`sqlite3.DatabaseError` naming it."""
    scratch = sqlite3.connect(":memory:")
    try:
        for statement in _split(schema):
            scratch.execute(statement)
        tables = [
            r[0] for r in scratch.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        wanted = {t: scratch.execute(f"PRAGMA table_info({t})").fetchall() for t in tables}
    finally:
        scratch.close()
    statements = []
    for table, columns in wanted.items():
        async with conn.execute(f"PRAGMA table_info({table})") as cur:
            have = {row[1] for row in await cur.fetchall()}
        for _cid, column, kind, notnull, default, _pk in columns:
            if column in have:
                continue
            if notnull and default is None:
                raise sqlite3.DatabaseError(
                    f"{path}: table {table} lacks column {column} ({kind} NOT NULL, no default), "
                    "which this version cannot add to the rows already stored"
                )
            statements.append(
                f"ALTER TABLE {table} ADD COLUMN {column} {kind}"
                + (" NOT NULL" if notnull else "")
                + ("" if default is None else f" DEFAULT {default}")
            )
    return statements


def _split(schema: str) -> list[str]:
    # executescript would COMMIT our explicit transaction; run statements one by one.
    return [s.strip() for s in schema.split(";") if s.strip()]


def open_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A synchronous read-only connection for CLI commands that read a service's state
    while it runs (WAL lets them)."""
    uri = f"file:{Path(path).resolve()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    return conn


def fsync_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
