"""Calls: waiting for answers (one slot per control request or RPC, resolved by a reader task),
and the decoders of typed replies.

anyio has no futures; a `Reply` is an `anyio.Event` plus the frames that arrived for one
correlation id. Streams of replies (`Flag.MORE`) queue in it until the last one.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import anyio
import msgspec

from multikernel.protocol import (
    ERROR_DECODER,
    Flag,
    Header,
    Kind,
    decode_body,
    raise_for_error,
)

#: `Flag.MORE` as a plain int: `int & IntFlag` goes through enum's Python code (~1.7 us).
_MORE = int(Flag.MORE)


class Reply:
    """The answer(s) to one request: frames pushed by a reader, awaited by the requester."""

    __slots__ = ("_event", "_failure", "_frames", "done")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None  # made only if someone has to wait
        self._frames: deque[tuple[Header, Any]] = deque()
        self._failure: BaseException | None = None
        self.done = False

    def push(self, header: Header, frame: Any) -> None:
        """One reply: a frame, or (for answers that came with fds) a decoded value."""
        self._frames.append((header, frame))
        if header.kind == Kind.ERROR or not header.flags & _MORE:
            self.done = True
        if self._event is not None:
            self._event.set()

    @property
    def ready(self) -> bool:
        """True when `next()` would return without waiting."""
        return bool(self._frames) or self.done

    def fail(self, failure: BaseException) -> None:
        """The path the reply would come on broke: wake the requester with `failure`."""
        if not self.done:
            self._failure = failure
            self.done = True
            if self._event is not None:
                self._event.set()

    async def wait(self) -> None:
        """Until something is pushed, the path fails, or `wake()` is called."""
        if not self.ready:
            self._event = event = anyio.Event()
            await event.wait()

    def wake(self) -> None:
        """Wake whoever is in `wait()` (the reading is theirs to take over)."""
        if self._event is not None:
            self._event.set()

    async def next(self) -> tuple[Header, Any] | None:
        """The next reply frame, None after the last; raises the remote error if one came."""
        while not self._frames:
            if self.done and self._failure is None:
                return None
            if self._failure is not None:
                raise self._failure
            self._event = event = anyio.Event()
            await event.wait()
        header, frame = self._frames.popleft()
        if header.kind == Kind.ERROR:
            raise_for_error(decode_body(header, frame, ERROR_DECODER))
        return header, frame


class Correlations:
    """Correlation ids and their pending replies, for one path (session or direct channel)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.pending: dict[int, Reply] = {}

    def __bool__(self) -> bool:
        """True while replies are due."""
        return bool(self.pending)

    def open(self) -> tuple[int, Reply]:
        correlation = next(self._ids)
        reply = self.pending[correlation] = Reply()
        return correlation, reply

    def close(self, correlation: int) -> None:
        self.pending.pop(correlation, None)

    def deliver(self, header: Header, frame: Any) -> bool:
        """Hand an answer to its request: a frame, or a value already decoded (an answer that
        came over the control socket with fds); False if nobody waits for it any more."""
        reply = self.pending.get(header.correlation)
        if reply is None:
            return False
        reply.push(header, frame)
        if reply.done:
            del self.pending[header.correlation]
        return True

    def fail_all(self, failure: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for reply in pending.values():
            reply.fail(failure)


class Decoders:
    """One msgspec decoder per response type a caller asked for, made on first use."""

    __slots__ = ("_decoders",)

    def __init__(self) -> None:
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}

    def __call__(self, kind: Any) -> msgspec.msgpack.Decoder[Any]:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = msgspec.msgpack.Decoder(kind)
        return decoder
