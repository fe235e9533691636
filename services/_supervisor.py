"""An instance's agent on the platform, from launch to reclaim, for the lifecycle actor.

`start` launches the agent with the socket the hub binds to the instance and the workload in its
environment (the `MULTIKERNEL_*` variables `_agent` reads), starts a watcher in the actor's task
group, and waits for the agent's hello: the instance is `active` once it comes, `failed` (and its
agent killed) if it does not come in time or the caller gives up first. The watcher waits on the
platform (a pidfd on the local one, so an exit is seen at once, however it happens), reclaims
what the launch held, and moves the instance back to `loaded`; it is the one place a launch is
reclaimed while the actor runs, so `stop` only ends the agent and waits for the watcher. `stop`
is negotiated like the kernel's SHUTDOWN → SHUTDOWN_ACK → HALTED: ask the agent to shut down and
wait for its exit, within a grace period, then force it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

import anyio
import anyio.abc

from multikernel.endpoints import Bus
from multikernel.endpoints.log import get_logger
from multikernel.protocol import Shutdown
from multikernel.services._instances import (
    ACTIVE,
    FAILED,
    LOADED,
    Instance,
    InstanceError,
    StateChanges,
)
from multikernel.services._platform import InstanceProcess, LaunchSpec, Platform

log = get_logger("multikernel.lifecycle")


class Supervisor:
    """Starts, watches and stops the agents of the lifecycle actor's instances.

    `timings` gets the seconds from launch to hello (`hello`) and from exit to reclaimed
    (`reclaim`) of every launch, for the benchmarks.
    """

    def __init__(
        self,
        endpoint: Bus,
        platform: Platform,
        states: StateChanges,
        *,
        open_instance_socket: Callable[[int], socket.socket],
        timings: dict[str, list[float]],
    ) -> None:
        self.ep = endpoint
        self.platform = platform
        self.states = states
        self._open_socket = open_instance_socket
        self.timings = timings

    async def start(
        self,
        inst: Instance,
        command: tuple[str, ...],
        *,
        watchers: anyio.abc.TaskGroup,
        hello_timeout: float,
    ) -> None:
        """Launch the agent (its watcher in `watchers`) and wait up to `hello_timeout` for hello."""
        assert inst.image is not None
        assert inst.resources is not None
        assert inst.image_dir is not None
        manifest = inst.image.manifest
        entry = list(command or manifest.entry)
        entry = [
            arg.replace("{python}", sys.executable).replace("{image}", str(inst.image_dir))
            for arg in entry
        ]
        sock = self._open_socket(inst.id)
        output, output_w = os.pipe()  # the workload's stdout and stderr, read here
        env = {
            "MULTIKERNEL_BUS_FD": str(sock.fileno()),
            "MULTIKERNEL_OUTPUT_FD": str(output_w),
            "MULTIKERNEL_INSTANCE": str(inst.id),
            "MULTIKERNEL_INSTANCE_NAME": inst.name,
            "MULTIKERNEL_WORKLOAD": json.dumps(entry),
            "MULTIKERNEL_WORKLOAD_ENV": json.dumps(
                {**manifest.env, "MULTIKERNEL_PARAMETERS": json.dumps(manifest.parameters)}
            ),
            "MULTIKERNEL_IMAGE_DIR": str(inst.image_dir),
            # The grant, as the agent starts with it (it follows changes from then on).
            "MULTIKERNEL_MEMORY": str(inst.resources.memory),
            "MULTIKERNEL_QUEUES": json.dumps(list(inst.queues)),
            "MULTIKERNEL_RESOURCE_TX": str(inst.resource_tx),
            "MULTIKERNEL_RESOURCES_FILE": str(inst.image_dir.parent / "resources.json"),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        if level := os.environ.get("MULTIKERNEL_LOG_LEVEL"):
            env["MULTIKERNEL_LOG_LEVEL"] = level
        spec = LaunchSpec(
            inst.name, inst.id, [sys.executable, "-m", "multikernel.services.agent"], env,
            (sock.fileno(), output_w), inst.resources, cwd=str(inst.image_dir),
        )  # fmt: skip
        inst.hello, inst.exited, inst.stopping, inst.agent = anyio.Event(), anyio.Event(), False, 0
        inst.beat = anyio.Event()
        t0 = time.monotonic()
        try:
            proc = await self.platform.launch(spec)
        except BaseException:
            os.close(output)
            raise
        finally:
            sock.close()  # the agent holds its end now
            os.close(output_w)
        inst.proc = proc
        inst.started_ns = time.monotonic_ns()
        assert inst.output is not None
        inst.output.starting()
        watchers.start_soon(inst.output.collect, output)
        watchers.start_soon(self._watch, inst, proc, inst.exited)
        try:
            with anyio.move_on_after(hello_timeout):
                await inst.hello.wait()
        except BaseException:  # the caller gave up: leave no agent running behind `loaded`
            with anyio.CancelScope(shield=True):
                inst.stopping = True
                await self.states.move(inst, FAILED, "start abandoned by its caller")
                await self._force_stop(inst)
            raise
        if not inst.hello.is_set():
            inst.stopping = True
            await self.states.move(
                inst, FAILED, f"no hello from the agent within {hello_timeout:.0f} s"
            )
            await self._force_stop(inst)
            raise InstanceError(
                f"{inst.name!r} did not come up: its agent never said hello; see the host log"
            )
        self.timings["hello"].append(time.monotonic() - t0)
        try:
            await self._workload_up(inst, hello_timeout)
            if inst.proc is not proc:
                return  # it already ran to completion (and the watcher moved it to `loaded`)
        except InstanceError:
            raise
        except BaseException:  # the caller gave up: as above
            with anyio.CancelScope(shield=True):
                inst.stopping = True
                await self.states.move(inst, FAILED, "start abandoned by its caller")
                await self._force_stop(inst)
            raise
        await self.states.move(inst, ACTIVE, f"agent up (pid {inst.proc.pid})")

    async def _workload_up(self, inst: Instance, within: float) -> None:
        """Wait for the agent's first heartbeat (it beats once its workload has run a heartbeat
        period) or its exit: a workload that fails at start fails the start, with its reason."""
        with anyio.move_on_after(within):
            async with anyio.create_task_group() as race:
                for event in (inst.beat, inst.exited):
                    race.start_soon(_then_cancel, event, race.cancel_scope)
        if inst.beat.is_set() and not inst.exited.is_set():
            return
        if not inst.exited.is_set():
            inst.stopping = True
            await self.states.move(inst, FAILED, f"no heartbeat from the agent within {within:g} s")
            await self._force_stop(inst)
            raise InstanceError(
                f"{inst.name!r} did not come up: its agent never sent a heartbeat; see the host log"
            )
        assert inst.output is not None
        with anyio.move_on_after(5):  # the rest of its output, for `logs` and the reason
            await inst.output.ended.wait()
        if inst.last_exit == "exit status 0":
            return  # a workload that ran to completion: started, and already done
        last = inst.output.last_line()
        raise InstanceError(
            f"{inst.name!r} did not start: its workload ended ({inst.last_exit or 'exited'}) "
            f"before its first heartbeat{': ' + last if last else ''}; "
            f"see mkctl logs {inst.name}"
        )

    async def stop(self, inst: Instance, grace: float | None) -> None:
        """End the agent, negotiated within `grace` seconds (None: forced at once); return once
        its watcher has reclaimed it."""
        inst.stopping = True
        if grace is not None:
            await self._negotiate(inst, grace)
        if inst.proc is not None and inst.proc.returncode is None:
            await self._force_stop(inst)
        await inst.exited.wait()

    async def stop_now(self, inst: Instance) -> None:
        """On the way out (the watchers are gone): kill, wait and reclaim the agent here."""
        proc, inst.proc = inst.proc, None
        if proc is not None:
            inst.stopping = True
            await self.platform.kill(proc)
            with anyio.move_on_after(30):
                await self.platform.wait(proc)
            await self.platform.reclaim(proc)

    async def _watch(self, inst: Instance, proc: InstanceProcess, exited: anyio.Event) -> None:
        """Wait for this launch to end (pidfd), reclaim it, and move the instance to `loaded`."""
        status = await self.platform.wait(proc)
        t0 = time.monotonic()
        await self.platform.reclaim(proc)
        self.timings["reclaim"].append(time.monotonic() - t0)
        exited.set()
        if inst.proc is not proc:
            return  # a later launch owns the instance now (or the host is stopping it)
        inst.proc = None
        inst.agent = 0
        inst.last_exit = _describe_exit(status)
        if not inst.stopping and inst.state == ACTIVE:
            inst.restarts += 1
        if inst.state != FAILED:
            reason = "halted" if inst.stopping else f"crashed ({inst.last_exit})"
            await self.states.move(inst, LOADED, f"{reason}; resources reclaimed")

    async def _negotiate(self, inst: Instance, grace: float) -> None:
        """SHUTDOWN → SHUTDOWN_ACK → exit, within `grace` seconds; on timeout the caller forces."""
        with anyio.move_on_after(grace):
            try:
                await self.ep.request(f"instance.{inst.id}.agent", "shutdown", Shutdown(inst.id))
            except Exception as exc:  # the agent is wedged or gone: force it
                log.warning("negotiated shutdown failed", instance=inst.name, error=str(exc))
                return
            await inst.exited.wait()

    async def _force_stop(self, inst: Instance) -> None:
        """Kill the current launch and wait for its watcher to reclaim it."""
        if inst.proc is not None:
            exited = inst.exited
            await self.platform.kill(inst.proc)
            with anyio.fail_after(30):
                await exited.wait()


async def _then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _describe_exit(status: int) -> str:
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}"
