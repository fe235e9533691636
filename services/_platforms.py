"""A host's platforms, chosen per instance: `local` by default, `qemu` for an instance created so.

`Platforms` is itself a platform (the lifecycle actor sees one), which launches each spec on the
platform it names (`LaunchSpec.platform`, "" for the default) and sends every other call to the
platform that launched the instance (`InstanceProcess.platform`). What a restarted host needs
(`record`, `adopt`, `reclaim_record`, `reclaim_unit`) goes by the record's platform: a record of
the `qemu` platform starts with `qemu `, the others are the default's.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from multikernel.services._platform import (
    Capabilities,
    InstanceProcess,
    InvalidSpecError,
    IsolationReport,
    LaunchSpec,
    Platform,
    Resources,
)


@runtime_checkable
class _Recoverable(Protocol):
    def record(self, proc: InstanceProcess) -> str: ...

    def adopt(self, spec: LaunchSpec, record: str) -> InstanceProcess | None: ...

    async def reclaim_record(self, record: str) -> None: ...

    async def reclaim_unit(self, unit: str) -> None: ...


class Platforms:
    """The host's platforms behind one (see the module docstring)."""

    def __init__(self, default: Platform, *others: Platform) -> None:
        self.default = default
        self.name = default.name
        self.by_name: dict[str, Platform] = {p.name: p for p in (default, *others)}

    def get(self, name: str) -> Platform:
        """The platform called `name` ("": the default); InvalidSpecError naming the others."""
        platform = self.by_name.get(name or self.name)
        if platform is None:
            raise InvalidSpecError(
                f"this host has no platform {name!r}: it runs {', '.join(sorted(self.by_name))}"
            )
        return platform

    @property
    def cgroup_parents(self) -> list[object]:
        parents: list[object] = getattr(self.default, "cgroup_parents", [])
        return parents

    def capabilities(self) -> Capabilities:
        return self.default.capabilities()

    async def prepare(
        self, name: str, instance_id: int, resources: Resources, *, load: bool
    ) -> None:
        """The default platform's: the lifecycle asks an instance's own platform itself (it
        knows which one the instance was created for; this call does not say)."""
        await self.default.prepare(name, instance_id, resources, load=load)

    async def release(self, name: str, instance_id: int) -> None:
        """The default platform's (see `prepare`)."""
        await self.default.release(name, instance_id)

    async def launch(self, spec: LaunchSpec) -> InstanceProcess:
        return await self.get(spec.platform).launch(spec)

    async def update(self, proc: InstanceProcess, resources: Resources) -> None:
        await proc.platform.update(proc, resources)

    async def wait(self, proc: InstanceProcess) -> int:
        return await proc.platform.wait(proc)

    def signal(self, proc: InstanceProcess, signum: int) -> None:
        proc.platform.signal(proc, signum)

    async def kill(self, proc: InstanceProcess) -> None:
        await proc.platform.kill(proc)

    async def reclaim(self, proc: InstanceProcess) -> None:
        await proc.platform.reclaim(proc)

    def inspect(self, proc: InstanceProcess) -> IsolationReport:
        return proc.platform.inspect(proc)

    def instance_of(self, pid: int) -> int:
        """Which instance process `pid` is part of (the default platform's answer, for the hub:
        a guest's processes are in another kernel, where no pid of ours reaches)."""
        instance_of = getattr(self.default, "instance_of", None)
        return int(instance_of(pid)) if instance_of is not None else 0

    # -- a restarted host ---------------------------------------------------------------------

    def _recorder(self, record: str) -> _Recoverable | None:
        name = record.partition(" ")[0] if record.startswith("qemu ") else self.name
        platform = self.by_name.get(name)
        return platform if isinstance(platform, _Recoverable) else None

    def record(self, proc: InstanceProcess) -> str:
        platform = proc.platform
        return platform.record(proc) if isinstance(platform, _Recoverable) else ""

    def adopt(self, spec: LaunchSpec, record: str) -> InstanceProcess | None:
        platform = self._recorder(record)
        return platform.adopt(spec, record) if platform is not None else None

    async def reclaim_record(self, record: str) -> None:
        platform = self._recorder(record)
        if platform is not None:
            await platform.reclaim_record(record)

    async def reclaim_unit(self, unit: str) -> None:
        for platform in self.by_name.values():
            if isinstance(platform, _Recoverable):
                await platform.reclaim_unit(unit)
