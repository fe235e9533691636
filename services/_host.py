"""The host process: the hub and the actors of one multikernel host, composed.

`run_host` starts the hub on its control socket, then the resource actor in a process of its own
(`ActorProcess`: restarted if it dies, stopped with the host), then attaches the lifecycle actor
as an ordinary endpoint (the actors only exchange messages; the one thing the host hands the
lifecycle actor directly is the hub's `open_instance_socket`, the way a real kernel hands a new
instance its IPI buffers). On SIGTERM or SIGINT it stops every instance, then the resource actor,
drains the hub and exits.

The host survives itself: the lifecycle actor's state is in `<state-dir>/lifecycle.db`, and before
the hub listens the host brings it back (`_recovery`): the instances still running are adopted, the
others reclaimed. The hub asks the platform which instance a process attaching by path belongs to
(`instance_of`), so agents re-attaching after a restart are bound to their own instance.

The start order: the hub; the resource actor (its own process, `_actors.ActorProcess`), which
must serve before the lifecycle actor starts because the lifecycle actor reconciles with it (the
grants of instances `lifecycle.db` does not know are released; adopted and stored instances keep
theirs); the lifecycle actor; then the fault actor (its own process, `python -m
multikernel.services.fault`, attached on an instance-0 socket with a lifeline: `_children`), which
asks the lifecycle actor for everything and so comes last; then the upgrade actor (the same way,
`python -m multikernel.upgrade.actor`); then metrics. Stopping goes the other
way: the fault actor first (so it restarts nothing being stopped), the lifecycle actor's instances,
the resource actor, the hub.

The host's own user is privileged on instance 0 (an `instance:0 & uid:<uid>` rule appended to the
policy): `mkctl`, run by the same user, may drive the host, and the actors may reach every
instance. Each instance's agent may call the resource actor (`_elastic.AGENT_RULE`, also
appended), which serves it `elastic` alone, for its own instance. Run as root and that user is
root, which the built-in `host` rule already covers.
Nobody else may: the control socket is 0600 unless `socket_access` widens it, and even then the
host actors' services (`lifecycle`, ...) are `[host_only]` in the policy unless a rule grants
them (docs/security.md).

Everything of one host is its own: its state dir holds a `host-id` made at its first start, and
its instances' cgroups go under `multikernel/<host-id>` (removed when it stops, if empty), so
hosts, demos and test runs on one machine never meet in one directory (docs/platform.md).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from multikernel.bus import Hub, Policy, SocketAccess
from multikernel.endpoints import connect
from multikernel.endpoints.log import get_logger
from multikernel.services._actors import ActorProcess
from multikernel.services._cgroups import GROUP_ROOT
from multikernel.services._children import ChildActor
from multikernel.services._elastic import AGENT_RULE
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._metrics import HostCollector, registry, serve_metrics
from multikernel.services._mk_remote import connector_for, open_kernel
from multikernel.services._mk_steps import BootImage, KernelSteps
from multikernel.services._multikernel import MultikernelPlatform
from multikernel.services._platform import Platform, PlatformError
from multikernel.services._recovery import Recovered, recover
from multikernel.services._resource_process import ResourceConfig, resource_argv

log = get_logger("multikernel.host")

#: The file in a host's state dir that names the host (and its cgroup group).
HOST_ID_FILE = "host-id"
_HOST_ID = re.compile(r"host-[0-9a-f]{8}")


def host_id(state_dir: Path) -> str:
    """This host's id, `host-<8 hex>`: read from `<state_dir>/host-id`, made there at first use.

    Kept in the state dir so that a restarted host is the same host (it finds the cgroups it left
    if it crashed) and two hosts with two state dirs are never the same.
    """
    path = state_dir / HOST_ID_FILE
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        text = path.read_text().strip()
        if not _HOST_ID.fullmatch(text):
            raise PlatformError(
                f"{path} holds {text[:40]!r}, not a host id (host-<8 hex digits>): remove it and "
                "start the host again (it makes a new one)"
            ) from None
        return text
    made = f"host-{secrets.token_hex(4)}"
    with os.fdopen(fd, "w") as out:
        out.write(made + "\n")
    return made


def cgroup_group(state_dir: Path) -> str:
    """The cgroup directory (in each hierarchy) the host with this state dir runs instances in."""
    return f"{GROUP_ROOT}/{host_id(state_dir)}"


async def _until_stopped(stop: anyio.Event | None) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("host stopping", signal=signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()

            async def on_event() -> None:
                if stop is not None:
                    await stop.wait()
                    log.info("host stopping", reason="asked to")
                    tg.cancel_scope.cancel()

            tg.start_soon(on_signal)
            tg.start_soon(on_event)


def host_rule(uid: int) -> str:
    """The policy rule that makes the host's own user privileged on instance 0."""
    return f"""
[[rule]]
who = "instance:0 & uid:{uid}"
publish = [">"]
subscribe = [">"]
call = [">"]
own = [">"]
monitor = true
"""


def read_trusted(paths: list[Path]) -> list[bytes]:
    """Certificates from files, or from every *.pem, *.crt, *.der, *.x509 in directories."""
    blobs: list[bytes] = []
    for path in paths:
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.suffix in {".pem", ".crt", ".der", ".x509"}:
                    blobs.append(entry.read_bytes())
        else:
            blobs.append(path.read_bytes())
    return blobs


@dataclass
class HostConfig:
    """How to run a host; `mkctl host up` and `python -m multikernel.services.host` fill it."""

    socket: Path
    state_dir: Path
    policy_text: str = ""
    policy_source: str = "<default>"
    trusted: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    isolate: bool = True
    hello_timeout: float = 15.0
    heartbeat: float | None = None  # seconds between agents' heartbeats (None: theirs, 1 s)
    fault: bool = True  # run the fault actor (restarts failed instances by their policy)
    upgrade: bool = True  # run the upgrade actor (mkctl upgrade)
    # The resource actor: what the host keeps, how grants are placed (docs/resources.md).
    reserve_cpus: frozenset[int] = frozenset()
    reserve_memory: int = 0
    placement: str = "pack"
    cpu_share: int = 1
    ack_timeout: float = 5.0
    elastic_max_cpus: int = 0  # how far an instance may grow by asking (0: its operator's grant)
    elastic_max_memory: int = 0
    rebalance: str = ""  # resize grants by load: "pressure" or module:attr ("": off)
    sysfs_root: Path = Path("/")
    #: Each instance's memory bandwidth in percent, where resctrl can limit it (None: unlimited).
    memory_bandwidth: int | None = None
    metrics: str = "127.0.0.1:0"  # where Prometheus scrapes (port 0: any free one); "" off
    #: Who may connect to the control socket (default 0600: the host's own user and root).
    socket_access: SocketAccess = field(default_factory=SocketAccess)
    #: What runs the instances: "local" (process trees) or "multikernel" (kernels of their own,
    #: on a multikernel kernel whose file system is at `kernfs`, booting `boot`).
    platform: str = "local"
    kernfs: Path = Path("/sys/fs/multikernel")
    boot: BootImage | None = None

    def policy(self) -> Policy:
        rules = host_rule(os.getuid()) + AGENT_RULE
        return Policy.from_toml(self.policy_text + rules, self.policy_source)

    def resource_config(self) -> ResourceConfig:
        return ResourceConfig(
            socket=str(self.socket), state_dir=str(self.state_dir),
            reserve_cpus=tuple(sorted(self.reserve_cpus)), reserve_memory=self.reserve_memory,
            policy=self.placement, cpu_share=self.cpu_share, ack_timeout=self.ack_timeout,
            sysfs_root=str(self.sysfs_root), isolate=self.isolate,
            cgroup_group=cgroup_group(self.state_dir), elastic_max_cpus=self.elastic_max_cpus,
            elastic_max_memory=self.elastic_max_memory, rebalance=self.rebalance,
            kernfs=str(self.kernfs) if self.platform == "multikernel" else "",
        )  # fmt: skip


async def run_host(
    config: HostConfig,
    stop: anyio.Event | None = None,
    *,
    task_status: anyio.abc.TaskStatus[Hub] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT or `stop` is set: stop every instance, drain, return.

    Cancelling it also stops the instances (forcibly: the bus is going away with it).
    """
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    if config.platform == "multikernel":
        async with multikernel_platform(config) as platform:
            await _run_host(config, platform, stop, task_status)
        return
    if config.platform != "local":
        raise PlatformError(f"unknown platform {config.platform!r}: local or multikernel")
    local = LocalPlatform(
        isolate=config.isolate, group=cgroup_group(config.state_dir),
        memory_bandwidth=config.memory_bandwidth,
    )  # fmt: skip
    for warning in local.capabilities().warnings:
        log.warning("isolation", warning=warning)
    if local.cache is not None:
        log.info("cache partitioning", resctrl=local.cache.info.describe())
        for name in local.remove_stale_cache_groups():
            log.info("stale resctrl group removed", instance=name)
    try:
        await _run_host(config, local, stop, task_status)
    finally:
        local.close()  # the host's cgroup group, now that its instances are reclaimed


def multikernel_platform(config: HostConfig) -> MultikernelPlatform:
    """The multikernel platform of `config`: the kernel at `kernfs`, booting `boot`, its
    instances' agents reached over AF_VSOCK (docs/platform.md, "multikernel")."""
    if config.boot is None:
        raise PlatformError("the multikernel platform boots a kernel: give it one (--kernel PATH)")
    kernel = open_kernel(config.kernfs)  # or a fake kernel served there (`_mk_remote`)
    KernelSteps(kernel).check_mounted()
    connector, shared = connector_for(kernel)
    return MultikernelPlatform(kernel, config.boot, connector=connector, shared=shared)


async def _run_host(
    config: HostConfig,
    platform: Platform,
    stop: anyio.Event | None,
    task_status: anyio.abc.TaskStatus[Hub],
) -> None:
    resource = config.resource_config()
    recovered: Recovered | None = None
    instance_of: Callable[[int], int] = getattr(platform, "instance_of", lambda pid: 0)
    try:
        # Before the hub listens: an agent re-attaching by path must be known when it asks.
        recovered = await recover(platform, config.state_dir)
        hub = Hub(
            config.socket,
            policy=config.policy(),
            socket_access=config.socket_access,
            instance_of=instance_of,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            if isinstance(platform, MultikernelPlatform):  # adopted agents' sessions, again
                platform.serve_sessions(hub.open_instance_socket)
            async with anyio.create_task_group() as processes:
                # The resource actor first: the lifecycle actor reconciles with it as it starts.
                resource_actor = ActorProcess(
                    "resource", lambda fd: resource_argv(resource, ready_fd=fd)
                )
                await processes.start(resource_actor.run)
                await _run_lifecycle(config, hub, platform, recovered, stop, task_status)
                processes.cancel_scope.cancel()  # the resource actor stops once the instances have
            await hub.drain(grace=2.0)
            tg.cancel_scope.cancel()
    finally:
        if recovered is not None:
            recovered.store.close()  # the actor closes it when it ran; idempotent


async def _run_lifecycle(
    config: HostConfig,
    hub: Hub,
    platform: Platform,
    recovered: Recovered,
    stop: anyio.Event | None,
    task_status: anyio.abc.TaskStatus[Hub],
) -> None:
    """The lifecycle actor, then the fault actor's process (it asks the lifecycle actor for
    everything), until the host is asked to stop: the fault actor goes first, then the
    lifecycle actor stops its instances."""
    async with connect(config.socket, name="lifecycle") as ep:
        actor = LifecycleActor(
            ep,
            platform,
            open_instance_socket=hub.open_instance_socket,
            state_dir=config.state_dir,
            trusted_certs=read_trusted(config.trusted),
            allow_unsigned=config.allow_unsigned,
            hello_timeout=config.hello_timeout,
            bus_path=config.socket,
            heartbeat=config.heartbeat,
            recovered=recovered,
        )
        async with anyio.create_task_group() as actors:
            await actors.start(actor.run)
            if config.fault:
                fault = fault_process(config, hub)
                await actors.start(fault.run)
            if config.upgrade:
                await actors.start(upgrade_process(config, hub).run)
            if config.metrics:
                collector = HostCollector(
                    hub.snapshot, lambda: ep.statistics()["services"], actor.infos
                )
                await actors.start(
                    serve_metrics, registry(collector), config.metrics, config.state_dir
                )
            log.info(
                "host up",
                socket=str(config.socket),
                pid=os.getpid(),
                state_dir=str(config.state_dir),
                platform=platform.name,
                cgroups=[str(p) for p in getattr(platform, "cgroup_parents", [])],
            )
            task_status.started(hub)
            await _until_stopped(stop)
            actors.cancel_scope.cancel()  # the actor stops its instances on the way out


def fault_process(config: HostConfig, hub: Hub) -> ChildActor:
    """The fault actor's process, attached to the hub on an instance-0 socket."""
    argv = [
        sys.executable,
        "-m",
        "multikernel.services.fault",
        "--state-dir",
        str(config.state_dir),
    ]
    if config.heartbeat is not None:
        argv += ["--heartbeat", f"{config.heartbeat:g}"]
    return ChildActor("fault", argv, lambda: hub.open_instance_socket(0))


def upgrade_process(config: HostConfig, hub: Hub) -> ChildActor:
    """The upgrade actor's process, attached to the hub on an instance-0 socket."""
    argv = [sys.executable, "-m", "multikernel.upgrade.actor", "--state-dir", str(config.state_dir)]
    return ChildActor("upgrade", argv, lambda: hub.open_instance_socket(0))
