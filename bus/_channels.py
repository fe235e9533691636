"""Direct channels: the hub sets up a ring pair between a caller and a name's owner, then leaves.

`ChannelOpen` from a caller is checked (someone owns the name; the policy lets this caller reach
that owner), a channel is created in shared memory, and each side gets its handle over its control
socket with a `ChannelReady` saying who the other side is, as the hub bound it. The record is kept
before the hand-over, so a name that moves meanwhile is reported to the caller; a policy reload
re-checks every record and revokes what the new policy refuses. Attachments (`AttachRequest`) are
the same hand-over for a socket bound to the requester's instance.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from multikernel.bus._policy import Policy
from multikernel.bus._relay import end_relay, open_relay, run_relay
from multikernel.bus._session import Limits, Session
from multikernel.endpoints.log import get_logger
from multikernel.endpoints.wire import send_handle, send_with_fds
from multikernel.protocol import (
    AccessDeniedError,
    BusyError,
    ChannelInfo,
    ChannelReady,
    ChannelRevoke,
    Kind,
    MultikernelError,
    NoRespondersError,
    RefusedError,
    encode,
)
from multikernel.shm import ChannelHandle, create_channel_handles

log = get_logger("multikernel.bus")


@dataclass(frozen=True)
class ChannelRecord:
    token: int
    target: str
    client: int
    server: int


class ChannelBroker:
    """The direct channels the hub has set up, by token."""

    def __init__(
        self,
        sessions: dict[int, Session],
        limits: Limits,
        counters: dict[str, int],
        fail: Callable[[Session, int, MultikernelError], None],
        open_instance_socket: Callable[..., socket.socket],
    ) -> None:
        self._sessions = sessions
        self._limits = limits
        self._counters = counters
        self._fail = fail
        self._open_instance_socket = open_instance_socket
        self.records: dict[int, ChannelRecord] = {}
        self._tokens = itertools.count(1)

    def open(
        self,
        tg: anyio.abc.TaskGroup,
        policy: Policy,
        client: Session,
        owner: int | None,
        target: str,
        correlation: int,
    ) -> None:
        """A caller asks for a channel to `target`'s `owner`: check, then hand it over."""
        server = self._sessions.get(owner) if owner is not None else None
        if server is None:
            raise NoRespondersError(f"nobody owns {target!r}; the request was not delivered")
        decision = policy.may_connect(client.identity, server.identity, target)
        if not decision:
            raise AccessDeniedError(f"calling {target!r} refused: {decision.reason}")
        if server.sock is None:
            raise RefusedError(
                f"calling {target!r} needs a direct channel to its owner, which is attached "
                "over a region shared with another kernel, where no file descriptor can be "
                "handed over; serving from a region is not built yet (docs/bus.md, sessions "
                "over a region)"
            )
        self._check_limits(client, server, target)
        tg.start_soon(self._hand_over, tg, client, server, target, correlation)

    def _check_limits(self, client: Session, server: Session, target: str) -> None:
        """Each channel costs both sides file descriptors and memory: a caller that asks again
        and again gets BusyError, and so does anyone once a server holds its maximum."""
        limits = self._limits
        held = [r for r in self.records.values() if r.client == client.id]
        if len(held) >= limits.max_channels:
            raise BusyError(
                f"this endpoint holds {len(held)} direct channels, the most one may "
                "(Limits.max_channels); close some (each name needs only one)"
            )
        if sum(r.target == target for r in held) >= limits.max_channels_to_one_name:
            raise BusyError(
                f"this endpoint already holds {limits.max_channels_to_one_name} channels to "
                f"{target!r}; one is enough: reuse it"
            )
        served = sum(r.server == server.id for r in self.records.values())
        if served >= limits.max_served_channels:
            raise BusyError(
                f"the owner of {target!r} serves {served} callers, its maximum "
                "(Limits.max_served_channels); retry later"
            )

    def _relay(
        self,
        tg: anyio.abc.TaskGroup,
        client: Session,
        server: Session,
        token: int,
        target: str,
        handle: ChannelHandle,
        correlation: int,
    ) -> None:
        """Hold the caller's side for a caller over a region (bus/_relay.py) and tell it the
        channel is ready on its session channel, with no fds."""
        relay = open_relay(client, token, handle)  # takes the handle's fds

        async def run() -> None:
            try:
                await run_relay(client, token, relay)
            finally:
                if self.records.pop(token, None) is not None and not client.closed:
                    reason = f"the owner of {target!r} closed the channel"
                    client.deliver(
                        encode(Kind.CONTROL, ChannelRevoke(token, reason=reason)),
                        droppable=False,
                    )

        tg.start_soon(run)
        ready = ChannelReady(
            token,
            "client",
            target,
            server.id,
            server.identity.name,
            server.identity.instance,
            server.identity.uid,
            server.identity.pid,
        )
        client.deliver(encode(Kind.CONTROL, ready, correlation=correlation), droppable=False)

    async def _hand_over(
        self,
        tg: anyio.abc.TaskGroup,
        client: Session,
        server: Session,
        target: str,
        correlation: int,
    ) -> None:
        token = next(self._tokens)
        try:
            left, right = create_channel_handles(self._limits.channel_capacity)
        except OSError as exc:  # out of fds or memory: refuse this call, keep serving
            log.warning("cannot create a direct channel", target=target, error=str(exc))
            self._fail(
                client,
                correlation,
                BusyError(f"the hub cannot set up a channel to {target!r} now ({exc.strerror})"),
            )
            return
        # Recorded before the hand-over: if the name moves meanwhile, the client is told.
        self.records[token] = ChannelRecord(token, target, client.id, server.id)
        try:
            for session, peer, role, handle, corr in (
                (server, client, "server", right, 0),
                (client, server, "client", left, correlation),
            ):
                if session.sock is None:  # a caller over a region: the hub holds its side
                    self._relay(tg, session, peer, token, target, left, corr)
                    continue
                ready = ChannelReady(
                    token,
                    role,
                    target,
                    peer.id,
                    peer.identity.name,
                    peer.identity.instance,
                    peer.identity.uid,
                    peer.identity.pid,
                )
                assert session.sock is not None  # open() refuses sessions over a region
                async with session.socket_lock:
                    await send_handle(
                        session.sock, encode(Kind.CONTROL, ready, correlation=corr), handle
                    )
            self._counters["channels"] += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.records.pop(token, None)
            if not client.closed:
                self._fail(
                    client, correlation, NoRespondersError(f"the owner of {target!r} went away")
                )
        finally:
            left.close()
            right.close()

    async def hand_over_attachment(self, session: Session, correlation: int) -> None:
        """A new socket bound to the requester's own instance, for a process it starts there."""
        instance = session.identity.instance
        if session.sock is None:
            error = RefusedError(
                "an attachment is a socket, and this endpoint is attached over a region shared "
                "with another kernel, where no file descriptor can be handed over"
            )
            self._fail(session, correlation, error)
            return
        # Bound to the requester's instance and uid: an attachment never widens who it is.
        try:
            theirs = self._open_instance_socket(instance, uid=session.identity.uid)
        except OSError as exc:
            log.warning("cannot make an attachment", endpoint=session.id, error=str(exc))
            self._fail(session, correlation, BusyError(f"no attachment now ({exc.strerror})"))
            return
        try:
            ready = ChannelReady(0, "attach", "", session.id, peer_instance=instance)
            frame = encode(Kind.CONTROL, ready, correlation=correlation)
            async with session.socket_lock:
                await send_with_fds(session.sock, frame, [theirs.fileno()])
        except (anyio.BrokenResourceError, OSError):
            pass  # the requester went away; the served end sees EOF and ends
        finally:
            theirs.close()

    def side_of(self, session: Session, token: int) -> ChannelRecord | None:
        """The record of channel `token` if `session` is one of its two sides, else None."""
        record = self.records.get(token)
        if record is not None and session.id in (record.client, record.server):
            return record
        return None

    def forget_endpoint(self, endpoint: int) -> None:
        for token, record in list(self.records.items()):
            if endpoint in (record.client, record.server):
                del self.records[token]

    def recheck(self, policy: Policy) -> None:
        """After a policy reload: revoke every channel the new policy refuses, on both sides."""
        for token, record in list(self.records.items()):
            client, server = self._sessions.get(record.client), self._sessions.get(record.server)
            if client is None or server is None:
                continue
            decision = policy.may_connect(client.identity, server.identity, record.target)
            if not decision:
                del self.records[token]
                end_relay(client, token)
                revoke = encode(Kind.CONTROL, ChannelRevoke(token, reason=decision.reason))
                client.deliver(revoke, droppable=False)
                server.deliver(revoke, droppable=False)

    def clients_of(self, name: str) -> list[int]:
        """The endpoints that hold a channel to `name` (they hear when its owner changes)."""
        return [r.client for r in self.records.values() if r.target == name]

    def info(self) -> tuple[ChannelInfo, ...]:
        records = self.records.values()
        return tuple(ChannelInfo(c.token, c.target, c.client, c.server) for c in records)
