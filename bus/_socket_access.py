"""Who may connect to the hub's control socket: its file mode and group.

Connecting to a Unix socket needs write permission on it, and whoever connects attaches as an
endpoint on instance 0 with their own uid. So the socket is the host's front door: by default it
is 0600, open to the hub's own user (and root) only. `SocketAccess(0o660, gid)` lets a group in;
0666 lets every local user in, which the hub logs as a warning. What an admitted user may then do
is the policy's business: the host actors' services are host-only unless a rule grants them
(docs/access-control.md, `[host_only]`; docs/security.md).

The socket is bound with mode 0600 and only then given its group and final mode, so it is never
wider than asked, not even for a moment (anyio binds, chmods, and only then listens).
"""

from __future__ import annotations

import grp
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from multikernel.endpoints.log import get_logger

log = get_logger("multikernel.bus")

#: The mode the socket is bound with before its group and final mode are applied.
BIND_MODE: Final = 0o600
_MODE = re.compile(r"0?o?([0-7]{3})")


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """The control socket's mode (read+write bits only) and group (a gid; None: the hub's)."""

    mode: int = 0o600
    group: int | None = None

    def __post_init__(self) -> None:
        if self.mode & ~0o666:
            raise ValueError(
                f"socket mode {self.mode:#o} has bits other than read and write; use e.g. 0660"
            )

    @classmethod
    def parse(cls, mode: str | None = None, group: str | None = None) -> SocketAccess:
        """From command-line text: `mode` octal ("0660"), `group` a group name or a gid."""
        bits = 0o600
        if mode is not None:
            match = _MODE.fullmatch(mode.strip())
            if not match:
                raise ValueError(f"not a socket mode: {mode!r} (use octal, e.g. 0600 or 0660)")
            bits = int(match.group(1), 8)
        gid = None
        if group is not None:
            if group.isdigit():
                gid = int(group)
            else:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    raise ValueError(f"no group named {group!r} on this host") from None
        return cls(bits, gid)

    @property
    def world_writable(self) -> bool:
        return bool(self.mode & 0o002)

    def apply(self, path: Path) -> None:
        """Give the bound socket its group, then its mode; warn if every local user may connect."""
        if self.group is not None:
            os.chown(path, -1, self.group)
        os.chmod(path, self.mode)
        if self.world_writable:
            log.warning(
                "control socket is world-writable",
                socket=str(path),
                mode=f"{self.mode:04o}",
                consequence="every local user may attach as an endpoint on instance 0; the "
                "policy decides what they may do",
            )
