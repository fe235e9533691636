"""Instances for people: the `show` table, and the host's isolation warnings said once.

A host that cannot isolate instances (not root, `--no-isolation`) says so in every
`InstanceInfo`; mkctl prints those warnings once per host run (a marker beside the socket records
that they were shown; `mkctl host status` always shows them), not on every verb.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

from multikernel.endpoints.mkctl._output import settings, table, warn
from multikernel.protocol import InstanceInfo, format_cpu_list, format_restart, format_size

COLUMNS = ("name", "id", "state", "cpus", "memory", "image", "pid", "restart", "last exit")
WIDE = ("name", "id", "state", "cpus", "memory", "queues", "image", "signer", "pid", "agent",
        "restart", "gen", "restarts", "cause", "standby", "fault", "isolation",
        "last exit")  # fmt: skip


def _cell(info: InstanceInfo, column: str, faults: Mapping[str, str]) -> object:
    match column:
        case "restart":
            return format_restart(info.restart)
        case "gen":
            return info.generation or "-"
        case "restarts":
            return info.restarts
        case "fault":
            return faults.get(info.name, "-")
        case "cpus":
            return format_cpu_list(info.cpus) or "-"
        case "memory":
            return format_size(info.memory) if info.memory else "-"
        case "queues":
            return ",".join(info.queues) or "-"
        case "image":
            return f"{info.image} {info.image_version}".strip() or "-"
        case "last exit":
            return info.last_exit or "-"
        case "isolation":
            return ",".join(info.isolation) or "-"
        case _:
            return getattr(info, column) or "-"


def instance_table(
    infos: Sequence[InstanceInfo], wide: bool = False, faults: Mapping[str, str] | None = None
) -> None:
    """The instances as a table; `faults` is the fault actor's state of each, by name (wide)."""
    columns = WIDE if wide else COLUMNS
    known = faults or {}
    table(columns, [[_cell(i, c, known) for c in columns] for i in infos])


def warn_once(infos: Sequence[InstanceInfo]) -> None:
    """The host's isolation warnings, the first time this host's are seen (see module doc)."""
    warnings = sorted({w for i in infos for w in i.warnings})
    if not warnings:
        return
    sock = settings().socket_path()
    marker = sock.with_name(sock.name + ".warned")
    try:
        stat = sock.stat()
    except OSError:
        key = ""
    else:
        key = f"{stat.st_ino}:{stat.st_mtime_ns}\n"  # a new host makes a new socket
        with contextlib.suppress(OSError):
            if marker.read_text() == key:
                return
    for warning in warnings:
        warn(warning)
    if key:
        with contextlib.suppress(OSError):
            marker.write_text(key)
            os.chmod(marker, 0o644)
