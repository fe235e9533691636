"""An in-memory bus for tests: the hub's rules and the endpoint's API, without shared memory.

Test a plugin's services and subscribers in one process, under asyncio, uvloop or trio, with no
hub, socket or shared-memory region::

    from multikernel.bus.testing import MemoryBus

    bus = MemoryBus()                                  # or MemoryBus(Policy.from_toml(...))
    async with bus.connect("plugin") as server, bus.connect("test", instance=1) as client:
        await install(server)                          # the plugin's code, unchanged
        assert await client.request("plugin", "ping", response=str) == "pong"
        assert bus.snapshot().names == {"plugin": (server.id,)}

`MemoryBus.connect()` gives a `MemoryEndpoint`, which has `Endpoint`'s methods (`publish`,
`subscribe`, `request`, `request_stream`, `service`, `drain`, `introspect`, `statistics`) and
hands out the real `Subscription`, `Message` and `Service`. The bus is built from the hub's own
pieces (`SubjectRouter`, `NameRegistry`, `Policy`, the protocol's `encode`, `decode_body` and
errors), so subjects, queue groups, name hand-off, access decisions, body encoding, typed replies,
deadlines and errors behave as on the real bus. docs/testing.md says what differs (timing, mostly:
a publication is in the subscribers' buffers when `publish` returns).
"""

from multikernel.bus._memory_bus import MemoryBus as MemoryBus
from multikernel.bus._memory_endpoint import MemoryEndpoint as MemoryEndpoint

__all__ = ["MemoryBus", "MemoryEndpoint"]
