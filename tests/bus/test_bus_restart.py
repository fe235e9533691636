"""The hub is not on the data path: restarting it does not stop established traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import connect
from multikernel.protocol import NameOwnerChanged
from tests._children import end

from .conftest import PATIENCE, Peer, spawn

pytestmark = pytest.mark.anyio


@contextmanager
def hub_process(socket_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "multikernel.bus", "--socket", str(socket_path)],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield proc
    finally:
        end(proc)
        assert proc.stderr is not None
        proc.stderr.close()


async def listening(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the hub's "hub listening" log line (JSON on stderr)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    buffer = b""
    with anyio.fail_after(PATIENCE):
        while True:
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 65536)
            assert chunk, "the hub exited before listening"
            buffer += chunk
            for line in buffer.split(b"\n"):
                if line.startswith(b"{") and json.loads(line).get("event") == "hub listening":
                    return


async def test_traffic_keeps_flowing_while_the_hub_restarts(socket_path: Path) -> None:
    with hub_process(socket_path) as first:
        await listening(first)
        with spawn("serve", socket_path, "svc") as server:
            await server.expect("ready")
            with spawn("calls", socket_path, "svc", "caller") as client:
                await client.expect("ready")
                await keeps_flowing(first, server, client, socket_path)


class Results:
    """The caller's results, checked to be consecutive: a failed call shows as an `error`
    event (`expect` fails on it) or a gap in the numbers."""

    def __init__(self, client: Peer) -> None:
        self.client = client
        self.last: int | None = None

    async def after(self, since: float, count: int) -> None:
        """`count` consecutive results of calls made after `since` (CLOCK_MONOTONIC)."""
        seen = 0
        while seen < count:
            result = await self.client.expect("result")
            if self.last is not None:
                assert result["value"] == self.last + 1, "a call failed or was lost"
            self.last = result["value"]
            seen += result["t"] > since


async def keeps_flowing(
    first: subprocess.Popen[bytes], server: Peer, client: Peer, socket_path: Path
) -> None:
    results = Results(client)
    await results.after(0, 20)

    first.send_signal(signal.SIGKILL)  # no goodbye: endpoints see their sessions break
    first.wait(timeout=20)
    await results.after(time.monotonic(), 50)  # the direct channel needs no hub

    with hub_process(socket_path) as second:
        await listening(second)
        async with connect(socket_path, name="newcomer") as newcomer:
            async with await newcomer.subscribe("mk.bus.names.>") as names:
                owned = set((await newcomer.introspect()).names)
                with anyio.fail_after(PATIENCE):
                    while not {"svc", "caller"} <= owned:  # each re-attaches in its own time
                        change = (await names.receive()).decode(NameOwnerChanged)
                        if change.new_owner:
                            owned.add(change.name)
            snapshot = await newcomer.introspect()
            roles = {e.name.split("-")[0] for e in snapshot.endpoints}
            assert {"serve", "calls"} <= roles  # both re-attached on their own
            assert (await newcomer.request("svc", "whoami", None))["caller"] == newcomer.id
        await results.after(time.monotonic(), 20)  # made after the new hub took over
        assert await client.stop() == 0
        assert await server.stop() == 0


async def test_endpoint_waits_for_the_hub_instead_of_failing_a_publish(socket_path: Path) -> None:
    with hub_process(socket_path) as first:
        await listening(first)
        async with connect(socket_path, name="publisher") as publisher:
            await publisher.service("publisher").start()  # announced when it re-attaches
            first.kill()
            first.wait(timeout=20)
            async with anyio.create_task_group() as outage:
                # Written into the dead hub's ring before the endpoint notices (and lost: at most
                # once), or waiting for the new hub: never an error.
                outage.start_soon(publisher.publish, "after.restart", "during the outage")
                with hub_process(socket_path) as second:
                    await listening(second)
                    async with (
                        connect(socket_path) as subscriber,
                        await subscriber.subscribe("after.restart") as sub,
                        await subscriber.subscribe("mk.bus.names.publisher") as names,
                    ):
                        if "publisher" not in (await subscriber.introspect()).names:
                            with anyio.fail_after(PATIENCE):
                                await names.receive()  # it re-attached on its own
                        await publisher.publish("after.restart", "made it")
                        with anyio.fail_after(PATIENCE):
                            while (value := (await sub.receive()).value()) != "made it":
                                assert value == "during the outage"


async def test_a_service_started_as_the_hub_dies_is_started_on_the_next_hub(
    socket_path: Path,
) -> None:
    """The hub goes away between a service's name request and its answer: `start()` returns
    once the next hub has it, instead of failing the workload (it re-attaches anyway)."""
    with hub_process(socket_path) as first:
        await listening(first)
        async with connect(socket_path, name="late") as ep:
            first.send_signal(signal.SIGSTOP)  # takes the request, never answers it
            service = ep.service("late.svc")
            started: list[object] = []
            done = anyio.Event()

            async def start() -> None:
                started.append(await service.start())
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(start)
                await anyio.wait_all_tasks_blocked()  # the request waits for its answer
                assert not started
                first.kill()
                first.wait(timeout=20)
                with hub_process(socket_path) as second:
                    await listening(second)
                    with anyio.fail_after(PATIENCE):
                        await done.wait()
                    assert service.primary
                    async with connect(socket_path) as caller:
                        assert "late.svc" in (await caller.introspect()).names
