"""The lifecycle actor's contract: instances, their states, and what mkctl asks of it.

An instance moves through the kernel's own states (``InstanceState``): ``empty`` (created, no
resources), ``ready`` (resources reserved), ``loaded`` (a verified image is unpacked for it),
``active`` (its agent runs), and ``failed``. A halted or crashed instance returns to ``loaded`` and
can be started again. Every change is published as ``InstanceStateChanged`` on
``mk.instance.<name>.state``.

The service is ``lifecycle``; its methods take the request structs below and answer
``InstanceInfo`` (``show`` answers ``InstanceList``). Resource sizes are bytes; CPUs are host CPU
ids (on a real multikernel host, the CPUs the instance owns).
"""

from __future__ import annotations

import msgspec

from multikernel.protocol._fault import RestartPolicy
from multikernel.protocol._fields import U32, U64, ShortStr


class _LifecycleMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Frozen, defaults left off the wire, unknown fields skipped (evolution rules)."""


class CreateInstance(_LifecycleMessage, frozen=True):
    """Create an instance; with resources it is ``ready`` at once, else ``empty``.

    ``cpus`` names host CPUs; ``cpu_count`` asks the resource actor to place that many (give one
    of them: ``parse_cpus`` turns ``2`` or ``@0-3`` into either). ``queues`` names I/O queues.
    ``restart`` is what the fault actor does when it fails (docs/fault.md).
    """

    name: ShortStr
    cpus: tuple[U32, ...] = ()
    cpu_count: U32 = 0
    memory: U64 = 0
    restart: RestartPolicy = RestartPolicy()
    queues: tuple[ShortStr, ...] | None = None


class UpdateInstance(_LifecycleMessage, frozen=True):
    """Change an instance's resources (live when it is active) or its restart policy; left out:
    kept.

    ``queues`` None keeps its I/O queues, ``()`` gives them back.
    """

    name: ShortStr
    cpus: tuple[U32, ...] = ()
    cpu_count: U32 = 0
    memory: U64 = 0
    restart: RestartPolicy | None = None
    queues: tuple[ShortStr, ...] | None = None


class LoadImage(_LifecycleMessage, frozen=True):
    """Verify an image's signature and unpack it for the instance (``ready`` → ``loaded``).

    Whether unsigned images are accepted is the host's setting, not the requester's.
    """

    name: ShortStr
    image: str


class StartInstance(_LifecycleMessage, frozen=True):
    """Launch the instance's agent and workload (``loaded`` → ``active``).

    ``command`` replaces the image's entry command when given.
    """

    name: ShortStr
    command: tuple[str, ...] = ()


class KillInstance(_LifecycleMessage, frozen=True):
    """Stop an instance: negotiated shutdown within ``grace`` seconds, then forced.

    ``force`` skips the negotiation.
    """

    name: ShortStr
    force: bool = False
    grace: float = 5.0


class DeleteInstance(_LifecycleMessage, frozen=True):
    """Forget an instance that is not active; its resources and unpacked image are released."""

    name: ShortStr


class ShowInstances(_LifecycleMessage, frozen=True):
    """Describe one instance (``name``) or all of them."""

    name: ShortStr = ""


class InstanceInfo(_LifecycleMessage, frozen=True):
    """What the lifecycle actor knows of one instance."""

    name: str
    id: U32
    state: str
    cpus: tuple[U32, ...] = ()
    memory: U64 = 0
    image: str = ""
    image_version: str = ""
    signer: str = ""
    pid: U32 = 0
    agent: U64 = 0
    started_ns: U64 = 0
    restarts: U32 = 0
    last_exit: str = ""
    isolation: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    restart: RestartPolicy = RestartPolicy()
    generation: U32 = 0  # launches so far: each start (or restart) is a new generation
    cause: str = ""  # why the last launch ended: requested, exited, crashed, lost, hang, garbage
    standby: U32 = 0  # pid of the warm standby agent, 0 when there is none
    queues: tuple[str, ...] = ()
    image_source: str = ""  # where the loaded image was read from (LoadImage.image)
    image_digest: str = ""  # "sha256:<hex>" of its signed payload


class InstanceList(_LifecycleMessage, frozen=True):
    """The answer to ``show``."""

    instances: tuple[InstanceInfo, ...] = ()


class InstanceStateChanged(_LifecycleMessage, frozen=True):
    """Published on ``mk.instance.<name>.state`` at every transition."""

    name: str
    id: U32
    old: str
    new: str
    reason: str = ""
    generation: U32 = 0  # the launch the change is about
    cause: str = ""  # when a launch ended: why (see InstanceInfo.cause)


class AgentHello(_LifecycleMessage, frozen=True):
    """The agent, first process of an instance, is up: published on ``mk.instance.<id>.hello``.

    It reports what it sees from inside: its pid there, hostname, CPUs it may run on.
    """

    instance: U32
    pid: U32
    hostname: str
    cpus: tuple[U32, ...] = ()
    sent_ns: U64 = 0


class ExecRequest(_LifecycleMessage, frozen=True):
    """Run a command inside the instance (the agent's ``exec`` method)."""

    argv: tuple[str, ...]
    timeout: float = 30.0


class ExecResult(_LifecycleMessage, frozen=True):
    """What a command run inside the instance did."""

    status: int
    stdout: bytes = b""
    stderr: bytes = b""


class AgentStatus(_LifecycleMessage, frozen=True):
    """The agent's ``status`` method: its view of the instance."""

    instance: U32
    pid: U32
    hostname: str
    cpus: tuple[U32, ...] = ()
    workload_pid: U32 = 0
    workload_running: bool = False
    uptime: float = 0.0
    memory: U64 = 0  # the instance's memory grant, as the agent last applied it
    queues: tuple[str, ...] = ()  # I/O queues granted to the instance
    resource_tx: U64 = 0  # the last resource transaction the agent applied


class ExecOutput(_LifecycleMessage, frozen=True):
    """One item of a streamed command's output (the agent's ``exec_stream`` and ``tty_read``).

    ``stream`` is 1 (stdout) or 2 (stderr); the last item has ``exited`` set and the command's
    ``status`` (negative: killed by that signal), and no data.
    """

    data: bytes = b""
    stream: U32 = 1
    exited: bool = False
    status: int = 0


class TtyOpen(_LifecycleMessage, frozen=True):
    """Start ``argv`` on a new pseudo-terminal in the instance (the agent's ``tty_open``)."""

    argv: tuple[str, ...]
    rows: U32 = 24
    cols: U32 = 80
    term: str = "xterm"


class TtySession(_LifecycleMessage, frozen=True):
    """A terminal session: the answer to ``tty_open``, and what ``tty_read`` streams."""

    session: U32


class TtyInput(_LifecycleMessage, frozen=True):
    """Keystrokes for a session (``tty_write``); ``rows``/``cols`` resize it when not 0."""

    session: U32
    data: bytes = b""
    rows: U32 = 0
    cols: U32 = 0


class ReadLogs(_LifecycleMessage, frozen=True):
    """Read an instance's own output (``lifecycle.logs``, streamed as ``LogLines``).

    ``since_ns`` is a wall-clock time (ns since the epoch): older lines are left out; ``tail``
    keeps only the last lines; ``follow`` goes on with new lines until the instance's output ends.
    """

    name: ShortStr
    since_ns: U64 = 0
    tail: U32 = 0
    follow: bool = False


class LogLine(_LifecycleMessage, frozen=True):
    """One line of an instance's output and when the host received it (ns since the epoch)."""

    ts_ns: U64
    text: str


class LogLines(_LifecycleMessage, frozen=True):
    """A batch of lines, oldest first."""

    lines: tuple[LogLine, ...] = ()
