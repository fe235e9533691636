"""SQLite in the host's state dir: how every actor keeps its durable state.

One file per actor (`lifecycle.db`, `fault.db`), in WAL mode with `synchronous=NORMAL`: each change
is one transaction (`transaction()`), atomic, and durable against a crash of the process that made
it (a SIGKILLed host loses nothing it committed; a power cut may lose the last few transactions,
never half of one, and takes the instances down with it anyway). A commit is a write to the WAL
with no fsync, tens of microseconds, so actors write from their event loop. `PRAGMA user_version`
is the schema's version: a file written by newer code is refused rather than scribbled over.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from multikernel.protocol import MultikernelError


class StateStoreError(MultikernelError):
    """A state file that cannot be used: unreadable, corrupt, or written by newer code."""


def open_db(path: Path, schema: str, version: int) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite file at `path` with `schema` at `version`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    except sqlite3.Error as exc:
        raise StateStoreError(f"cannot open {path}: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        _check_version(conn, path, version)
        with transaction(conn):
            for statement in filter(None, (s.strip() for s in schema.split(";"))):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={int(version)}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateStoreError(
            f"{path} is not a usable state file ({exc}): move it away to start afresh"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_version(conn: sqlite3.Connection, path: Path, version: int) -> None:
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > version:
        raise StateStoreError(
            f"{path} was written by a newer version (schema {found}, this code knows "
            f"{version}): run the newer version, or move the file away to start afresh"
        )


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic change: BEGIN IMMEDIATE ... COMMIT, rolled back if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def lock_file(path: Path, who: str) -> int:
    """Hold `path` locked (flock) until the returned fd is closed: one `who` per state dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateStoreError(
            f"another {who} is using {path.parent}: stop it first, or give this one another "
            "state dir"
        ) from None
    return fd
