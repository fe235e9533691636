"""Holding a name stops its callers for a while: only its owner, or whoever may own it, may."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.protocol import AccessDeniedError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.default())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        yield hub
        tg.cancel_scope.cancel()


async def test_a_guest_cannot_hold_or_move_someone_elses_name(hub: Hub) -> None:
    async with connect(hub.path, name="owner") as owner:
        service = owner.service("svc")

        @service.method
        async def whoami(_: None) -> int:
            return owner.id

        await service.start()
        guest_socket = hub.open_instance_socket(instance=3)
        async with connect(fd=guest_socket.detach(), name="guest") as guest:
            with pytest.raises(AccessDeniedError, match="holding or moving 'svc' refused"):
                await guest.hold_names(["svc"], hold_for=5)
            with pytest.raises(AccessDeniedError, match="holding or moving 'svc' refused"):
                await guest.switch_names({"svc": guest.id})
            with pytest.raises(AccessDeniedError, match=f"endpoint {guest.id} may not own 'svc'"):
                await owner.switch_names({"svc": guest.id})  # nor be given it by the owner
        snapshot = await owner.introspect()
        assert snapshot.names == {"svc": (owner.id,)}
        assert snapshot.counters["holds"] == 0
