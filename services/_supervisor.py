"""An instance's agent on the platform, from launch to reclaim, for the lifecycle actor.

`start` launches the agent with the socket the hub binds to the instance and the workload in its
environment (the `MULTIKERNEL_*` variables `_agent` reads), starts a watcher in the actor's task
group, and waits for the agent's hello, then for its first heartbeat (the agent beats once its
workload has run for a heartbeat period): the instance is `active` once it comes, `failed` (and its
agent killed) if it does not come in time or the caller gives up first, and a workload that ends
before it fails the start with its last line of output. The workload's stdout and stderr are a pipe
whose read end is kept here and collected into the instance's log (`_output`). When a warm standby
is ready (`_standby`), `start` promotes it instead of launching: the standby's agent then takes the
instance over (and its output pipe is collected from then on). The watcher waits on the platform (a
pidfd on the local one, so an exit is seen at once, however it happens), reclaims what the launch
held, and moves the instance back to `loaded` with the cause of the end (`requested`, `exited`,
`crashed`, `lost`, or the cause a restart gave); it is the one place a launch is reclaimed while
the actor runs, so `stop` only ends the agent and waits for the watcher. `stop` is negotiated like
the kernel's SHUTDOWN → SHUTDOWN_ACK → HALTED: ask the agent to shut down and wait for its exit,
within a grace period, then force it.

Every launch is a new `generation` of the instance, stored with the platform's record of it
before anything waits on it, so a host that dies at any point can find it again (`_recovery`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

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
from multikernel.services._platform import (
    STATUS_UNKNOWN,
    InstanceProcess,
    LaunchSpec,
    Platform,
)
from multikernel.services._standby import Standby, launch_record

log = get_logger("multikernel.lifecycle")


class Supervisor:
    """Starts, watches and stops the agents of the lifecycle actor's instances.

    `timings` gets the seconds from launch to hello (`hello`), from exit to reclaimed
    (`reclaim`) and from a standby's promotion to its hello (`takeover`), for the benchmarks.
    `bus_path` is where the hub listens, for agents to re-attach after a hub restart;
    `heartbeat` the agents' heartbeat period (None: the agent's default).
    """

    def __init__(
        self,
        endpoint: Bus,
        platform: Platform,
        states: StateChanges,
        *,
        open_instance_socket: Callable[[int], socket.socket],
        timings: dict[str, list[float]],
        bus_path: Path | None = None,
        heartbeat: float | None = None,
    ) -> None:
        self.ep = endpoint
        self.platform = platform
        self.states = states
        self._open_socket = open_instance_socket
        self.timings = timings
        self.bus_path = bus_path
        self.heartbeat = heartbeat
        #: Called when a ready standby ended by itself (the actor starts another).
        self.standby_lost: Callable[[Instance], None] | None = None

    def spec(
        self,
        inst: Instance,
        fds: tuple[int, ...],
        *,
        output: tuple[int, int],
        slot: str = "",
        env: dict[str, str] | None = None,
    ) -> LaunchSpec:
        """How to launch `inst`'s agent with its bus socket `fds[0]`, its output pipe `output`
        (read end, write end: all passed on), and more fds after them.

        The agent hands the write end to its workload and holds the read end without reading
        it: a host that dies leaves the pipe a reader (the workload's writes never fail with
        EPIPE; past the pipe's buffer they wait), and a restarted host opens that read end again
        through /proc (`reattach_output`) and collects what was written meanwhile."""
        assert inst.image is not None
        assert inst.resources is not None
        assert inst.image_dir is not None
        manifest = inst.image.manifest
        entry = [
            arg.replace("{python}", sys.executable).replace("{image}", str(inst.image_dir))
            for arg in (inst.command or manifest.entry)
        ]
        agent_env = {
            "MULTIKERNEL_BUS_FD": str(fds[0]),
            "MULTIKERNEL_OUTPUT_FD": str(output[1]),
            "MULTIKERNEL_OUTPUT_HOLD_FD": str(output[0]),
            "MULTIKERNEL_INSTANCE": str(inst.id),
            "MULTIKERNEL_INSTANCE_NAME": inst.name,
            "MULTIKERNEL_WORKLOAD": json.dumps(entry),
            "MULTIKERNEL_WORKLOAD_ENV": json.dumps(
                {**manifest.env, "MULTIKERNEL_PARAMETERS": json.dumps(manifest.parameters)}
            ),
            "MULTIKERNEL_IMAGE_DIR": str(inst.image_dir),
            # The grant, as the agent starts with it (it follows changes from then on). A
            # standby is launched with the same: it runs inside the instance's grant.
            "MULTIKERNEL_MEMORY": str(inst.resources.memory),
            "MULTIKERNEL_QUEUES": json.dumps(list(inst.queues)),
            "MULTIKERNEL_RESOURCE_TX": str(inst.resource_tx),
            "MULTIKERNEL_RESOURCES_FILE": str(inst.image_dir.parent / "resources.json"),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            **(env or {}),
        }
        if self.bus_path is not None:  # re-attach there when the hub restarts
            agent_env["MULTIKERNEL_BUS"] = str(self.bus_path)
        if self.heartbeat is not None:
            agent_env["MULTIKERNEL_HEARTBEAT"] = f"{self.heartbeat:g}"
        if level := os.environ.get("MULTIKERNEL_LOG_LEVEL"):
            agent_env["MULTIKERNEL_LOG_LEVEL"] = level
        return LaunchSpec(
            inst.name, inst.id, [sys.executable, "-m", "multikernel.services.agent"], agent_env,
            (fds[0], *output, *fds[1:]), inst.resources, cwd=str(inst.image_dir), slot=slot,
        )  # fmt: skip

    async def launch(self, inst: Instance, spec: LaunchSpec) -> InstanceProcess:
        """Launch `spec`, stored as being launched until the platform's record of it is."""
        inst.launching.add(spec.unit)
        self.states.save(inst)
        try:
            return await self.platform.launch(spec)
        finally:
            inst.launching.discard(spec.unit)

    async def start(
        self,
        inst: Instance,
        command: tuple[str, ...],
        *,
        watchers: anyio.abc.TaskGroup,
        hello_timeout: float,
    ) -> None:
        """Launch the agent (its watcher in `watchers`), or promote the instance's warm standby,
        and wait up to `hello_timeout` for hello."""
        inst.command = command
        standby = inst.standby
        if standby is not None and not standby.usable(inst):
            await self.discard_standby(inst)
            standby = None
        inst.hello, inst.stopping, inst.agent = anyio.Event(), False, 0
        inst.beat = anyio.Event()
        inst.stop_cause = "requested"
        inst.generation += 1
        t0 = time.monotonic()
        if standby is not None:
            inst.standby = None
            inst.proc, inst.proc_record, inst.exited = standby.proc, standby.record, standby.exited
            inst.started_ns = time.monotonic_ns()
            self.states.save(inst)
            output = standby.take_output()
            inst.output_fd = output or 0  # its number in the standby's agent too
            if output is not None:
                self._collect(inst, output, watchers)
            try:
                await standby.go()
            except OSError as exc:  # it died meanwhile: its watcher reclaims it as this launch
                log.warning("standby could not take over", instance=inst.name, error=str(exc))
            finally:
                standby.close()
            how = f"standby took over (pid {standby.proc.pid})"
        else:
            sock = self._open_socket(inst.id)
            output, output_w = os.pipe()  # the workload's stdout and stderr, read here
            inst.exited = anyio.Event()
            try:
                spec = self.spec(inst, (sock.fileno(),), output=(output, output_w))
                proc = await self.launch(inst, spec)
            except BaseException:
                os.close(output)
                self.states.save(inst)
                raise
            finally:
                sock.close()  # the agent holds its end now
                os.close(output_w)
            inst.proc, inst.proc_record = proc, launch_record(self.platform, proc)
            inst.output_fd = output  # the agent holds the read end under the same number
            inst.started_ns = time.monotonic_ns()
            self.states.save(inst)
            self._collect(inst, output, watchers)
            watchers.start_soon(self.watch, inst, proc, inst.exited)
            how = f"agent up (pid {proc.pid})"
        proc = inst.proc
        assert proc is not None
        await self._wait_hello(inst, hello_timeout)
        self.timings["takeover" if standby is not None else "hello"].append(time.monotonic() - t0)
        try:
            await self._workload_up(inst, hello_timeout)
            if inst.proc is not proc:
                return  # it already ran to completion (and the watcher moved it to `loaded`)
        except InstanceError:
            raise
        except BaseException:  # the caller gave up: leave no agent running behind `loaded`
            with anyio.CancelScope(shield=True):
                inst.stopping = True
                await self.states.move(inst, FAILED, "start abandoned by its caller")
                await self._force_stop(inst)
            raise
        await self.states.move(inst, ACTIVE, how)

    @staticmethod
    def _collect(inst: Instance, output: int, watchers: anyio.abc.TaskGroup) -> None:
        """Collect this launch's output (the read end `output`, which this takes) into its log."""
        if inst.output is None:
            os.close(output)
            return
        inst.output.starting()
        watchers.start_soon(inst.output.collect, output)

    def reattach_output(self, inst: Instance, watchers: anyio.abc.TaskGroup) -> None:
        """Collect an adopted launch's output again: open the read end its agent holds."""
        if inst.proc is None or not inst.output_fd:
            return
        if not inst.proc.pid:  # no host pid: it runs on a kernel of its own (multikernel)
            output, inst.proc.output = inst.proc.output, None
            if output is None:
                why = "it runs on a kernel of its own, which did not hand its output back"
                log.warning("output not collected again", instance=inst.name, error=why)
                return
            self._collect(inst, output, watchers)
            return
        path = f"/proc/{inst.proc.pid}/fd/{inst.output_fd}"
        try:
            pipe = os.readlink(path).startswith("pipe:")
            output = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if pipe else -1
        except OSError as exc:
            log.warning("output not collected again", instance=inst.name, error=str(exc))
            return
        if output < 0:
            log.warning("output not collected again", instance=inst.name, error=f"{path}: no pipe")
            return
        self._collect(inst, output, watchers)

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
        if inst.output is not None:
            with anyio.move_on_after(5):  # the rest of its output, for `logs` and the reason
                await inst.output.ended.wait()
        if inst.last_exit == "exit status 0":
            return  # a workload that ran to completion: started, and already done
        last = inst.output.last_line() if inst.output is not None else ""
        raise InstanceError(
            f"{inst.name!r} did not start: its workload ended ({inst.last_exit or 'exited'}) "
            f"before its first heartbeat{': ' + last if last else ''}; "
            f"see mkctl logs {inst.name}"
        )

    async def _wait_hello(self, inst: Instance, hello_timeout: float) -> None:
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

    async def stop(self, inst: Instance, grace: float | None, cause: str = "requested") -> None:
        """End the agent, negotiated within `grace` seconds (None: forced at once); return once
        its watcher has reclaimed it. `cause` is recorded as why the launch ended."""
        inst.stopping = True
        inst.stop_cause = cause
        if grace is not None:
            await self._negotiate(inst, grace)
        if inst.proc is not None and inst.proc.returncode is None:
            await self._force_stop(inst)
        await inst.exited.wait()

    async def stop_now(self, inst: Instance) -> None:
        """On the way out (the watchers are gone): kill, wait and reclaim the agent (and its
        standby) here."""
        standby, inst.standby = inst.standby, None
        proc, inst.proc = inst.proc, None
        for launch in (standby.proc if standby is not None else None, proc):
            if launch is not None:
                inst.stopping = True
                await self.platform.kill(launch)
                with anyio.move_on_after(30):
                    await self.platform.wait(launch)
                await self.platform.reclaim(launch)
        if standby is not None:
            standby.close()
        if proc is not None:
            inst.proc_record, inst.cause = "", "requested"
            if inst.state == ACTIVE:
                inst.state = LOADED
            self.states.save(inst)

    async def discard_standby(self, inst: Instance) -> None:
        """Kill the instance's standby (if any) and wait until its watcher reclaimed it."""
        standby = inst.standby
        if standby is not None:
            await self.platform.kill(standby.proc)
            with anyio.fail_after(30):
                await standby.exited.wait()

    async def watch(self, inst: Instance, proc: InstanceProcess, exited: anyio.Event) -> None:
        """Wait for this launch to end (pidfd), reclaim it, and move the instance to `loaded`
        if it was the instance's launch (a standby's end only forgets the standby)."""
        status = await self.platform.wait(proc)
        t0 = time.monotonic()
        await self.platform.reclaim(proc)
        self.timings["reclaim"].append(time.monotonic() - t0)
        exited.set()
        if inst.standby is not None and inst.standby.proc is proc:
            was_ready = inst.standby.ready
            inst.standby.close()
            inst.standby = None
            self.states.save(inst)
            log.info("standby ended", instance=inst.name, status=_describe_exit(status))
            if was_ready and self.standby_lost is not None:  # it worked: have another
                self.standby_lost(inst)
            return
        if inst.proc is not proc:
            return  # a later launch owns the instance now (or the host is stopping it)
        inst.proc = None
        inst.proc_record = ""
        inst.agent = 0
        inst.last_exit = _describe_exit(status)
        if inst.stopping:
            cause = inst.stop_cause
        elif status == STATUS_UNKNOWN:
            cause = "lost"
        else:
            cause = "exited" if status == 0 else "crashed"
        inst.cause = cause
        if not inst.stopping and inst.state == ACTIVE:
            inst.restarts += 1
        if inst.state != FAILED:
            reason = "halted" if inst.stopping else f"crashed ({inst.last_exit})"
            await self.states.move(inst, LOADED, f"{reason}; resources reclaimed", cause)
        else:
            self.states.save(inst)

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

    async def launch_standby(
        self, inst: Instance, *, watchers: anyio.abc.TaskGroup, ready_timeout: float
    ) -> None:
        """Start a warm standby for the active `inst` and wait until it is ready to take over."""
        if inst.standby is not None or inst.state != ACTIVE or not inst.restart.standby:
            return
        ours, theirs = socket.socketpair()
        sock = self._open_socket(inst.id)
        output, output_w = os.pipe()  # its workload's output, collected once it takes over
        try:
            spec = self.spec(
                inst,
                (sock.fileno(), theirs.fileno()),
                output=(output, output_w),
                slot=Standby.new_slot(),
                env={"MULTIKERNEL_STANDBY_FD": str(theirs.fileno())},
            )
            proc = await self.launch(inst, spec)
        except BaseException as exc:
            ours.close()
            os.close(output)
            self.states.save(inst)
            if isinstance(exc, Exception):
                log.warning("standby not started", instance=inst.name, error=str(exc))
                return
            raise
        finally:
            sock.close()
            theirs.close()
            os.close(output_w)
        standby = Standby(proc, ours, launch_record(self.platform, proc), inst, output)
        inst.standby = standby
        self.states.save(inst)
        watchers.start_soon(self.watch, inst, proc, standby.exited)
        try:
            with anyio.fail_after(ready_timeout):
                await standby.wait_ready()
        except (TimeoutError, OSError, anyio.EndOfStream) as exc:
            log.warning("standby never got ready", instance=inst.name, error=repr(exc))
            if inst.standby is standby:
                await self.discard_standby(inst)
            return
        log.info("standby ready", instance=inst.name, pid=proc.pid, unit=spec.unit)
        if inst.state == ACTIVE and inst.standby is standby:  # no state change: an announcement
            await self.states.announce(inst, ACTIVE, ACTIVE, f"standby ready (pid {proc.pid})")


async def _then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _describe_exit(status: int) -> str:
    if status == STATUS_UNKNOWN:
        return "ended (exit status unknown: adopted after a host restart)"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}"
