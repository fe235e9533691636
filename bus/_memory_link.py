"""Direct channels of the in-memory bus: a `Link` between a caller and a name's owner.

To the owner's real `Service`, a `Link` is the `ReplyChannel` a `DirectChannel` would be (the
caller as a `Peer`, the running handlers' cancel scopes, `send` for replies); to the caller, each
call is a bounded stream of reply frames (`Call`). As on the real bus, a call the caller abandons
cancels its handler, a link whose caller or owner goes away cancels every handler and fails every
call with NoRespondersError, and a link whose name moved (or which the policy withdrew) takes no
new calls and closes once its calls in flight are answered.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from multikernel.endpoints import Peer, Service
from multikernel.protocol import (
    ERROR_DECODER,
    Flag,
    Header,
    Kind,
    NoRespondersError,
    decode_body,
    decode_header,
    raise_for_error,
)

if TYPE_CHECKING:
    from multikernel.bus._memory_endpoint import MemoryEndpoint

#: Reply frames a call buffers before a streaming method waits for its caller (backpressure,
#: as a full direct-channel ring would give).
REPLY_BUFFER = 64


class Link:
    """A direct channel between a caller and the owner of `target`, in memory."""

    def __init__(
        self,
        token: int,
        target: str,
        client: MemoryEndpoint,
        server: MemoryEndpoint,
        service: Service,
    ) -> None:
        self.token = token
        self.target = target
        self.client = client
        self.server = server
        self.service = service
        who = client.identity
        self.peer = Peer(who.endpoint_id, who.name, who.instance, who.uid, who.pid)
        self.handlers: dict[int, anyio.CancelScope] = {}  # the server's running requests
        self.abandoned: set[int] = set()  # requests given up before a worker picked them up
        self.calls: dict[int, MemoryObjectSendStream[bytes]] = {}  # the client's, by correlation
        self.stale = self.closed = False
        client._links[target] = self
        server._served.add(self)

    def nudge(self) -> None:
        """A real channel would spin for the caller's next request; memory needs nothing."""

    async def send(self, frame: bytes) -> None:
        """A reply or error from the service: waits while the caller's buffer is full."""
        if self.closed:
            raise anyio.BrokenResourceError
        stream = self.calls.get(decode_header(frame).correlation)
        if stream is None:
            await anyio.lowlevel.checkpoint()  # the caller gave up: the frame would be ignored
            return
        # Abandoned while we waited: the caller ignores late frames.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(frame)

    def send_nowait(self, frame: bytes) -> bool:
        stream = self.calls.get(decode_header(frame).correlation)
        if self.closed or stream is None:
            return False
        try:
            stream.send_nowait(frame)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    def abandon(self, correlation: int, done: bool) -> None:
        """The caller is finished with a call; if no answer ended it, cancel its handler."""
        stream = self.calls.pop(correlation, None)
        if stream is not None:
            stream.close()
        if not done:
            if (scope := self.handlers.get(correlation)) is not None:
                scope.cancel()
            else:  # still queued for a worker: it must not run at all
                self.abandoned.add(correlation)
        if self.stale and not self.calls:
            self.close()

    def retire(self) -> None:
        """The name moved or the policy withdrew the channel: no new calls, close once idle."""
        self.stale = True
        if not self.calls:
            self.close()

    def close(self) -> None:
        """Either side went away: the server's handlers are cancelled, callers get EndOfStream."""
        if self.closed:
            return
        self.closed = True
        for scope in self.handlers.values():
            scope.cancel()
        for stream in self.calls.values():
            stream.close()
        if self.client._links.get(self.target) is self:
            del self.client._links[self.target]
        self.server._served.discard(self)


class Call:
    """The caller's side of one request: reply frames as they come, the remote error raised."""

    def __init__(self, link: Link, correlation: int, frames: MemoryObjectReceiveStream[bytes]):
        self.link = link
        self.correlation = correlation
        self.frames = frames
        self.done = False

    async def next(self) -> tuple[Header, bytes] | None:
        """The next reply frame, None after the last one."""
        if self.done:
            return None
        try:
            frame = await self.frames.receive()
        except anyio.EndOfStream:
            self.done = True
            raise NoRespondersError(
                f"the direct channel to {self.link.target!r} closed: its owner went away"
            ) from None
        header = decode_header(frame)
        self.done = header.kind == Kind.ERROR or not header.flags & Flag.MORE
        if header.kind == Kind.ERROR:
            raise_for_error(decode_body(header, frame, ERROR_DECODER))
        return header, frame

    def close(self) -> None:
        self.link.abandon(self.correlation, self.done)
        self.frames.close()
