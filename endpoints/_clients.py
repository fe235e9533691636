"""The caller's side of RPC: one direct channel per service name, opened on first use.

A request to `target` goes on the direct channel to the name's current owner, which the hub sets
up on first use (`ChannelOpen`, the handle arriving on the control socket). Concurrent first calls
share one opening. When the name moves (`NameOwnerChanged`) or the policy withdraws the channel
(`ChannelRevoke`), the channel is marked stale: new calls open a channel to the new owner while
calls in flight finish on the old one, which is closed (and the hub told) once it is idle. The
notice and the handle travel on different paths, so a channel whose owner lost the name while it
was being handed over is retired at once and asked for again.

While the hub holds a name for a switch (`NameHeld`), new calls to it wait here (at most
`MAX_HELD_CALLS` of them, until `NameHoldEnded` or the hold's deadline) instead of going on the
old owner's channel: after a switch the name's `NameOwnerChanged` has retired that channel, so
they open one to the new owner; after a release they go on as before. Calls already sent finish
where they went; none is sent again.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from multikernel.endpoints._calls import Reply
from multikernel.endpoints._direct import DirectChannel, Mirroring
from multikernel.endpoints._hublink import HubLink
from multikernel.endpoints._relayed import RelayedChannel
from multikernel.endpoints.wire import request_frame
from multikernel.protocol import (
    BusyError,
    ChannelOpen,
    ChannelReady,
    Kind,
    NoRespondersError,
    encode,
)
from multikernel.shm import Channel, ChannelHandle

#: Calls one endpoint lets wait for one held name; the next gets BusyError.
MAX_HELD_CALLS = 4096


class _Held:
    """A name the hub holds: when the hold ends at the latest, and who waits for it."""

    __slots__ = ("deadline_ns", "ended", "waiting")

    def __init__(self, deadline_ns: int) -> None:
        self.deadline_ns = deadline_ns
        self.ended = anyio.Event()
        self.waiting = 0


class ClientChannels:
    """The direct channels an endpoint calls services on, by service name."""

    def __init__(self, link: HubLink, mirror: Mirroring) -> None:
        self._link = link
        self._mirror = mirror
        self.by_target: dict[str, DirectChannel] = {}
        self._opening: dict[str, anyio.Event] = {}
        self._moved_while_opening: dict[str, set[int]] = {}
        self.held: dict[str, _Held] = {}

    async def send_request(
        self, target: str, method: str, body: object
    ) -> tuple[DirectChannel, int, Reply]:
        """Send a request on the channel to `target`'s owner, opening one if needed.

        A channel whose server side is closed (the owner left, and the hub's notice has not
        reached us yet) did not take the request: retire it and ask the hub again, once.
        """
        for attempt in (1, 2):
            if self.held and target in self.held:
                await self._wait_for_hold(target)
            direct = self.by_target.get(target)  # the usual case, without an await
            if direct is None or direct.stale or direct.closed:
                direct = await self._direct_to(target)
            correlation, reply = direct.calls.open()
            try:
                frame = request_frame(method, body, correlation, self._link.max_body)
                if not direct.send_now(frame):
                    await direct.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                direct.calls.close(correlation)
                direct.closed = True
                self.retire(direct)
                if attempt == 2:
                    raise NoRespondersError(f"the owner of {target!r} went away") from None
                continue
            except BaseException:
                self.abandon(direct, correlation, reply)
                raise
            direct.channel.reader.nudge()  # the reply is imminent: spin for it
            return direct, correlation, reply
        raise AssertionError("unreachable")

    def abandon(self, direct: DirectChannel, correlation: int, reply: Reply) -> None:
        """The caller is done with a call; if no answer ended it, tell the server to stop."""
        if not reply.done:  # abandoned (cancelled, deadline)
            direct.send_nowait(encode(Kind.ERROR, None, correlation=correlation))
        direct.calls.close(correlation)
        self.retire(direct)

    def retire(self, direct: DirectChannel) -> None:
        """Close a client channel that is stale (the name moved) or broken, once unused."""
        if direct.release_if_idle():
            if self.by_target.get(direct.target) is direct:
                del self.by_target[direct.target]
            if not self._link.closing and self._link.tg is not None:
                self._link.tg.start_soon(self._link.forget_channel, direct.token)

    async def _direct_to(self, target: str) -> DirectChannel:
        """The current direct channel to `target`'s owner, opened on first use."""
        while True:
            direct = self.by_target.get(target)
            if direct is not None and not direct.stale and not direct.closed:
                return direct
            opening = self._opening.get(target)
            if opening is not None:
                await opening.wait()
                continue
            self._opening[target] = event = anyio.Event()
            moved: set[int] = set()
            self._moved_while_opening[target] = moved
            try:
                ready, handle = await self._open(target)
                old = self.by_target.get(target)
                channel: Channel | RelayedChannel = (
                    self._link.relayed(ready.token)  # over a region: the hub relays it
                    if handle is None
                    else Channel.attach(handle, self._link.wait)
                )
                direct = DirectChannel(ready, channel, self._mirror)
                self.by_target[target] = direct
                if old is not None:
                    self.retire(old)
                if ready.peer_id in moved:
                    # The name left that owner while the hub handed us the channel (the notice
                    # and the channel travel on different paths): retire it and ask again.
                    direct.stale = True
                    self.retire(direct)
                    continue
                return direct
            finally:
                del self._opening[target]
                del self._moved_while_opening[target]
                event.set()

    async def _open(self, target: str) -> tuple[ChannelReady, ChannelHandle | None]:
        """The channel's description and handle; no handle when the hub relays it."""
        result = await self._link.control(ChannelOpen(target))
        if isinstance(result, ChannelReady):  # on the session channel: no fds, a relay
            return result, None
        assert isinstance(result, tuple)
        ready, handle = result
        return ready, handle

    def name_moved(self, name: str, old: int, new: int) -> None:
        """`name` moved: new calls go to the new owner; calls in flight finish on the old."""
        if (moved := self._moved_while_opening.get(name)) is not None:
            moved.add(old)
        direct = self.by_target.get(name)
        if direct is not None and direct.peer.endpoint_id != new:
            direct.stale = True
            self.retire(direct)

    def name_held(self, name: str, deadline_ns: int) -> None:
        """The hub holds `name` for a switch: new calls to it wait (see the module docstring)."""
        if name not in self.held:
            self.held[name] = _Held(deadline_ns)

    def hold_ended(self, name: str) -> None:
        """The hold on `name` ended: the calls waiting go to whoever owns it now."""
        held = self.held.pop(name, None)
        if held is not None:
            held.ended.set()

    def end_holds(self) -> None:
        """The hub went away (a new one holds nothing): stop waiting for any hold."""
        for name in list(self.held):
            self.hold_ended(name)

    async def _wait_for_hold(self, target: str) -> None:
        held = self.held[target]
        if held.waiting >= MAX_HELD_CALLS:
            raise BusyError(
                f"{target!r} is held for a switch and {held.waiting} calls already wait for it; "
                "retry after the switch"
            )
        held.waiting += 1
        try:
            # The hub ends every hold by its deadline; waiting past it would only be a lost notice.
            with anyio.move_on_after(max(0.0, (held.deadline_ns - time.monotonic_ns()) / 1e9)):
                await held.ended.wait()
        finally:
            held.waiting -= 1
        if self.held.get(target) is held:
            del self.held[target]

    def revoke(self, token: int) -> None:
        """The hub withdrew a channel (the policy changed; a relayed one also when its owner
        closed it): no new calls on it, and calls waiting on a relayed one fail now."""
        relayed = self._link.relays.get(token)
        if relayed is not None:
            relayed.reader.close()
        for direct in list(self.by_target.values()):
            if direct.token == token:
                direct.stale = True
                self.retire(direct)

    def held_calls(self) -> dict[str, int]:
        """The names held now, with the calls waiting for each."""
        return {name: held.waiting for name, held in self.held.items()}

    def statistics(self) -> dict[str, Any]:
        return {t: d.channel.statistics() for t, d in self.by_target.items()}

    def close(self) -> None:
        for direct in self.by_target.values():
            direct.close()
        self.by_target.clear()
