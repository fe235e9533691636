"""Instances for people: the `show` table, and the host's isolation warnings said once.

A host that cannot isolate instances (not root, `--no-isolation`) says so in every
`InstanceInfo`; mkctl prints those warnings once per host run (a marker beside the socket records
that they were shown; `mkctl host status` always shows them), not on every verb.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from multikernel.endpoints.mkctl._output import settings, table, warn
from multikernel.protocol import InstanceInfo

COLUMNS = ("name", "id", "state", "cpus", "memory", "image", "pid", "last exit")
WIDE = ("name", "id", "state", "cpus", "memory", "image", "signer", "pid", "agent", "restarts",
        "isolation", "last exit")  # fmt: skip


def size(n: int) -> str:
    """Bytes as people write them: 128M, 1.5G, 4096."""
    for unit in ("G", "M", "K"):
        scale = 1024 ** "BKMG".index(unit)
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:g}{unit}"
    return str(n)


def _cell(info: InstanceInfo, column: str) -> object:
    match column:
        case "cpus":
            return ",".join(map(str, info.cpus)) or "-"
        case "memory":
            return size(info.memory) if info.memory else "-"
        case "image":
            return f"{info.image} {info.image_version}".strip() or "-"
        case "last exit":
            return info.last_exit or "-"
        case "isolation":
            return ",".join(info.isolation) or "-"
        case _:
            return getattr(info, column) or "-"


def instance_table(infos: Sequence[InstanceInfo], wide: bool = False) -> None:
    columns = WIDE if wide else COLUMNS
    table(columns, [[_cell(i, c) for c in columns] for i in infos])


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
