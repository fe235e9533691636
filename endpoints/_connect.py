"""`connect()`: find the hub, attach, and hand the caller an `Endpoint` for the block's life.

The hub is found, in order, at the path given, on a connected socket given as `fd`, on the socket
this process inherited at spawn ($MULTIKERNEL_BUS_FD: processes started inside an instance), or at
`default_socket_path()` ($MULTIKERNEL_BUS, else a per-user or system path). Attaching happens
before the endpoint's task group starts, so a missing hub is one clean `HubUnavailableError`.

An inherited socket attaches once. A process that inherited one and also has $MULTIKERNEL_BUS
(the lifecycle sets both for an instance's agent, which passes them on to its workload)
re-attaches there when the hub restarts: the hub then learns the process's instance from the
kernel (its PID namespace or cgroups, through the host's `instance_of`), not from what it says.

An exception raised in the caller's block reaches the caller as itself: the endpoint's task group
would wrap it in an `ExceptionGroup` (it is raised inside the group's scope), so the block's own
exception is caught at the `yield`, the group is cancelled and closed, and the exception is raised
again outside it. Users write `except NoRespondersError` around the block and it matches. A failure
of the endpoint's own tasks (a single one) is unwrapped the same way; cancellation is re-raised,
never swallowed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints.wire import ENV_FD, ENV_SOCKET, default_socket_path
from multikernel.shm import Channel, WaitPolicy


@asynccontextmanager
async def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    fd: int | None = None,
    channel: Channel | None = None,
    name: str = "",
    wait: WaitPolicy | None = None,
    reconnect: bool = True,
) -> AsyncIterator[Endpoint]:
    """Attach to the hub; detach (closing subscriptions and channels) on exit.

    The hub is found at `path`, else on the connected socket `fd` (which the endpoint then owns),
    else on the socket this process inherited ($MULTIKERNEL_BUS_FD, set for processes started
    inside an instance), else at `default_socket_path()`. With `reconnect`, a hub restart is
    survived: the endpoint re-attaches and re-registers; over an inherited socket only when
    $MULTIKERNEL_BUS says where the hub listens (else its next send raises HubUnavailableError).

    With `channel`, the hub is on the other side of that session channel, already open in a
    region shared with the hub's kernel (an ivshmem device's memory in a guest): Hello goes on
    it, nothing is looked up, there is no socket (so no direct channels: calls to services are
    refused with RefusedError) and no re-attach; the endpoint owns `channel`.
    """
    inherited = False
    if channel is not None:
        if path is not None or fd is not None:
            channel.close()
            raise ValueError("connect() takes one of path, fd and channel")
        reconnect = False
    if path is None and fd is None and channel is None and (env_fd := os.environ.get(ENV_FD)):
        fd = int(env_fd)
        os.environ.pop(ENV_FD)  # one owner: children do not inherit a claim to it
        inherited = True
    if path is not None:
        where: Path | None = Path(path)
    elif channel is not None:
        where = None
    elif fd is None:
        where = default_socket_path()
    else:  # an inherited socket re-attaches where $MULTIKERNEL_BUS says, if it says
        where = default_socket_path() if inherited and os.environ.get(ENV_SOCKET) else None
    endpoint = Endpoint(name or f"pid{os.getpid()}", where, fd, wait, reconnect, channel)
    link = endpoint._link
    sock, session = await link.open_session()  # before the task group: a clean error
    raised: BaseException | None = None  # by the caller's block: re-raised outside the group
    try:
        async with anyio.create_task_group() as tg:
            link.tg = tg
            await tg.start(link.run_sessions, sock, session)
            try:
                yield endpoint
            except BaseException as exc:  # re-raised below, after the group has closed
                raised = exc
            finally:
                link.closing = True
                for sub in list(endpoint._subs.values()):
                    await sub.aclose()
                await endpoint._flush_mirror_now()  # a monitor sees a short-lived caller's frames
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrapped(group) from None
    finally:
        endpoint._clients.close()
    if raised is not None:
        raise raised


def _unwrapped(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception of a single-exception group (nested ones too); else the group."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group
