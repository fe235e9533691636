"""The host's end of a grant: what the platform changes so an instance may use what it holds.

On a multikernel machine a grant is a device-tree overlay the host kernel applies (the CPU moves
from the pool to the instance) before the instance's kernel is told (`MK_RES_CPU_ADD`). On the
local platform the boundary an instance cannot cross is its cgroups: `LocalHostSide` writes the
instance's `cpuset.cpus` and memory limit, found by the instance's name (the resource actor is a
process of its own; the lifecycle actor's platform made them at launch), and, where the machine
partitions its caches, resizes its resctrl group to the share of its new CPUs. An instance that
is not running has no cgroups, and nothing is done: the platform applies the grant at the next
launch.

`apply(instance, cpus, memory, running=...)` sets the CPUs, and the memory limit unless `memory`
is None. `running` says the instance's agent has just answered: its cgroups must then be there,
and not finding them (a resource actor whose platform looks under another cgroup group than the
host's) is an error, not a silent grant that changes nothing.
Lowering the limit below what the instance uses is refused before anything is written, with both
sizes (`HostSideError`); the kernel would refuse it too (EBUSY), and never OOM-kills for it.
`NoHostSide` does nothing: a synthetic pool (benchmarks, tests on a fake machine) has no
cgroups to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from multikernel.protocol import MultikernelError, format_size
from multikernel.services._local import LocalPlatform
from multikernel.services._platform import PlatformError


class HostSideError(MultikernelError):
    """The host could not apply its side of a grant; the message says why."""


class HostSide(Protocol):
    """Applies grants at the host's end (see the module docstring). `devices` are the PCI
    addresses of the devices the grant lends (None: unchanged); only a multikernel kernel
    lends whole devices to an instance."""

    async def apply(
        self,
        instance: str,
        cpus: frozenset[int],
        memory: int | None,
        *,
        running: bool = False,
        devices: frozenset[str] | None = None,
    ) -> None: ...


class NoHostSide:
    """Nothing to apply at the host's end."""

    async def apply(
        self,
        instance: str,
        cpus: frozenset[int],
        memory: int | None,
        *,
        running: bool = False,
        devices: frozenset[str] | None = None,
    ) -> None:
        return None


class LocalHostSide:
    """The instance's cpuset and memory cgroups, on the local platform."""

    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform

    async def apply(
        self,
        instance: str,
        cpus: frozenset[int],
        memory: int | None,
        *,
        running: bool = False,
        devices: frozenset[str] | None = None,  # a process tree is lent no whole device
    ) -> None:
        trees = self.platform.instance_cgroups(instance)
        if not trees:
            caps = self.platform.capabilities()
            if running and (caps.cpuset or caps.memory_limit):
                raise HostSideError(
                    f"{instance!r} runs, but it has no cgroup where this host's platform puts "
                    "them: the resource actor and the host must use the same cgroup group"
                )
            return
        try:
            for groups in trees:  # its own tree, and a warm standby's: one grant for both
                if memory is not None and groups.memory is not None:
                    used = _usage(groups.memory)
                    if used > memory:
                        raise HostSideError(
                            f"{instance!r} uses {format_size(used)} of memory, more than the "
                            f"{format_size(memory)} asked: free memory inside it or ask for more"
                        )
            for groups in trees:
                try:
                    if memory is not None:
                        groups.set_memory(memory)
                    groups.set_cpus(cpus)
                except FileNotFoundError:
                    continue  # that tree ended meanwhile: its cgroups are gone with it
            await self.platform.resize_cache(instance, cpus)
        except PlatformError as error:
            raise HostSideError(f"cannot apply {instance!r}'s grant: {error}") from error
        except FileNotFoundError:
            return  # the instance ended meanwhile: its cgroups are gone with it


def _usage(group: Path) -> int:
    try:
        return int((group / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return 0
