"""The fault actor's durable state, in `<state-dir>/fault.db`.

- `history`: every event the actor published (bounded: the newest `HISTORY_LIMIT` are kept);
- `restarts`: when each restart was made, by restart key (the instance, or its group), which is
  what `intensity` in `period` counts;
- `intents`: a restart decided and not yet done (the instance, the launch generation it replaces,
  when it is due); written before the actor waits its back-off, removed once the lifecycle
  answered. A fault actor killed in between finds it when it starts again and carries it out: the
  lifecycle's `restart` takes the generation, so a restart that did happen is not made twice;
- `instances`: per instance, the last generation whose end was handled (a failure is handled once,
  however many times it is seen), whether the actor gave up on it, and its restart count.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from multikernel.protocol import FaultEvent
from multikernel.services._sqlite import open_db, transaction

SCHEMA_VERSION = 1
HISTORY_LIMIT = 10_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    event BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_name ON history (name, seq);
CREATE TABLE IF NOT EXISTS restarts (
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS restarts_by_key ON restarts (key, at);
CREATE TABLE IF NOT EXISTS intents (
    name TEXT PRIMARY KEY,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    handled INTEGER NOT NULL DEFAULT 0,
    gave_up INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0
)
"""


class Intent(msgspec.Struct, frozen=True):
    """A restart decided and not yet done."""

    name: str
    generation: int  # the launch it replaces
    cause: str
    due: float  # wall-clock time (time.time()) it is due at
    attempt: int
    key: str  # what it counts against: the instance, or its group
    members: tuple[str, ...] = ()  # with a group strategy: the others restarted with it


@dataclass
class InstanceMark:
    handled: int = 0
    gave_up: bool = False
    restarts: int = 0


_EVENT = msgspec.json.Decoder(FaultEvent)
_INTENT = msgspec.json.Decoder(Intent)
_ENCODE = msgspec.json.Encoder().encode


class FaultStore:
    """`fault.db`; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = open_db(path, SCHEMA, SCHEMA_VERSION)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self.path} is closed")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- history ---------------------------------------------------------------------------------

    def record(self, event: FaultEvent) -> None:
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO history (name, event) VALUES (?, ?)", (event.name, _ENCODE(event))
            )
            db.execute(
                "DELETE FROM history WHERE seq <= (SELECT MAX(seq) FROM history) - ?",
                (HISTORY_LIMIT,),
            )

    def history(self, name: str = "", limit: int = 100) -> list[FaultEvent]:
        if name:
            rows = self.db.execute(
                "SELECT event FROM history WHERE name = ? ORDER BY seq DESC LIMIT ?", (name, limit)
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT event FROM history ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_EVENT.decode(row[0]) for row in reversed(rows)]

    # -- restarts and their windows --------------------------------------------------------------

    def recent(self, key: str, period: float, now: float | None = None) -> int:
        """Restarts counted against `key` in the last `period` seconds."""
        since = (time.time() if now is None else now) - period
        row = self.db.execute(
            "SELECT COUNT(*) FROM restarts WHERE key = ? AND at > ?", (key, since)
        ).fetchone()
        return int(row[0])

    # -- intents ---------------------------------------------------------------------------------

    def intend(self, intent: Intent) -> None:
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO intents (name, record) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET record = excluded.record",
                (intent.name, _ENCODE(intent)),
            )

    def finish(self, intent: Intent, names: tuple[str, ...], at: float | None = None) -> None:
        """The intent is carried out: count its restart against its key and drop it, at once."""
        when = time.time() if at is None else at
        with transaction(self.db) as db:
            db.execute("INSERT INTO restarts (key, at) VALUES (?, ?)", (intent.key, when))
            db.execute("DELETE FROM restarts WHERE at < ?", (when - 86400.0,))
            for name in names:
                db.execute(
                    "INSERT INTO instances (name, restarts) VALUES (?, 1) "
                    "ON CONFLICT(name) DO UPDATE SET restarts = restarts + 1",
                    (name,),
                )
            db.execute("DELETE FROM intents WHERE name = ?", (intent.name,))

    def done(self, name: str) -> None:
        with transaction(self.db) as db:
            db.execute("DELETE FROM intents WHERE name = ?", (name,))

    def intents(self) -> list[Intent]:
        rows = self.db.execute("SELECT record FROM intents").fetchall()
        return [_INTENT.decode(row[0]) for row in rows]

    # -- per instance ----------------------------------------------------------------------------

    def mark(self, name: str) -> InstanceMark:
        row = self.db.execute(
            "SELECT handled, gave_up, restarts FROM instances WHERE name = ?", (name,)
        ).fetchone()
        return InstanceMark(int(row[0]), bool(row[1]), int(row[2])) if row else InstanceMark()

    def handled(self, name: str, generation: int) -> bool:
        """Mark the end of launch `generation` handled; False if it already was."""
        with transaction(self.db) as db:
            row = db.execute("SELECT handled FROM instances WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] >= generation:
                return False
            db.execute(
                "INSERT INTO instances (name, handled) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET handled = excluded.handled",
                (name, generation),
            )
        return True

    def give_up(self, name: str, gave_up: bool = True) -> None:
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO instances (name, gave_up) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET gave_up = excluded.gave_up",
                (name, int(gave_up)),
            )

    def forget(self, name: str) -> None:
        with transaction(self.db) as db:
            db.execute("DELETE FROM instances WHERE name = ?", (name,))
            db.execute("DELETE FROM intents WHERE name = ?", (name,))
