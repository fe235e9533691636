"""A direct channel the hub relays, seen from a caller attached over a region.

A caller in another kernel has no socket, so the hub cannot hand it a direct channel; it holds
the caller's side itself and relays (bus/_relay.py). On this side the channel is a
`RelayedChannel`: what `DirectChannel` uses of a `Channel` (try_send, send, receive_many, the
reader's try_receive_many, spin_gate, nudge, close, statistics), where sending puts the frame on
the session channel with the channel's token in the header's destination field, and receiving
takes what the hub sent back for that token (`HubLink` hands it over as it reads the session).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio

from multikernel.protocol import DESTINATION_OFFSET, HEADER_SIZE

if TYPE_CHECKING:
    from multikernel.endpoints._hublink import HubLink

_DESTINATION: Final = struct.Struct("<Q")


def stamped(frame: bytes, token: int) -> bytes:
    out = bytearray(frame)
    _DESTINATION.pack_into(out, DESTINATION_OFFSET, token)
    return bytes(out)


class RelayedReader:
    """The frames the hub relayed back for one channel, in order."""

    def __init__(self) -> None:
        self.spin_gate: Callable[[], bool] | None = None  # kept for DirectChannel; never spins
        self._frames: deque[bytes] = deque()
        self._arrived = anyio.Event()
        self._closed = False

    def put(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._arrived.set()

    def close(self) -> None:
        self._closed = True
        self._arrived.set()

    def nudge(self, *, wake: bool = True) -> None:
        pass  # nothing spins here: frames arrive through the session's reader

    def try_receive_many(self, max_frames: int = 256) -> list[bytes]:
        frames: list[bytes] = []
        while self._frames and len(frames) < max_frames:
            frames.append(self._frames.popleft())
        return frames

    async def receive_many(self, max_frames: int = 256) -> list[bytes]:
        while not self._frames:
            if self._closed:
                raise anyio.EndOfStream
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self.try_receive_many(max_frames)


class RelayedChannel:
    """One relayed direct channel (see the module docstring)."""

    def __init__(self, link: HubLink, token: int) -> None:
        self._link = link
        self._token = token
        self.reader = RelayedReader()
        self.frames_out = 0

    def try_send(self, frame: bytes) -> bool:
        session = self._link.session
        if session is None:
            raise anyio.BrokenResourceError("the hub went away")
        if len(frame) < HEADER_SIZE:
            raise ValueError("not a frame")
        sent = session.try_send(stamped(frame, self._token))
        self.frames_out += sent
        return sent

    async def send(self, frame: bytes) -> None:
        await self._link.to_hub(stamped(frame, self._token))
        self.frames_out += 1

    async def receive_many(self, max_frames: int = 256) -> list[bytes]:
        return await self.reader.receive_many(max_frames)

    def close(self) -> None:
        self.reader.close()
        self._link.relays.pop(self._token, None)

    def statistics(self) -> dict[str, int]:
        return {"relayed": 1, "frames_out": self.frames_out, "waiting": len(self.reader._frames)}
