"""An endpoint that attacks its session channel cannot stop the hub serving everyone else."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import connect

from ._util import hostile, hub_process, listening

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def test_a_hostile_endpoint_cannot_kill_or_block_the_hub(tmp_path: Path) -> None:
    """It tries to truncate its session region (SIGBUS in the hub, once) and jams its doorbells
    (a hub blocked in a write, once); the hub rings it at every publication and serves on."""
    socket_path = tmp_path / "bus.sock"
    with hub_process(socket_path) as hub:
        await listening(hub)
        with hostile("hub", str(socket_path), []) as peer:
            jammed = await peer.report()
            assert [jammed[k] for k in ("welcome", "shrink", "grow")] == [
                "Welcome",
                "EPERM",
                "EPERM",
            ]
            async with (
                connect(socket_path, name="bystander") as bystander,
                await bystander.subscribe("attack.>") as echo,
            ):
                with anyio.fail_after(30):
                    # One at a time, so the hub delivers (and rings the attacker) for each: more
                    # rings than the attacker's one-page pipe holds.
                    for i in range(jammed["pipe_size"] + 100):
                        await bystander.publish("attack.x", i)
                        assert (await echo.receive()).value() == i
                    snapshot = await bystander.introspect()
                (attacker,) = (e for e in snapshot.endpoints if e.name == "hostile")
                assert attacker.frames_out > jammed["pipe_size"]  # each one came with a ring
                await peer.exit()  # it exits holding everything
                with anyio.fail_after(30):
                    await bystander.publish("attack.x", -1)
                    assert (await echo.receive()).value() == -1
        assert hub.poll() is None  # alive and well
