"""The resource actor's durable state: SQLite in the host's state dir, one transaction per change.

Three tables: `accounts` (each instance's id, the transaction its holding comes from, and its
base: the CPUs and memory blocks its operator granted),
`holdings` (what each instance holds, one row per CPU, memory block or queue) and `transactions`
(every `TxRecord`, msgpack, with its state). Each change of the ledger is one SQLite transaction,
so after a crash the file holds either all of a change or none of it:

- `begin` writes a transaction as pending before anything is asked of the instance;
- `commit` marks it committed and replaces the instance's holding rows by the difference;
- `roll_back` marks it rolled back (holdings unchanged);
- `release` drops the instance and records why.

A restarted actor `load`s the committed holdings and the transactions still pending: those never
finished, and are rolled back before anything new is granted, so nothing is lost or granted twice.

WAL journal with `synchronous=NORMAL`: a commit survives the actor's crash (what restarts are
for); a power cut may lose the last commits, and with them the instances, which do not survive a
power cut either. The history keeps the newest `HISTORY_LIMIT` transactions. SQLite calls are
blocking, so they run in a worker thread, one at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import msgspec

from multikernel.protocol import TxRecord
from multikernel.services._placement import Holding

T = TypeVar("T")

#: How many transactions the history keeps (older ones are deleted as new ones commit).
HISTORY_LIMIT: Final = 10_000
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY, id INTEGER NOT NULL, tx INTEGER NOT NULL, applied_by TEXT NOT NULL,
    base_cpus INTEGER NOT NULL DEFAULT 0, base_blocks INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS holdings (
    instance TEXT NOT NULL, kind TEXT NOT NULL, item TEXT NOT NULL,
    PRIMARY KEY (kind, item, instance));
CREATE TABLE IF NOT EXISTS transactions (
    tx INTEGER PRIMARY KEY, instance TEXT NOT NULL, state TEXT NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS transactions_by_instance ON transactions (instance, tx);
"""
#: Columns added since the first schema, for files written before them (0: the holding's size).
ADDED_COLUMNS: Final = {
    "accounts": ("base_cpus INTEGER NOT NULL DEFAULT 0", "base_blocks INTEGER NOT NULL DEFAULT 0")
}
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(TxRecord)


@dataclass(frozen=True)
class Stored:
    """One account as stored: the instance's id, holding, transaction, who applied it, and its
    base (CPUs, memory blocks)."""

    name: str
    id: int
    held: Holding
    tx: int
    applied_by: str
    base: tuple[int, int] = (0, 0)


def _rows(name: str, holding: Holding) -> list[tuple[str, str, str]]:
    return (
        [(name, "cpu", str(c)) for c in holding.cpus]
        + [(name, "block", str(b)) for b in holding.blocks]
        + [(name, "queue", q) for q in holding.queues]
    )


class ResourceStore:
    """The SQLite file of one host's resource actor (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        _add_columns(self._db)
        self._limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        self._db.close()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def atomically() -> T:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

        return await anyio.to_thread.run_sync(atomically, limiter=self._limiter)

    # -- reading --------------------------------------------------------------------------

    async def load(self) -> tuple[list[Stored], list[TxRecord], int]:
        """Every account, the transactions still pending, and the next transaction id."""

        def read(db: sqlite3.Connection) -> tuple[list[Stored], list[TxRecord], int]:
            items: dict[str, dict[str, set[str]]] = {}
            for name, kind, item in db.execute("SELECT instance, kind, item FROM holdings"):
                items.setdefault(name, {}).setdefault(kind, set()).add(item)
            accounts = []
            for name, id, tx, applied_by, base_cpus, base_blocks in db.execute(
                "SELECT name, id, tx, applied_by, base_cpus, base_blocks FROM accounts "
                "ORDER BY name"
            ):
                kinds = items.get(name, {})
                held = Holding(
                    frozenset(int(c) for c in kinds.get("cpu", ())),
                    frozenset(int(b) for b in kinds.get("block", ())),
                    frozenset(kinds.get("queue", ())),
                )
                base = (base_cpus or len(held.cpus), base_blocks or len(held.blocks))
                accounts.append(Stored(name, id, held, tx, applied_by, base))
            pending = [
                _DECODER.decode(record)
                for (record,) in db.execute(
                    "SELECT record FROM transactions WHERE state = 'pending' ORDER BY tx"
                )
            ]
            (last,) = db.execute("SELECT COALESCE(MAX(tx), 0) FROM transactions").fetchone()
            return accounts, pending, int(last) + 1

        return await self._run(read)

    async def history(self, instance: str, limit: int, before: int) -> list[TxRecord]:
        """Up to `limit` transactions, newest first, older than `before` (0: the newest)."""

        def read(db: sqlite3.Connection) -> list[TxRecord]:
            query = "SELECT record FROM transactions WHERE tx < ?"
            args: list[object] = [before or 2**62]
            if instance:
                query += " AND instance = ?"
                args.append(instance)
            query += " ORDER BY tx DESC LIMIT ?"
            args.append(limit)
            return [_DECODER.decode(record) for (record,) in db.execute(query, args)]

        return await self._run(read)

    # -- changes --------------------------------------------------------------------------

    async def begin(self, record: TxRecord) -> None:
        """Write a transaction as pending (before the instance is asked anything)."""
        await self._run(lambda db: _put(db, record))

    async def roll_back(self, record: TxRecord) -> None:
        await self._run(lambda db: _put(db, record))

    async def commit(
        self,
        record: TxRecord,
        id: int,
        before: Holding,
        after: Holding,
        base: tuple[int, int] = (0, 0),
    ) -> None:
        """Mark `record` committed and make its instance hold `after` instead of `before`
        (`base`: the CPUs and memory blocks its operator granted; 0: the holding's)."""
        name = record.instance

        def write(db: sqlite3.Connection) -> None:
            _put(db, record)
            keep = set(_rows(name, after))
            db.executemany(
                "DELETE FROM holdings WHERE instance = ? AND kind = ? AND item = ?",
                [row for row in _rows(name, before) if row not in keep],
            )
            db.executemany(
                "INSERT OR IGNORE INTO holdings (instance, kind, item) VALUES (?, ?, ?)",
                _rows(name, after),
            )
            db.execute(
                "INSERT OR REPLACE INTO accounts (name, id, tx, applied_by, base_cpus, "
                "base_blocks) VALUES (?, ?, ?, ?, ?, ?)",
                (name, id, record.tx, "" if record.after is None else record.after.applied_by,
                 *base),
            )  # fmt: skip
            if record.tx % 100 == 0:
                db.execute("DELETE FROM transactions WHERE tx <= ?", (record.tx - HISTORY_LIMIT,))

        await self._run(write)

    async def release(self, record: TxRecord) -> None:
        """Drop the instance's account and holdings; `record` says why."""

        def write(db: sqlite3.Connection) -> None:
            _put(db, record)
            db.execute("DELETE FROM holdings WHERE instance = ?", (record.instance,))
            db.execute("DELETE FROM accounts WHERE name = ?", (record.instance,))

        await self._run(write)


def _add_columns(db: sqlite3.Connection) -> None:
    """Bring a file written by an older actor up to the schema (new columns get defaults)."""
    for table, columns in ADDED_COLUMNS.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _put(db: sqlite3.Connection, record: TxRecord) -> None:
    db.execute(
        "INSERT OR REPLACE INTO transactions (tx, instance, state, record) VALUES (?, ?, ?, ?)",
        (record.tx, record.instance, record.state, _ENCODER.encode(record)),
    )
