"""Endpoints: how applications, services and tools talk on the bus.

`connect()` attaches to the hub and returns an `Endpoint`: `publish` and `subscribe` (through the
hub, with `*`/`>` wildcards and queue groups), `request` and `request_stream` (inter-instance RPC
over direct shared-memory channels the hub sets up), `service()` to serve typed methods under a
well-known name, `introspect()` and `monitor()` for inspection. Everything is anyio-based, so it
runs under asyncio, uvloop and trio; errors are the protocol's (`NoRespondersError`,
`AccessDeniedError`, `DeadlineExceededError`, ...) and a lost hub is `HubUnavailableError`.
`retrying(endpoint, within=...)` retries idempotent calls across a failed instance's replacement.

Actors and plugins are written against `Bus`, a protocol that `Endpoint` and the in-memory double
(`multikernel.bus.testing.MemoryEndpoint`) both satisfy. `multikernel.endpoints.log` is the one
logging setup of every layer above shm; `multikernel.endpoints.wire` is the control socket's
framing, shared with the hub.
"""

from multikernel.endpoints._connect import connect as connect
from multikernel.endpoints._contracts import Bus as Bus
from multikernel.endpoints._direct import Peer as Peer
from multikernel.endpoints._direct import current_caller as current_caller
from multikernel.endpoints._endpoint import Endpoint as Endpoint
from multikernel.endpoints._hublink import HubUnavailableError as HubUnavailableError
from multikernel.endpoints._retry import Retrying as Retrying
from multikernel.endpoints._retry import retrying as retrying
from multikernel.endpoints._service import Service as Service
from multikernel.endpoints._subscription import DEFAULT_PATIENCE as DEFAULT_PATIENCE
from multikernel.endpoints._subscription import Message as Message
from multikernel.endpoints._subscription import Subscription as Subscription
from multikernel.endpoints._subscription import (
    SubscriptionStatistics as SubscriptionStatistics,
)
from multikernel.endpoints.wire import default_socket_path as default_socket_path
