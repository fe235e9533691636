"""The host process: the hub and the actors of one multikernel host, composed.

`run_host` starts the hub on its control socket, then attaches the lifecycle actor to it as an
ordinary endpoint (the actors only exchange messages; the one thing the host hands the lifecycle
actor directly is the hub's `open_instance_socket`, the way a real kernel hands a new instance its
IPI buffers). On SIGTERM or SIGINT it stops every instance, drains the hub and exits.

The host's own user is privileged on instance 0 (an `instance:0 & uid:<uid>` rule appended to the
policy): `mkctl`, run by the same user, may drive the host, and the actors may reach every
instance. Run as root and that user is root, which the built-in `host` rule already covers.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from multikernel.bus import Hub, Policy
from multikernel.endpoints import connect
from multikernel.endpoints.log import get_logger
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._metrics import HostCollector, registry, serve_metrics

log = get_logger("multikernel.host")


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
    metrics: str = "127.0.0.1:0"  # where Prometheus scrapes (port 0: any free one); "" off

    def policy(self) -> Policy:
        return Policy.from_toml(self.policy_text + host_rule(os.getuid()), self.policy_source)


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
    platform = LocalPlatform(isolate=config.isolate)
    for warning in platform.capabilities().warnings:
        log.warning("isolation", warning=warning)
    hub = Hub(config.socket, policy=config.policy())
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with connect(config.socket, name="lifecycle") as ep:
            actor = LifecycleActor(
                ep,
                platform,
                open_instance_socket=hub.open_instance_socket,
                state_dir=config.state_dir,
                trusted_certs=read_trusted(config.trusted),
                allow_unsigned=config.allow_unsigned,
                hello_timeout=config.hello_timeout,
            )
            async with anyio.create_task_group() as actors:
                await actors.start(actor.run)
                if config.metrics:
                    collector = HostCollector(
                        hub.snapshot,
                        lambda: ep.statistics()["services"],
                        actor.infos,
                    )
                    await actors.start(
                        serve_metrics, registry(collector), config.metrics, config.state_dir
                    )
                log.info("host up", socket=str(config.socket), pid=os.getpid())
                task_status.started(hub)
                await _until_stopped(stop)
                actors.cancel_scope.cancel()  # the actor stops its instances on the way out
        await hub.drain(grace=2.0)
        tg.cancel_scope.cancel()
