"""The resource actor's process: what the host passes it, and how it runs.

The host starts `python -m multikernel.services.resource --config JSON --ready-fd N --parent PID`
(`resource_argv`). The process asks the kernel to SIGTERM it if the host dies (and exits at once
if the host is already gone), reads the machine's pool, opens its SQLite store in the host's
state dir, attaches to the hub as `resource` and serves until SIGTERM: it then stops serving,
closes the store and exits 0. "ready" on the ready fd says the service is up.

`ResourceConfig` is everything the host decides for it, from the host config: which CPUs and how
much memory the host keeps, the placement policy, how many instances may share a CPU, how long
an instance has to acknowledge a transaction, how far an instance may grow by asking
(`elastic_max_cpus`, `elastic_max_memory`; 0: up to what its operator granted), which
rebalancer runs (`rebalance`: "" for none, the default; `pressure`; or a plugin), and where the
machine's sysfs is (a fake one in tests; the host's end of grants is then not applied, since no
real instance holds fake CPUs).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import msgspec

from multikernel.endpoints import connect
from multikernel.endpoints.log import get_logger
from multikernel.services._elastic import ElasticBounds
from multikernel.services._enforce import HostSide, LocalHostSide, NoHostSide
from multikernel.services._local import LocalPlatform
from multikernel.services._policies import load_policy
from multikernel.services._pool import Pool, discover_pool
from multikernel.services._rebalance import load_rebalancer
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore

log = get_logger("multikernel.resource")
PR_SET_PDEATHSIG: Final = 1


class ResourceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the host tells its resource actor (JSON on its command line)."""

    socket: str
    state_dir: str
    reserve_cpus: tuple[int, ...] = ()
    reserve_memory: int = 0
    policy: str = "pack"
    cpu_share: int = 1
    ack_timeout: float = 5.0
    sysfs_root: str = "/"
    isolate: bool = True
    cgroup_group: str = ""  # the host platform's cgroup group ("multikernel/<host-id>")
    elastic_max_cpus: int = 0
    elastic_max_memory: int = 0
    rebalance: str = ""  # "": none; "pressure"; or package.module:attribute
    kernfs: str = ""  # the multikernel file system, on the multikernel platform ("": local)

    def pool(self) -> Pool:
        """What the actor lends: this machine's (its sysfs), or on the multikernel platform
        the kernel's pool (its global device tree, `_mk_pool`)."""
        cpus, memory = frozenset(self.reserve_cpus), self.reserve_memory
        if self.kernfs:
            from multikernel.services._mk_pool import kernel_pool
            from multikernel.services._mk_remote import open_kernel

            kernel = open_kernel(Path(self.kernfs))
            return kernel_pool(kernel, reserve_cpus=cpus, reserve_memory=memory)
        return discover_pool(Path(self.sysfs_root), reserve_cpus=cpus, reserve_memory=memory)

    def host_side(self) -> HostSide:
        """The host's end of grants: the instances' cgroups, on the real machine only; on the
        multikernel platform, the kernel's overlays."""
        if self.kernfs:
            from multikernel.services._mk_remote import open_kernel
            from multikernel.services._mk_steps import KernelSteps, MultikernelHostSide

            return MultikernelHostSide(KernelSteps(open_kernel(Path(self.kernfs))))
        if self.sysfs_root != "/":
            return NoHostSide()
        # The host's own platform's cgroups: same isolation, same group.
        return LocalHostSide(LocalPlatform(isolate=self.isolate, group=self.cgroup_group or None))


def resource_argv(config: ResourceConfig, *, ready_fd: int) -> list[str]:
    return [
        sys.executable, "-m", "multikernel.services.resource",
        "--config", msgspec.json.encode(config).decode(),
        "--ready-fd", str(ready_fd), "--parent", str(os.getpid()),
    ]  # fmt: skip


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when `parent` dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: nobody would tell us
        sys.exit(f"resource: the host (pid {parent}) is gone")


async def serve_resource(
    config: ResourceConfig,
    *,
    task_status: anyio.abc.TaskStatus[ResourceActor] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `resource` until cancelled; the store is closed on every path."""
    pool = config.pool()
    policy = load_policy(config.policy)
    store = ResourceStore(Path(config.state_dir) / "resource.db")
    try:
        async with connect(Path(config.socket), name="resource") as ep:
            actor = ResourceActor(
                ep, pool, store, policy=policy, host=config.host_side(),
                cpu_share=config.cpu_share, ack_timeout=config.ack_timeout,
                elastic=ElasticBounds(config.elastic_max_cpus, config.elastic_max_memory),
                rebalancer=load_rebalancer(config.rebalance) if config.rebalance else None,
            )  # fmt: skip
            async with anyio.create_task_group() as tg:
                await tg.start(actor.run)
                task_status.started(actor)
    finally:
        store.close()


async def run_until_terminated(config: ResourceConfig, ready_fd: int | None) -> None:
    """The process's main: serve, say ready, stop cleanly on SIGTERM or SIGINT."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_resource, config)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            async for signum in signals:
                log.info("resource actor stopping", signal=signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()
