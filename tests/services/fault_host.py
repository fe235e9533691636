"""An in-process host with its fault actor (a process of its own), for the fault tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from multikernel.endpoints import Endpoint, Subscription, connect
from multikernel.protocol import (
    FaultEvent,
    FaultStatusList,
    FaultStatusRequest,
    InstanceStateChanged,
)
from multikernel.services._host import HostConfig, run_host

from .fault_kit import PATIENCE, POLICY, owned

#: Agents beat every 0.2 s in these tests: a hang is found in about a second.
HEARTBEAT = 0.2


@dataclass
class FaultHost:
    ep: Endpoint
    root: Path
    config: HostConfig

    async def status(self, name: str = "") -> FaultStatusList:
        return await self.ep.request(
            "fault", "status", FaultStatusRequest(name), response=FaultStatusList
        )


@asynccontextmanager
async def fault_host(root: Path, cert: Path, **settings: Any) -> AsyncIterator[FaultHost]:
    """A host (hub, lifecycle, fault actor) on `root`, and an endpoint of the test's on it."""
    config = HostConfig(
        root / "bus.sock",
        root / "state",
        policy_text=POLICY,
        trusted=[cert],
        heartbeat=HEARTBEAT,
        # These tests are about faults: several 1-CPU instances share a 2-CPU machine.
        **{"cpu_share": 4, **settings},
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        try:
            async with connect(config.socket, name="test") as ep:
                if config.fault:
                    await owned(ep, "fault")
                yield FaultHost(ep, root, config)
        finally:
            stop.set()


async def next_event(
    events: Subscription, kind: str, seen: list[FaultEvent] | None = None
) -> FaultEvent:
    """The next fault event of `kind` (the ones before it go to `seen`)."""
    with anyio.fail_after(PATIENCE):
        async for message in events:
            event = message.decode(FaultEvent)
            if seen is not None:
                seen.append(event)
            if event.event == kind:
                return event
    raise AssertionError("the subscription ended")


async def next_state(states: Subscription, new: str) -> InstanceStateChanged:
    with anyio.fail_after(PATIENCE):
        async for message in states:
            change = message.decode(InstanceStateChanged)
            if change.new == new:
                return change
    raise AssertionError("the subscription ended")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
