"""What the upgrade actor asks of a workload's control (``instance.<id>.upgrade``), checked.

Neither side of an upgrade is trusted: the predecessor's state must add up (in order, the size it
said, at most `MAX_IMAGE`, a valid image) before it is kept or handed on, and the endpoint the
successor names as its services' owner must be one of its own (the hub knows which instance each
endpoint is on). A workload that serves no control is upgraded without state: its names are the
ones its endpoints own at the hub.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import anyio

from multikernel.endpoints import Bus, retrying
from multikernel.protocol import (
    ControlInfo,
    Freeze,
    Health,
    InstanceInfo,
    MultikernelError,
    NoRespondersError,
    RefusedError,
    Restored,
    StateChunk,
    control_name,
)
from multikernel.upgrade._preserved import MAX_IMAGE, PreservedState

#: Bytes of state per restore call (a frame holds more; this keeps each call short).
CHUNK = 256 << 10


class UpgradeFailed(MultikernelError):
    """One step failed or ran past its deadline; the upgrade was rolled back."""


async def describe(bus: Bus, instance: int, within: float) -> ControlInfo:
    """The successor's control, once it serves it (it starts as its workload does)."""
    info: ControlInfo = await retrying(bus, within=within).request(
        control_name(instance), "describe", response=ControlInfo
    )
    return info


async def predecessor_control(bus: Bus, old: InstanceInfo) -> ControlInfo:
    """The predecessor's control; for one that serves none: its names, found at the hub."""
    try:
        info: ControlInfo = await bus.request(
            control_name(old.id), "describe", response=ControlInfo
        )
    except NoRespondersError:
        snapshot = await bus.introspect()
        names = sorted(
            name
            for e in snapshot.endpoints
            if e.instance == old.id
            for name in e.names
            if not name.startswith("instance.")
        )
        info = ControlInfo(tuple(names), endpoint=0, stateful=False)
    return info


async def check_endpoint(bus: Bus, endpoint: int, new: InstanceInfo) -> None:
    """RefusedError unless `endpoint` (the successor's claimed owner) is on `new`'s instance."""
    snapshot = await bus.introspect()
    found = [e for e in snapshot.endpoints if e.endpoint_id == endpoint]
    if not found or found[0].instance != new.id:
        where = f"on instance {found[0].instance}" if found else "not attached"
        raise RefusedError(
            f"the successor names endpoint {endpoint} as its services' owner, which is "
            f"{where}, not on instance {new.id}: refused"
        )


async def take_state(bus: Bus, instance: int, thaw_after: float) -> bytes:
    """Freeze the predecessor and take its state's image, whole and checked."""
    image = bytearray()
    chunk: StateChunk
    total = 0
    stream: AsyncGenerator[StateChunk, None] = bus.request_stream(
        control_name(instance), "freeze", Freeze(thaw_after=thaw_after), response=StateChunk
    )
    async with contextlib.aclosing(stream):  # closed here, also when a chunk is refused
        async for chunk in stream:
            if (
                chunk.offset != len(image)
                or chunk.offset + len(chunk.data) > chunk.total
                or chunk.total > MAX_IMAGE
                or (image and chunk.total != total)
            ):
                raise RefusedError(
                    f"the predecessor's state does not add up (a chunk at {chunk.offset} of "
                    f"{chunk.total} after {len(image)} bytes): refused"
                )
            total = chunk.total
            image += chunk.data
    if len(image) != total:
        raise RefusedError(f"the predecessor's state ended at {len(image)} of {total} bytes")
    data = bytes(image)
    if data:
        PreservedState.decode(data)  # checked before it is kept or handed on
    return data


async def give_state(bus: Bus, instance: int, image: bytes) -> None:
    """Send the state's image to the successor in chunks; it restores it at the last."""
    answer = Restored(0)
    for offset in range(0, max(len(image), 1), CHUNK):
        chunk = StateChunk(offset, len(image), image[offset : offset + CHUNK])
        answer = await bus.request(control_name(instance), "restore", chunk, response=Restored)
    if not answer.done:
        raise RefusedError("the successor did not finish reading the state")


async def wait_healthy(bus: Bus, instance: int, within: float) -> None:
    """Ask until the successor says it is healthy; UpgradeFailed after `within` seconds."""
    last = Health(False, "no answer")
    with anyio.move_on_after(within):
        delay = 0.01
        while True:
            try:
                last = await bus.request(control_name(instance), "health", response=Health)
            except (NoRespondersError, RefusedError) as error:
                last = Health(False, str(error))
            if last.ok:
                return
            await anyio.sleep(delay)  # a health check is polled, like any probe
            delay = min(delay * 2, 0.5)
    raise UpgradeFailed(f"not healthy within {within:g} s: {last.detail or 'it said no'}")


def write_durably(path: Path, data: bytes) -> None:
    """`data` in `path`, whole or not at all, on disk when this returns."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
