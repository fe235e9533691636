"""The instance agent: the first process of every instance.

It attaches to the bus through the socket the instance inherited at spawn (so the hub binds it to
its instance), serves `instance.<id>.agent` (status, exec, resource, elastic, shutdown),
announces itself with an `AgentHello` on `mk.instance.<id>.hello`, beats on
`mk.instance.<id>.system`, and runs the instance's workload: the image's entry command, in the
unpacked image, with a bus attachment of its own. A `resource` request from the host's resource
actor is a grant transaction made of the kernel's MK_RES_* messages: the agent applies it to the
instance and acknowledges each op (`_agent_resources`). An application of the instance may ask
it to grow or shrink the instance (`elastic`, forwarded to the resource actor as the instance),
and it publishes the instance's load on `mk.instance.<id>.load` every few seconds
(`_agent_elastic`). Shutdown is negotiated the way the multikernel kernel does it: `Shutdown`
is answered with `ShutdownAck`, the workload is stopped (SIGTERM, then SIGKILL after the grace),
`Halted` is published and the agent exits. If the workload ends by itself, the instance halts too.

When the hub restarts, the agent (and its workload) re-attach at $MULTIKERNEL_BUS, and the agent
says hello again. A standby agent ($MULTIKERNEL_STANDBY_FD) stays silent until the lifecycle
tells it to take its instance over (`_takeover`).

Environment (set by the lifecycle actor): MULTIKERNEL_BUS_FD, MULTIKERNEL_BUS (the hub's path, to
re-attach), MULTIKERNEL_INSTANCE (id), MULTIKERNEL_INSTANCE_NAME, MULTIKERNEL_WORKLOAD (JSON argv,
may be empty), MULTIKERNEL_IMAGE_DIR, MULTIKERNEL_WORKLOAD_ENV (JSON object), MULTIKERNEL_OUTPUT_FD
and MULTIKERNEL_OUTPUT_HOLD_FD (the write and read ends of the pipe the host collects the
workload's output from), and optionally MULTIKERNEL_HEARTBEAT (seconds between heartbeats) and
MULTIKERNEL_STANDBY_FD; and its grant: MULTIKERNEL_MEMORY, MULTIKERNEL_QUEUES (JSON),
MULTIKERNEL_RESOURCE_TX, MULTIKERNEL_RESOURCES_FILE. Optional: MULTIKERNEL_LOAD_PERIOD (seconds
between load reports, 0: none) and MULTIKERNEL_PSI (the instance's own pressure files).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from multikernel.endpoints import Bus, Endpoint, Service, connect, current_caller, runtime
from multikernel.endpoints.log import configure, get_logger
from multikernel.protocol import (
    AccessDeniedError,
    AgentHello,
    AgentStatus,
    DeadlineExceededError,
    ElasticRequest,
    ExecRequest,
    ExecResult,
    Grant,
    Halted,
    NotFoundError,
    ResourceTransaction,
    ResourceTransactionAck,
    Shutdown,
    ShutdownAck,
    SystemHeartbeat,
)
from multikernel.services._agent_elastic import LOAD_SECONDS, ask, report_load
from multikernel.services._agent_exec import Terminals, exec_stream
from multikernel.services._agent_resources import InstanceResources
from multikernel.services._load import LoadSampler
from multikernel.services._takeover import Gate, Takeover

log = get_logger("multikernel.agent")
HEARTBEAT_SECONDS = 1.0
WORKLOAD_GRACE = 3.0


@dataclass
class AgentState:
    instance: int
    name: str
    resources: InstanceResources
    started: float = field(default_factory=time.monotonic)
    workload: anyio.abc.Process | None = None
    stop: anyio.Event = field(default_factory=anyio.Event)
    workload_started: anyio.Event = field(default_factory=anyio.Event)
    halted_reason: str = ""


def _cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def _output_fd() -> int | None:
    """The pipe the host reads the instance's output from ($MULTIKERNEL_OUTPUT_FD), if any.

    Its read end ($MULTIKERNEL_OUTPUT_HOLD_FD) is held, never read, for as long as the agent
    runs, so the pipe keeps a reader if the host dies (the workload's writes do not fail), and a
    restarted host can open it again through /proc to collect the output."""
    hold = os.environ.pop("MULTIKERNEL_OUTPUT_HOLD_FD", "")
    if hold.isdigit():
        os.set_inheritable(int(hold), False)  # the agent's alone: no child inherits it
    text = os.environ.pop("MULTIKERNEL_OUTPUT_FD", "")
    return int(text) if text.isdigit() else None


async def _run_workload(
    ep: Endpoint,
    state: AgentState,
    argv: list[str],
    cwd: str,
    output: int | None,
    gate: Gate | None = None,
) -> int:
    """Start the workload (or open its gate) unless it runs already; return its exit status."""
    if state.workload is None:
        failed = await _start_workload(ep, state, argv, cwd, output, gate)
        if failed is not None:
            return failed
    assert state.workload is not None
    return await state.workload.wait()


async def _start_workload(
    ep: Endpoint,
    state: AgentState,
    argv: list[str],
    cwd: str,
    output: int | None,
    gate: Gate | None = None,
) -> int | None:
    """Start the workload with its own bus attachment, its stdout and stderr on `output` (the
    host's pipe, which this closes once the workload holds it), or hand a standby's warm gate
    (whose output is that pipe already) the attachment. None once it runs; else the status of
    a workload that could not be started (127)."""
    attachment = await ep.attachment()
    env = dict(os.environ)
    env.pop("MULTIKERNEL_WORKLOAD", None)
    env.update(json.loads(os.environ.get("MULTIKERNEL_WORKLOAD_ENV", "{}")))
    env["MULTIKERNEL_BUS_FD"] = str(attachment.fileno())
    env.setdefault("PYTHONUNBUFFERED", "1")  # its output in the order it was written
    try:
        with attachment:
            if gate is not None:
                state.workload = await gate.open(attachment)
            else:
                state.workload = await anyio.open_process(
                    argv, cwd=cwd or None, env=env, pass_fds=[attachment.fileno()],
                    stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                )  # fmt: skip
    except OSError as exc:  # said where the user looks: the instance's output
        if output is not None:
            os.write(output, f"cannot start the workload {argv[0]!r}: {exc.strerror}\n".encode())
        return 127
    finally:
        if output is not None:
            os.close(output)
    log.info("workload started", instance=state.instance, argv=argv, pid=state.workload.pid)
    state.workload_started.set()
    return None


async def _stop_workload(state: AgentState) -> None:
    proc = state.workload
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    with anyio.move_on_after(WORKLOAD_GRACE):
        await proc.wait()
        return
    proc.kill()
    await proc.wait()


def _serve(ep: Bus, state: AgentState) -> Service:
    svc = ep.service(f"instance.{state.instance}.agent")

    @svc.method
    async def status(_: None) -> AgentStatus:
        proc = state.workload
        return AgentStatus(
            instance=state.instance, pid=os.getpid(), hostname=socket.gethostname(),
            cpus=_cpus(), workload_pid=proc.pid if proc else 0,
            workload_running=proc is not None and proc.returncode is None,
            uptime=time.monotonic() - state.started, memory=state.resources.memory,
            queues=state.resources.queues, resource_tx=state.resources.tx,
        )  # fmt: skip

    @svc.method
    async def exec(request: ExecRequest) -> ExecResult:
        try:
            with anyio.fail_after(request.timeout):
                done = await anyio.run_process(list(request.argv), check=False)
        except FileNotFoundError:
            raise NotFoundError(f"{request.argv[0]!r}: no such command in the instance") from None
        except TimeoutError:
            raise DeadlineExceededError(
                f"{request.argv[0]!r} did not finish within {request.timeout:g} s and was "
                "killed; give it longer with --timeout SECONDS"
            ) from None
        return ExecResult(done.returncode, done.stdout[-65536:], done.stderr[-65536:])

    svc.method(exec_stream, name="exec_stream")
    Terminals().serve(svc)

    @svc.method
    async def resource(request: ResourceTransaction) -> ResourceTransactionAck:
        """MK_RES_* from the host's resource actor: apply (or roll back), one ack per op."""
        if current_caller().instance != 0:
            raise AccessDeniedError("only the host changes an instance's resources")
        return await state.resources.handle(request)

    @svc.method
    async def elastic(request: ElasticRequest) -> Grant:
        """An application of this instance asks to grow or shrink it."""
        return await ask(ep, state.instance, request)

    @svc.method
    async def shutdown(request: Shutdown) -> ShutdownAck:
        state.halted_reason = "shutdown requested"
        state.stop.set()
        return ShutdownAck(instance=state.instance)

    return svc


async def run_agent() -> int:
    instance = int(os.environ["MULTIKERNEL_INSTANCE"])
    name = os.environ.get("MULTIKERNEL_INSTANCE_NAME", f"instance-{instance}")
    workload = json.loads(os.environ.get("MULTIKERNEL_WORKLOAD", "[]"))
    image_dir = os.environ.get("MULTIKERNEL_IMAGE_DIR", "")
    state = AgentState(instance, name, InstanceResources.from_environment(instance))
    output = _output_fd()
    status = 0
    period = float(os.environ.get("MULTIKERNEL_HEARTBEAT") or HEARTBEAT_SECONDS)
    takeover = Takeover.from_env()
    async with connect(name=f"agent-{name}") as ep:
        gate = None
        failed_start: int | None = None
        if takeover is not None:  # a standby: warm up, then wait to take the instance over
            gate = await takeover.warm(workload, image_dir, output)
            if gate is not None and output is not None:
                os.close(output)  # the gate's interpreter writes to it now
                output = None
            if not await takeover.wait_go():
                if gate is not None:
                    await gate.discard()
                log.info("standby discarded", instance=instance)
                return 0
            log.info("standby taking over", instance=instance, pid=os.getpid())
            if gate is not None and workload:  # its interpreter is warm: let it serve at once
                failed_start = await _start_workload(ep, state, workload, image_dir, None, gate)
        await _serve(ep, state).start()

        def hello() -> AgentHello:
            return AgentHello(
                instance, os.getpid(), socket.gethostname(), _cpus(), time.monotonic_ns()
            )

        await ep.publish(f"mk.instance.{instance}.hello", hello())
        async with anyio.create_task_group() as tg:

            async def beat() -> None:
                # The first beat says the workload is up: it comes once the workload has run
                # for a heartbeat period, so one that fails at start fails `mkctl start`.
                if workload:
                    await state.workload_started.wait()
                    await anyio.sleep(period)
                seq = 0
                attached_as = ep.id
                while True:
                    if ep.id != attached_as:  # re-attached to a restarted hub: say so again
                        attached_as = ep.id
                        await ep.publish(f"mk.instance.{instance}.hello", hello())
                    if state.workload is None or state.workload.returncode is None:
                        await ep.publish(
                            f"mk.instance.{instance}.system", SystemHeartbeat(instance, seq)
                        )
                        seq += 1
                    await anyio.sleep(period)

            async def workload_then_stop() -> None:
                nonlocal status
                if workload:
                    if failed_start is not None:
                        status = failed_start
                    else:
                        status = await _run_workload(ep, state, workload, image_dir, output, gate)
                    state.halted_reason = state.halted_reason or f"workload exited with {status}"
                    state.stop.set()

            tg.start_soon(beat)
            tg.start_soon(workload_then_stop)
            load_period = float(os.environ.get("MULTIKERNEL_LOAD_PERIOD") or LOAD_SECONDS)
            if load_period > 0:
                psi = os.environ.get("MULTIKERNEL_PSI")
                sampler = LoadSampler(name, os.getpid(), psi=Path(psi) if psi else None)
                tg.start_soon(report_load, ep, state.resources, sampler, load_period)
            await state.stop.wait()
            await _stop_workload(state)
            tg.cancel_scope.cancel()
        await ep.publish(f"mk.instance.{instance}.system", Halted(instance))
        log.info("instance halted", instance=instance, reason=state.halted_reason)
    return 0 if state.halted_reason == "shutdown requested" else status


def main() -> None:
    configure()
    sys.exit(runtime.run(run_agent))


if __name__ == "__main__":
    main()
