"""The lifecycle actor's side of the resource actor: what it asks for, and what it hears back.

The lifecycle actor picks no CPU, memory or queue itself: `ResourceClient` turns a create or an
update into a `GrantRequest` (`asked`), sends it to `resource` (`change`: allocate or update;
the resource actor places it and, for a running instance, applies it with the instance's agent
before it answers), gives grants back (`release`), reads the grant an instance is launched with
(`current`), tells the resource actor which instances exist when the lifecycle actor starts
(`reconcile`: the grants of any other are released), and keeps each instance's resources in step
with what the resource actor commits for its own reasons (`follow`, on `mk.resource.*.tx`).
The resource actor's refusals reach the caller as they are: they name the holder and what is
free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import msgspec

from multikernel.endpoints import Bus, Subscription
from multikernel.endpoints.log import get_logger
from multikernel.protocol import (
    CpuSpec,
    CreateInstance,
    Grant,
    GrantList,
    GrantRequest,
    GrantsQuery,
    InstanceRef,
    MultikernelError,
    NoRespondersError,
    NotFoundError,
    Reconcile,
    Release,
    TxRecord,
    UnknownGrantError,
    UpdateInstance,
    format_cpu_list,
    format_size,
)
from multikernel.services._instances import Instance, InstanceError, InstanceRefusedError

log = get_logger("multikernel.lifecycle")


def describe(grant: Grant) -> str:
    """'CPUs 0-1, 256 MiB' (and the queues), for state changes and logs."""
    queues = f", queues {', '.join(grant.queues)}" if grant.queues else ""
    return f"CPUs {format_cpu_list(grant.cpus)}, {format_size(grant.memory)}{queues}"


def _unknown(error: NotFoundError) -> bool:
    return error.remote_type == UnknownGrantError.__name__


class ResourceClient:
    """Requests to the `resource` service for the lifecycle actor (see the module docstring)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def asked(
        self, inst: Instance, request: CreateInstance | UpdateInstance
    ) -> GrantRequest | None:
        """The grant request a create or update makes; None when it asks for no resources."""
        if request.cpus and request.cpu_count:
            raise InstanceRefusedError(
                "give CPU ids or a CPU count, not both (--cpus 2 or --cpus @0-1)"
            )
        if not (request.cpus or request.cpu_count or request.memory or request.queues is not None):
            return None
        cpus = None
        if request.cpus:
            cpus = CpuSpec(ids=tuple(sorted(set(request.cpus))))
        elif request.cpu_count:
            cpus = CpuSpec(count=request.cpu_count)
        elif isinstance(request, CreateInstance) and request.memory:
            cpus = CpuSpec(count=1)  # `mkctl create web --memory 256M`: one CPU, placed by policy
        return GrantRequest(inst.name, inst.id, cpus, request.memory, request.queues)

    async def change(self, method: str, asked: GrantRequest) -> Grant:
        """`allocate` or `update`: the grant as committed."""
        return await self._ask(method, asked)

    async def release(self, inst: Instance) -> None:
        try:
            await self._ask("release", Release(inst.name))
        except NotFoundError as error:
            if not _unknown(error):
                raise  # else: released already (reconciled away)

    async def current(self, inst: Instance) -> Grant | None:
        """The grant the resource actor holds for `inst` (None: none, or no resource actor)."""
        try:
            found = await self.bus.request(
                "resource", "grants", GrantsQuery(inst.name), response=GrantList
            )
        except NotFoundError as error:
            if _unknown(error):
                return None
            raise
        except NoRespondersError:
            return None  # launch with what we last heard
        return found.grants[0] if found.grants else None

    async def reconcile(self, instances: Iterable[Instance]) -> None:
        """Tell the resource actor which instances exist; it releases the others' grants."""
        known = tuple(InstanceRef(i.name, i.id) for i in instances)
        try:
            released = await self.bus.request(
                "resource", "reconcile", Reconcile(known), response=GrantList
            )
        except NoRespondersError:
            log.warning("no resource actor to reconcile with: stale grants stay until it runs")
            return
        for grant in released.grants:
            log.info("stale grant released", instance=grant.instance, grant=describe(grant))

    async def refresh(
        self, instances: Iterable[Instance], save: Callable[[Instance], None]
    ) -> None:
        """After `reconcile`: each instance's resources as the resource actor holds them (an
        update committed there just before a host crash is taken up here). An instance stored with
        resources the resource actor has no grant for (its resource.db lost) asks for the same
        CPUs, memory and queues again; if they are taken, it is logged and it keeps none."""
        try:
            found = await self.bus.request("resource", "grants", GrantsQuery(), response=GrantList)
        except NoRespondersError:
            return
        grants = {(g.instance, g.instance_id): g for g in found.grants}
        for inst in instances:
            grant = grants.get((inst.name, inst.id))
            if grant is None and inst.resources is not None:
                asked = GrantRequest(
                    inst.name, inst.id, CpuSpec(ids=tuple(sorted(inst.resources.cpus))),
                    inst.resources.memory, inst.queues,
                )  # fmt: skip
                try:
                    grant = await self._ask("allocate", asked)
                except MultikernelError as error:
                    log.warning(
                        "stored resources not granted: the instance has none now",
                        instance=inst.name, error=str(error),
                    )  # fmt: skip
                    inst.resources, inst.queues, inst.resource_tx = None, (), 0
                    save(inst)
                    continue
            if grant is not None and grant.tx != inst.resource_tx:
                inst.grant(grant)
                save(inst)

    async def follow(
        self,
        records: Subscription,
        instances: Mapping[str, Instance],
        save: Callable[[Instance], None] | None = None,
    ) -> None:
        """Keep each instance's resources as the resource actor last committed them (stored
        with `save`)."""
        async for message in records:
            try:
                record = message.decode(TxRecord)
            except msgspec.ValidationError:
                continue
            inst, after = instances.get(record.instance), record.after
            if (
                record.state == "committed" and after is not None and after.cpus
                and inst is not None and inst.id == record.instance_id
            ):  # fmt: skip
                inst.grant(after)
                if save is not None:
                    save(inst)

    async def _ask(self, method: str, body: object) -> Grant:
        try:
            grant: Grant = await self.bus.request("resource", method, body, response=Grant)
        except NoRespondersError:
            raise InstanceError(
                "the resource actor is not running, so nothing can be granted or given back: "
                "see the host's log (the host restarts it)"
            ) from None
        return grant
