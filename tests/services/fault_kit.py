"""Real hosts, real instances and injected faults, for the durability and fault tests.

`HostProcess` runs `python -m multikernel.services.host` as a separate process, so a test can
SIGKILL the whole host and start another on the same state dir. The images are signed; their
workloads are small Python programs that attach to the bus from inside their instance:

- `KV` serves `instance.<id>.kv`: `ping` (who answers: pid, generation of the instance), `append`
  (a line to a journal in the instance's image dir, written and fsynced before the answer:
  what was acknowledged survives the process), `read`, and `say` (prints a line: its output);
- `CALLER` calls another instance's `kv.ping` in a loop (with the retrying client) and serves its
  counts on `instance.<id>.stats`;
- `GARBAGE` writes garbage into its own session ring when asked (its `kv`-like `garble` method).

Instance names are unique per test run (`unique`), since cgroups of concurrent runs on this
machine may share a parent directory.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from multikernel.endpoints import Endpoint, Retrying, connect
from multikernel.protocol import (
    CreateInstance,
    InstanceInfo,
    InstanceList,
    LoadImage,
    RestartPolicy,
    ShowInstances,
    StartInstance,
)
from multikernel.services._image import sign_image

MB = 1 << 20
#: How long a test waits for a process or an event before failing instead of hanging.
PATIENCE = 60.0
CGROUP_ROOTS = (Path("/sys/fs/cgroup/cpuset"), Path("/sys/fs/cgroup/memory"))

#: Guests may call each other's `instance.*.kv` (the tests' RPC load crosses instances).
POLICY = """
[[rule]]
who = "guest"
call = ["instance.*.kv"]
"""

KV = """
import json, os, sys
import anyio
from multikernel.endpoints import connect, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
JOURNAL = os.path.join(os.environ.get("MULTIKERNEL_IMAGE_DIR", "."), "journal")
BOOT = os.urandom(4).hex()  # which launch answers

def journal(line: str) -> None:
    with open(JOURNAL, "a") as f:
        f.write(line + "\\n")
        f.flush()
        os.fsync(f.fileno())

async def main() -> None:
    async with (
        connect(name="kv") as ep,
        await ep.subscribe(f"mk.instance.{ID}.in") as inbox,
        anyio.create_task_group() as tg,
    ):
        async def collect() -> None:
            async for message in inbox:
                journal(f"in:{message.value()}")
                await ep.publish(f"mk.instance.{ID}.noted", message.value())

        tg.start_soon(collect)
        svc = ep.service(f"instance.{ID}.kv")

        @svc.method
        async def ping(_: None) -> dict:
            return {"pid": os.getpid(), "instance": ID, "boot": BOOT}

        @svc.method
        async def append(line: str) -> int:
            journal(line)  # written and fsynced before the answer
            return 1

        @svc.method
        async def say(text: str) -> int:
            print(text, flush=True)  # to the instance's output, which the host collects
            return 1

        @svc.method
        async def read(_: None) -> list:
            try:
                with open(JOURNAL) as f:
                    return f.read().split()
            except FileNotFoundError:
                return []

        @svc.method
        async def hold(_: None) -> int:
            await ep.publish(f"mk.instance.{ID}.held", os.getpid())
            await anyio.sleep_forever()
            return 0

        @svc.method
        async def garble(_: None) -> int:
            # Garbage in this endpoint's own session ring: a frame that is no envelope.
            ep._link.session.try_send(b"\\xff" * 64)
            return 1

        await svc.start()
        print(json.dumps({"event": "serving", "pid": os.getpid()}), flush=True)
        await anyio.sleep_forever()

runtime.run(main)
"""

CALLER = """
import os
import anyio
from multikernel.endpoints import connect, retrying, runtime

ID = int(os.environ["MULTIKERNEL_INSTANCE"])
TARGET = os.environ["TARGET"]
counts = {"ok": 0, "failed": 0, "last_error": ""}

async def main() -> None:
    async with connect(name="caller") as ep:
        svc = ep.service(f"instance.{ID}.kv")

        @svc.method
        async def stats(_: None) -> dict:
            return dict(counts)

        await svc.start()
        caller = retrying(ep, within=10.0)  # idempotent pings ride out a replacement
        while True:
            try:
                await caller.request(TARGET, "ping", None)
                counts["ok"] += 1
            except Exception as exc:
                counts["failed"] += 1
                counts["last_error"] = f"{type(exc).__name__}: {exc}"
            if (counts["ok"] + counts["failed"]) % 20 == 0:
                await ep.publish(f"mk.instance.{ID}.progress", dict(counts))
            await anyio.sleep(0.002)

runtime.run(main)
"""

SLEEPER = "import time\ntime.sleep(3600)\n"


def unique(prefix: str) -> str:
    """An instance name no concurrent test run uses."""
    return f"{prefix}-{secrets.token_hex(3)}"


def make_image(
    root: Path, keys: tuple[bytes, bytes], body: str, *, name: str = "kv", env: str = ""
) -> Path:
    image = root / f"image-{name}"
    image.mkdir()
    (image / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "1"\nentry = ["{{python}}", "main.py"]\n{env}'
    )
    (image / "main.py").write_text(textwrap.dedent(body))
    sign_image(image, *keys)
    return image


class HostProcess:
    """`python -m multikernel.services.host` on a state dir of the test's, in its own process."""

    def __init__(self, root: Path, cert: Path, *extra: str) -> None:
        self.root = root
        self.socket = root / "bus.sock"
        self.state = root / "state"
        self.cert = cert
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.policy = root / "policy.toml"
        self.policy.write_text(POLICY)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, write: int) -> None:
        command = [
            sys.executable, "-m", "multikernel.services.host", "--socket", str(self.socket),
            "--state-dir", str(self.state), "--trusted-keys", str(self.cert),
            "--policy", str(self.policy), "--ready-fd", str(write),
            "--cpu-share", "4",  # several 1-CPU instances on a 2-CPU machine
            *self.extra,
        ]  # fmt: skip
        with (self.root / "host.log").open("ab") as log:
            self.proc = subprocess.Popen(
                command, pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    async def start(self) -> None:
        read, write = os.pipe()
        try:
            self._spawn(write)
        finally:
            os.close(write)
        assert self.proc is not None
        try:
            line = await _read_line(read)
        finally:
            os.close(read)
        if not line.startswith(b"ready"):
            self.proc.wait()
            raise AssertionError(f"the host did not start: see {self.root / 'host.log'}")

    def kill(self) -> None:
        """SIGKILL the host process: no goodbye, its instances run on."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def finish(self) -> None:
        """At the end of a test: stop the host; if the test left it killed, start it again first,
        so that it takes back and stops the instances the dead one left running."""
        if self.proc is not None and self.proc.poll() is not None:
            await self.start()
        await self.stop()

    async def stop(self) -> None:
        """SIGTERM: it stops its instances, drains the bus and exits."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await exited(self.proc.pid)
        self.proc.wait()


async def _read_line(fd: int) -> bytes:
    data = b""
    with anyio.fail_after(PATIENCE):
        while not data.endswith(b"\n"):
            await anyio.wait_readable(fd)
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
    return data


async def exited(pid: int) -> None:
    """Wait until process `pid` has ended (a pidfd: no polling); at once if it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(PATIENCE):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def cgroups_of(name: str) -> list[Path]:
    """The cgroup directories of instance `name` (its own, and its standby's `name.*`)."""
    found: list[Path] = []
    for root in CGROUP_ROOTS:
        found.extend(p for p in root.rglob(f"{name}*") if p.is_dir())
    return found


Caller = Endpoint | Retrying


async def lifecycle(ep: Caller, method: str, body: object) -> InstanceInfo:
    info: InstanceInfo = await ep.request("lifecycle", method, body, response=InstanceInfo)
    return info


async def show(ep: Caller, name: str) -> InstanceInfo:
    listing = await ep.request("lifecycle", "show", ShowInstances(name), response=InstanceList)
    return listing.instances[0]


async def bring_up(
    ep: Endpoint,
    name: str,
    image: Path,
    restart: RestartPolicy | None = None,
    command: tuple[str, ...] = (),
) -> InstanceInfo:
    """Create, load and start an instance; return it once its workload serves, if it serves."""
    create = CreateInstance(name, cpu_count=1, memory=192 * MB, restart=restart or RestartPolicy())
    await lifecycle(ep, "create", create)
    await lifecycle(ep, "load", LoadImage(name, str(image)))
    return await lifecycle(ep, "start", StartInstance(name, command))


async def owned(ep: Endpoint, name: str) -> None:
    """Until the well-known `name` has an owner (waiting on mk.bus.names.<name>, no polling)."""
    async with await ep.subscribe(f"mk.bus.names.{name}") as changes:
        if name in (await ep.introspect()).names:
            return
        with anyio.fail_after(PATIENCE):
            async for message in changes:
                if message.value().get("new_owner"):
                    return


@asynccontextmanager
async def attached(host: HostProcess, name: str = "test") -> AsyncIterator[Endpoint]:
    async with connect(host.socket, name=name) as ep:
        yield ep


def values(message: Any) -> Any:
    return message.value()


#: A workload that fails soon after it has started (exit status 3): a crash loop. It lives past
#: its agent's first heartbeat (0.2 s in these tests), so each launch is `active` before it fails;
#: one that ended sooner would fail its start instead (mkctl start reports it).
CRASHER = "import sys, time\ntime.sleep(0.5)\nsys.exit(3)\n"


def inject(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to one instance process: never to 0 or 1 (a group, or init)."""
    assert pid > 1, f"no process to signal (pid {pid}): the instance is not running"
    os.kill(pid, signum)
