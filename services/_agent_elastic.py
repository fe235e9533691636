"""The instance's side of elastic grants, in its agent: asking to grow or shrink, reporting load.

An application inside the instance asks its agent, `instance.<id>.agent`, method `elastic`,
with an `ElasticRequest` (more or fewer CPUs or memory); only a caller on this instance may
(`ask`). The agent forwards it to `resource.elastic` as itself: the hub bound the agent to its
instance when it attached, so the resource actor knows which grant is asked about without
trusting the message. The resource actor runs the change as a transaction like any other, which
comes back to this agent's `resource` method (`_agent_resources`) before the answer does: the
application gets the `Grant` once the instance has applied it, or the refusal (beyond the host's
bounds, not free, memory in use).

`report_load` publishes a `LoadReport` (`_load`) on `mk.instance.<id>.load` every `period`
seconds, for the host's rebalancer and anyone else allowed to watch. Each report says which
grant it was measured under (the transaction it comes from); one whose period spans a change of
grant carries the old one, so a rebalancer that wants the new grant's load ignores it.
"""

from __future__ import annotations

from functools import partial

import anyio
import anyio.to_thread

from multikernel.endpoints import Bus, current_caller
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    LOAD_SUBJECT,
    AccessDeniedError,
    ElasticRequest,
    Grant,
    NoRespondersError,
)
from multikernel.services._agent_resources import InstanceResources
from multikernel.services._load import LoadSampler

log = get_logger("multikernel.agent")
#: Seconds between load reports, unless $MULTIKERNEL_LOAD_PERIOD says otherwise (0: none).
LOAD_SECONDS = 2.0


async def ask(bus: Bus, instance: int, request: ElasticRequest) -> Grant:
    """The agent's `elastic` method: forward an application's request as this instance."""
    caller = current_caller().instance
    if caller != instance:
        raise AccessDeniedError(
            f"instance {caller} may not grow or shrink instance {instance}: only its own "
            "applications ask (the host's operator uses mkctl update)"
        )
    try:
        grant: Grant = await bus.request("resource", "elastic", request, response=Grant)
    except NoRespondersError:
        raise NoRespondersError(
            "the resource actor is not running, so the instance cannot grow or shrink now; "
            "the host restarts it: ask again later"
        ) from None
    log.info(
        "elastic grant", instance=instance, tx=grant.tx, cpus=list(grant.cpus),
        memory=grant.memory,
    )  # fmt: skip
    return grant


async def report_load(
    bus: Bus, resources: InstanceResources, sampler: LoadSampler, period: float
) -> None:
    """Publish a `LoadReport` every `period` seconds until cancelled."""
    subject = LOAD_SUBJECT.format(id=resources.instance)

    def grant() -> tuple[int, int, int]:
        return resources.tx, len(resources.cpus), resources.memory

    seq, since = 0, grant()
    while True:
        # The period ending now was measured under the grant held when it began (`since`); a
        # change during it leaves the report on the old grant, which a rebalancer ignores.
        now = grant()
        tx, cpus, memory = since
        report = await anyio.to_thread.run_sync(
            partial(sampler.report, resources.instance, seq, tx=tx, cpus=cpus, memory=memory)
        )
        since = now
        if report is not None:
            await bus.publish(subject, report)
            seq += 1
        await anyio.sleep(period)
