"""Warm standbys: a pre-started agent per protected instance, ready to take the instance over.

An instance whose restart policy says `standby` gets, once it is active, a second launch of itself:
the same instance id (the hub binds its socket to the instance, as for any of its processes), the
same CPUs and memory limit in cgroups of its own (`<name>.<slot>`), and an agent that attaches to
the bus, starts its workload's interpreter through the gate (`_gate`: the heavy imports done, the
image's code not yet run), tells the lifecycle `ready` and waits. It owns no name, subscribes to
nothing, says no hello and does not beat: nothing on the bus can tell it from an idle process of
the instance. When the instance's launch has ended and it is started again (a restart by the fault
actor, or `mkctl start`), the lifecycle writes `go` on the standby's control socket, a socketpair
only the lifecycle holds, so nothing else can wake it; the standby then does what a fresh agent
does (serves `instance.<id>.agent`, says hello, beats) and hands its gate a bus attachment, on
which the workload re-creates its names and subscriptions. What a cold start spends on two Python
start-ups and their imports (~250 ms here) is spent before the failure instead of after it.

A standby whose host dies sees its control socket close and exits; a restarted host reclaims what
is left of it and starts a fresh one. A standby is for the launch resources and image it was made
with: if either changed, it is discarded and the instance starts cold.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING

import anyio

from multikernel.services._platform import InstanceProcess, Platform, Resources

if TYPE_CHECKING:
    from multikernel.services._instances import Instance


def launch_record(platform: Platform, proc: InstanceProcess) -> str:
    """The platform's record of a launch, for a restarted host ("" if it keeps none)."""
    record = getattr(platform, "record", None)
    return str(record(proc)) if record is not None else ""


class Standby:
    """The lifecycle's side of one standby launch."""

    def __init__(
        self,
        proc: InstanceProcess,
        control: socket.socket,
        record: str,
        inst: Instance,
        output: int | None = None,
    ) -> None:
        self.proc = proc
        self.control = control
        self.record = record
        #: The read end of its output pipe (its workload's stdout and stderr), until it takes
        #: the instance over and the instance's log collects it (`take_output`).
        self.output = output
        self.exited = anyio.Event()  # set by its watcher once it is reclaimed
        self.ready = False
        self.resources: Resources | None = inst.resources
        self.image = inst.image.digest if inst.image is not None else ""
        self.command = inst.command
        control.setblocking(False)

    @staticmethod
    def new_slot() -> str:
        return f"s{secrets.token_hex(3)}"

    def usable(self, inst: Instance) -> bool:
        """Ready, alive, and made for what `inst` would launch now."""
        image = inst.image.digest if inst.image is not None else ""
        return (
            self.ready
            and self.proc.returncode is None
            and self.resources == inst.resources
            and self.image == image
            and self.command == inst.command
        )

    async def wait_ready(self) -> None:
        """Until the standby says `ready` (EndOfStream if it ends first)."""
        buffer = b""
        while b"\n" not in buffer:
            await anyio.wait_readable(self.control)
            try:
                chunk = self.control.recv(64)
            except BlockingIOError:
                continue
            if not chunk:
                raise anyio.EndOfStream
            buffer += chunk
        if not buffer.startswith(b"ready"):
            raise OSError(f"the standby said {buffer[:40]!r}, not ready")
        self.ready = True

    async def go(self) -> None:
        """Tell the standby to take the instance over (OSError if it is gone)."""
        message = b"go\n"
        while message:
            try:
                message = message[self.control.send(message) :]
            except BlockingIOError:
                await anyio.wait_writable(self.control)

    def take_output(self) -> int | None:
        """The read end of its output pipe, now the caller's to close."""
        output, self.output = self.output, None
        return output

    def close(self) -> None:
        self.control.close()
        if self.output is not None:
            os.close(self.output)
            self.output = None
