"""The upgrade actor's durable state: rollouts as they go, and each deployment's revisions.

`<state-dir>/upgrade.db` (SQLite, WAL, one transaction per change): a rollout's status (the
`RolloutStatus` the actor answers with, as msgpack) is written before each step it takes, so a
restarted actor knows where every upgrade stood and either finishes it (its names had moved) or
rolls it back (they had not). A **deployment** is the line of instances that replaced one another
by upgrades, named after its first instance; its **revisions** are the images it ran, each with
the copy of the image the actor keeps (`undo` loads it again) and the instance that ran it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgspec

from multikernel.protocol import Revision, RolloutStatus, StartRollout

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY,
    request BLOB NOT NULL,
    status BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    deployment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    instance TEXT NOT NULL,
    image TEXT NOT NULL,
    digest TEXT NOT NULL,
    version TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (deployment, revision)
);
CREATE TABLE IF NOT EXISTS current (
    deployment TEXT PRIMARY KEY,
    revision INTEGER NOT NULL
);
"""

_status = msgspec.msgpack.Decoder(RolloutStatus)
_request = msgspec.msgpack.Decoder(StartRollout)
_encode = msgspec.msgpack.Encoder().encode


class UpgradeStore:
    """`upgrade.db` (see the module docstring); one connection, used from the actor's thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- rollouts ------------------------------------------------------------------------------

    def new_rollout(self, request: StartRollout) -> int:
        with self.db:
            cursor = self.db.execute(
                "INSERT INTO rollouts (request, status) VALUES (?, ?)", (_encode(request), b"")
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def save(self, status: RolloutStatus) -> None:
        with self.db:
            self.db.execute(
                "UPDATE rollouts SET status = ? WHERE id = ?", (_encode(status), status.rollout)
            )

    def rollout(self, rollout: int) -> tuple[StartRollout, RolloutStatus] | None:
        """A rollout's request and its last saved status (0: the newest)."""
        if rollout == 0:
            row = self.db.execute(
                "SELECT request, status FROM rollouts WHERE status != x'' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        else:
            row = self.db.execute(
                "SELECT request, status FROM rollouts WHERE id = ? AND status != x''", (rollout,)
            ).fetchone()
        return (_request.decode(row[0]), _status.decode(row[1])) if row else None

    def rollouts(self, limit: int) -> list[RolloutStatus]:
        rows = self.db.execute(
            "SELECT status FROM rollouts WHERE status != x'' ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_status.decode(row[0]) for row in reversed(rows)]

    def unfinished(self) -> list[tuple[StartRollout, RolloutStatus]]:
        """Rollouts a previous run of the actor left running or paused, oldest first."""
        found = []
        for request, status in self.db.execute(
            "SELECT request, status FROM rollouts WHERE status != x'' ORDER BY id"
        ):
            decoded = _status.decode(status)
            if decoded.outcome in ("running", "paused"):
                found.append((_request.decode(request), decoded))
        return found

    # -- deployments and revisions -------------------------------------------------------------

    def deployment_of(self, instance: str) -> str:
        """The deployment `instance` is the current (or a past) instance of; else its own name."""
        row = self.db.execute(
            "SELECT deployment FROM revisions WHERE instance = ? ORDER BY created_ns DESC LIMIT 1",
            (instance,),
        ).fetchone()
        return str(row[0]) if row else instance

    def revisions(self, deployment: str) -> list[Revision]:
        current = self.current(deployment)
        return [
            Revision(rev, inst, image, digest, version, created, current=rev == current)
            for rev, inst, image, digest, version, created in self.db.execute(
                "SELECT revision, instance, image, digest, version, created_ns FROM revisions "
                "WHERE deployment = ? ORDER BY revision",
                (deployment,),
            )
        ]

    def current(self, deployment: str) -> int:
        row = self.db.execute(
            "SELECT revision FROM current WHERE deployment = ?", (deployment,)
        ).fetchone()
        return int(row[0]) if row else 0

    def next_revision(self, deployment: str) -> int:
        row = self.db.execute(
            "SELECT MAX(revision) FROM revisions WHERE deployment = ?", (deployment,)
        ).fetchone()
        return int(row[0] or 0) + 1

    def add_revision(self, deployment: str, revision: Revision, *, current: bool) -> None:
        """Record a revision (replacing one of that number); `current`: it runs now."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO revisions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    deployment, revision.revision, revision.instance, revision.image,
                    revision.digest, revision.version, revision.created_ns or time.time_ns(),
                ),
            )  # fmt: skip
            if current:
                self.set_current(deployment, revision.revision)

    def drop_revision(self, deployment: str, revision: int) -> None:
        """Forget a revision that never ran (its upgrade rolled back)."""
        with self.db:
            self.db.execute(
                "DELETE FROM revisions WHERE deployment = ? AND revision = ?",
                (deployment, revision),
            )

    def set_current(self, deployment: str, revision: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO current (deployment, revision) VALUES (?, ?)",
            (deployment, revision),
        )
