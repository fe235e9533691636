"""The lifecycle actor's durable state: every instance's definition, in `lifecycle.db`.

One row per instance, written in one transaction at every change (a state move, new resources,
a loaded image, a launch and its `LaunchRecord`, a restart policy): its name and id, state,
resources, the verified image (its manifest, digest and signer, as verified at load: a restarted
host does not trust the unpacked copy, which the instance could have changed), its restart policy,
its launch generation and counters, why its last launch ended, and the platform's records of the
launches that may still run (the instance's own and its standby's) or were being started when the
host died (`launching`). Instance ids are allocated from a counter in the same file, never reused.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from multikernel.protocol import RestartPolicy
from multikernel.services._image import LoadedImage
from multikernel.services._instances import Instance
from multikernel.services._manifest import Manifest
from multikernel.services._platform import Resources
from multikernel.services._signature import SignerInfo
from multikernel.services._sqlite import lock_file, open_db, transaction

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    id INTEGER NOT NULL UNIQUE,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
)
"""


class StoredSigner(msgspec.Struct, frozen=True):
    subject: str
    issuer: str
    serial: int
    fingerprint: str
    hash: str


class StoredImage(msgspec.Struct, frozen=True):
    """A `LoadedImage` as verified when it was loaded."""

    name: str
    version: str
    entry: tuple[str, ...]
    env: dict[str, str]
    parameters: dict[str, Any]
    min_cpus: int
    min_memory: int
    digest: str
    source: str
    path: str
    signer: StoredSigner | None = None

    @classmethod
    def of(cls, image: LoadedImage) -> StoredImage:
        m, s = image.manifest, image.signer
        signer = (
            None
            if s is None
            else StoredSigner(s.subject, s.issuer, s.serial, s.fingerprint, s.hash)
        )
        return cls(
            m.name, m.version, tuple(m.entry), dict(m.env), dict(m.parameters), m.min_cpus,
            m.min_memory, image.digest, str(image.source), str(image.path), signer,
        )  # fmt: skip

    def loaded(self) -> LoadedImage:
        manifest = Manifest(
            self.name, self.version, self.entry, dict(self.env), dict(self.parameters),
            self.min_cpus, self.min_memory,
        )  # fmt: skip
        s = self.signer
        signer = (
            None if s is None else SignerInfo(s.subject, s.issuer, s.serial, s.fingerprint, s.hash)
        )
        return LoadedImage(manifest, self.digest, signer, Path(self.source), Path(self.path))


class StoredInstance(msgspec.Struct):
    """One instance's row."""

    name: str
    id: int
    state: str
    cpus: tuple[int, ...] = ()
    memory: int = 0
    image: StoredImage | None = None
    restart: RestartPolicy = RestartPolicy()
    command: tuple[str, ...] = ()
    generation: int = 0
    restarts: int = 0
    last_exit: str = ""
    cause: str = ""
    started_ns: int = 0
    proc: str = ""  # the platform's record of the running launch ("" if none)
    standby: str = ""  # the same for its standby
    launching: tuple[str, ...] = ()  # units being launched, not yet recorded
    output_fd: int = 0  # the running launch's agent holds its output pipe's read end there
    queues: tuple[str, ...] = ()  # I/O queues granted
    resource_tx: int = 0  # the resource transaction its resources come from

    @property
    def resources(self) -> Resources | None:
        if not (self.cpus and self.memory):
            return None
        return Resources.granted(frozenset(self.cpus), self.memory, self.queues)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(StoredInstance)


class InstanceStore:
    """`lifecycle.db` in the host's state dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = lock_file(path.with_suffix(".lock"), "host (or lifecycle actor)")
        try:
            self._db: sqlite3.Connection | None = open_db(path, SCHEMA, SCHEMA_VERSION)
        except BaseException:
            os.close(self._lock)
            raise

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self.path} is closed")
        return self._db

    def load(self) -> list[StoredInstance]:
        rows = self.db.execute("SELECT record FROM instances ORDER BY id").fetchall()
        return [_DECODER.decode(row[0]) for row in rows]

    def save(self, record: StoredInstance) -> None:
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO instances (name, id, record) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET id = excluded.id, record = excluded.record",
                (record.name, record.id, _ENCODER.encode(record)),
            )

    def save_instance(self, inst: Instance) -> None:
        self.save(stored(inst))

    def delete(self, name: str) -> None:
        with transaction(self.db) as db:
            db.execute("DELETE FROM instances WHERE name = ?", (name,))

    def next_id(self) -> int:
        """The id `allocate_id` would give now (the lifecycle actor asks for a grant with it
        before it takes it: a create refused leaves no id used up)."""
        row = self.db.execute("SELECT value FROM counters WHERE key = 'instance_id'").fetchone()
        ids = [int(r[0]) for r in self.db.execute("SELECT id FROM instances")]
        return max([int(row[0]) if row else 0, *ids]) + 1

    def allocate_id(self, id: int = 0) -> int:
        """The next instance id (or `id`, from `next_id`): never one used before, even by a
        deleted instance."""
        with transaction(self.db) as db:
            row = db.execute("SELECT value FROM counters WHERE key = 'instance_id'").fetchone()
            ids = [int(r[0]) for r in db.execute("SELECT id FROM instances")]
            used = max([int(row[0]) if row else 0, *ids])
            if id and id <= used:
                raise ValueError(f"instance id {id} was used before (last {used})")
            id = id or used + 1
            db.execute(
                "INSERT INTO counters (key, value) VALUES ('instance_id', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (id,),
            )
        return id

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            os.close(self._lock)


def stored(inst: Instance) -> StoredInstance:
    """The row for `inst` as it is now."""
    resources = inst.resources
    return StoredInstance(
        name=inst.name,
        id=inst.id,
        state=inst.state,
        cpus=tuple(sorted(resources.cpus)) if resources else (),
        memory=resources.memory if resources else 0,
        image=StoredImage.of(inst.image) if inst.image is not None else None,
        restart=inst.restart,
        command=inst.command,
        generation=inst.generation,
        restarts=inst.restarts,
        last_exit=inst.last_exit,
        cause=inst.cause,
        started_ns=inst.started_ns,
        proc=inst.proc_record if inst.proc is not None else "",
        standby=inst.standby.record if inst.standby is not None else "",
        launching=tuple(sorted(inst.launching)),
        output_fd=inst.output_fd if inst.proc is not None else 0,
        queues=inst.queues,
        resource_tx=inst.resource_tx,
    )


def restored(row: StoredInstance) -> Instance:
    """An `Instance` as `row` describes it, with nothing running yet."""
    image = row.image.loaded() if row.image is not None else None
    return Instance(
        row.name,
        row.id,
        state=row.state,
        resources=row.resources,
        image=image,
        image_dir=image.path if image is not None else None,
        started_ns=row.started_ns,
        restarts=row.restarts,
        last_exit=row.last_exit,
        restart=row.restart,
        command=row.command,
        generation=row.generation,
        cause=row.cause,
        output_fd=row.output_fd,
        queues=row.queues,
        resource_tx=row.resource_tx,
    )
