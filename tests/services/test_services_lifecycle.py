"""The lifecycle actor end to end: states, failures, signatures, isolation, cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Hub, Policy
from multikernel.endpoints import Endpoint, connect
from multikernel.protocol import (
    AgentStatus,
    CreateInstance,
    DeleteInstance,
    ExecRequest,
    ExecResult,
    InstanceInfo,
    InstanceList,
    InstanceStateChanged,
    KillInstance,
    LoadImage,
    RemoteError,
    ShowInstances,
    StartInstance,
    UpdateInstance,
)
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import online_cpus
from multikernel.services._signature import make_signing_key

pytestmark = pytest.mark.anyio
MB = 1 << 20
#: This run's own cgroup group: other runs share the machine, and use the same instance names.
GROUP = f"multikernel-test-{os.getpid()}"
CGROUP_ROOT = Path("/sys/fs/cgroup/cpuset") / GROUP


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return make_signing_key("lifecycle tests", algorithm="ec-p256")


def make_image(root: Path, keys: tuple[bytes, bytes], *, body: str, sign: bool = True) -> Path:
    image = root / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "test"\nversion = "1.2"\nentry = ["{python}", "main.py"]\n'
    )
    (image / "main.py").write_text(textwrap.dedent(body))
    if sign:
        sign_image(image, *keys)
    return image


SLEEPER = "import time\ntime.sleep(300)\n"


@dataclass
class Host:
    hub: Hub
    actor: LifecycleActor
    bus: Endpoint
    root: Path

    async def call(self, method: str, body: object) -> InstanceInfo:
        info: InstanceInfo = await self.bus.request(
            "lifecycle", method, body, response=InstanceInfo
        )
        return info


@pytest.fixture
async def host(tmp_path: Path, keys: tuple[bytes, bytes]) -> AsyncIterator[Host]:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with connect(hub.path, name="lifecycle") as ep, connect(hub.path, name="test") as bus:
            actor = LifecycleActor(
                ep,
                LocalPlatform(group=GROUP),
                open_instance_socket=hub.open_instance_socket,
                state_dir=tmp_path / "state",
                trusted_certs=[keys[1]],
                hello_timeout=20,
            )
            async with anyio.create_task_group() as actors:
                await actors.start(actor.run)
                yield Host(hub, actor, bus, tmp_path)
                actors.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    assert not leftover_cgroups()


def leftover_cgroups() -> list[Path]:
    return [p for p in CGROUP_ROOT.iterdir() if p.is_dir()] if CGROUP_ROOT.exists() else []


async def bring_up(host: Host, name: str, image: Path) -> InstanceInfo:
    await host.call("create", CreateInstance(name, cpu_count=1, memory=128 * MB))
    await host.call("load", LoadImage(name, str(image)))
    return await host.call("start", StartInstance(name))


async def test_an_instance_goes_through_every_state(host: Host, keys: tuple[bytes, bytes]) -> None:
    image = make_image(host.root, keys, body=SLEEPER)
    async with await host.bus.subscribe("mk.instance.*.state") as states:
        assert (await host.call("create", CreateInstance("alpha"))).state == "empty"
        info = await host.call("update", UpdateInstance("alpha", cpu_count=1, memory=128 * MB))
        assert (info.state, info.memory, len(info.cpus)) == ("ready", 128 * MB, 1)
        info = await host.call("load", LoadImage("alpha", str(image)))
        assert (info.state, info.image, info.image_version, info.signer) == (
            "loaded",
            "test",
            "1.2",
            "CN=lifecycle tests",
        )
        info = await host.call("start", StartInstance("alpha"))
        assert info.state == "active"
        assert info.pid > 0
        assert (await host.call("kill", KillInstance("alpha"))).state == "loaded"
        assert (await host.call("start", StartInstance("alpha"))).state == "active"
        assert (await host.call("kill", KillInstance("alpha", force=True))).state == "loaded"
        await host.call("delete", DeleteInstance("alpha"))
        seen = []
        while not seen or seen[-1] != "deleted":
            seen.append((await states.receive()).decode(InstanceStateChanged).new)
    assert seen == ["empty", "ready", "loaded", "active", "loaded", "active", "loaded", "deleted"]
    assert (
        await host.bus.request("lifecycle", "show", ShowInstances(), response=InstanceList)
    ).instances == ()


async def test_wrong_state_errors_say_what_to_do(host: Host) -> None:
    await host.call("create", CreateInstance("beta", cpu_count=1, memory=128 * MB))
    with pytest.raises(RemoteError, match="load an image: mkctl load beta --image PATH"):
        await host.call("start", StartInstance("beta"))
    with pytest.raises(RemoteError, match="no instance named 'nope'"):
        await host.call("start", StartInstance("nope"))
    with pytest.raises(RemoteError, match="exists"):
        await host.call("create", CreateInstance("beta"))
    with pytest.raises(RemoteError, match="bad instance name"):
        await host.call("create", CreateInstance("Bad_Name"))
    with pytest.raises(RemoteError, match="not an online CPU"):
        await host.call("update", UpdateInstance("beta", cpus=(999,), memory=128 * MB))


async def test_an_active_instance_cannot_be_deleted(host: Host, keys: tuple[bytes, bytes]) -> None:
    await bring_up(host, "gamma", make_image(host.root, keys, body=SLEEPER))
    with pytest.raises(RemoteError, match="stop it first: mkctl kill gamma"):
        await host.call("delete", DeleteInstance("gamma"))
    await host.call("kill", KillInstance("gamma"))


async def test_sigkilled_agent_returns_the_instance_to_loaded_with_everything_reclaimed(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    info = await bring_up(host, "delta", make_image(host.root, keys, body=SLEEPER))
    async with await host.bus.subscribe(f"mk.instance.{info.id}.state") as states:
        os.kill(info.pid, signal.SIGKILL)
        change = (await states.receive()).decode(InstanceStateChanged)
    assert (change.old, change.new) == ("active", "loaded")
    assert "crashed (killed by signal 9)" in change.reason
    (after,) = (
        await host.bus.request("lifecycle", "show", ShowInstances("delta"), response=InstanceList)
    ).instances
    assert (after.restarts, after.last_exit, after.pid) == (1, "killed by signal 9", 0)
    assert not (CGROUP_ROOT / "delta").exists()
    assert (await host.call("start", StartInstance("delta"))).state == "active"  # and again
    await host.call("kill", KillInstance("delta"))


async def test_a_workload_that_ends_halts_its_instance(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    image = make_image(host.root, keys, body="print('done')\n")
    await host.call("create", CreateInstance("eps", cpu_count=1, memory=128 * MB))
    await host.call("load", LoadImage("eps", str(image)))
    async with await host.bus.subscribe("mk.instance.*.state") as states:
        await host.call("start", StartInstance("eps"))
        while (change := (await states.receive()).decode(InstanceStateChanged)).new != "loaded":
            pass
    assert "exit status 0" in change.reason or "halted" in change.reason


async def test_an_agent_that_never_says_hello_fails_the_start(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    host.actor.hello_timeout = 0.001
    image = make_image(host.root, keys, body=SLEEPER)
    await host.call("create", CreateInstance("zeta", cpu_count=1, memory=128 * MB))
    await host.call("load", LoadImage("zeta", str(image)))
    with pytest.raises(RemoteError, match="did not come up"):
        await host.call("start", StartInstance("zeta"))
    (info,) = (
        await host.bus.request("lifecycle", "show", ShowInstances("zeta"), response=InstanceList)
    ).instances
    assert info.state == "failed"
    assert (await host.call("kill", KillInstance("zeta"))).state == "loaded"


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        ("unsigned", "UnsignedImageError"),
        ("modified", "BadSignatureError"),
        ("untrusted", "UntrustedSignerError"),
    ],
)
async def test_images_that_are_not_trusted_are_refused(
    host: Host, keys: tuple[bytes, bytes], tamper: str, error: str
) -> None:
    signer = make_signing_key("stranger", algorithm="ec-p256") if tamper == "untrusted" else keys
    image = make_image(host.root, signer, body=SLEEPER, sign=tamper != "unsigned")
    if tamper == "modified":
        (image / "main.py").write_text("print('not what was signed')\n")
    await host.call("create", CreateInstance("eta", cpu_count=1, memory=128 * MB))
    with pytest.raises(RemoteError) as refused:
        await host.call("load", LoadImage("eta", str(image)))
    assert refused.value.remote_type == error
    (info,) = (
        await host.bus.request("lifecycle", "show", ShowInstances("eta"), response=InstanceList)
    ).instances
    assert info.state == "ready"


async def test_isolation_is_applied_and_read_back(host: Host, keys: tuple[bytes, bytes]) -> None:
    cpu = max(online_cpus())
    await host.call("create", CreateInstance("theta", cpus=(cpu,), memory=96 * MB))
    await host.call("load", LoadImage("theta", str(make_image(host.root, keys, body=SLEEPER))))
    info = await host.call("start", StartInstance("theta"))
    status = await host.bus.request(
        f"instance.{info.id}.agent", "status", None, response=AgentStatus
    )
    assert (status.hostname, status.cpus) == ("theta", (cpu,))
    proc = host.actor.instances["theta"].proc
    assert proc is not None
    report = host.actor.platform.inspect(proc)
    assert report.affinity == frozenset({cpu})
    if host.actor.platform.capabilities().namespaces:
        assert status.pid == 1  # the agent is PID 1 of its own namespace
        assert report.namespaces.pid != report.host_namespaces.pid
        assert report.namespaces.uts != report.host_namespaces.uts
    if host.actor.platform.capabilities().memory_limit:
        assert report.memory_limit == 96 * MB
    command = ("python3", "-c", "import os; print(sorted(os.sched_getaffinity(0)))")
    target = f"instance.{info.id}.agent"
    ran = await host.bus.request(target, "exec", ExecRequest(command), response=ExecResult)
    assert ran.stdout.strip() == f"[{cpu}]".encode()  # what the workload's children get too
    await host.call("update", UpdateInstance("theta", memory=128 * MB))
    if host.actor.platform.capabilities().memory_limit:
        assert host.actor.platform.inspect(proc).memory_limit == 128 * MB  # live
    await host.call("kill", KillInstance("theta"))


async def test_a_host_that_allows_unsigned_images_loads_them_and_says_so(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    host.actor.allow_unsigned = True  # mkctl host up --allow-unsigned
    image = make_image(host.root, keys, body=SLEEPER, sign=False)
    await host.call("create", CreateInstance("iota", cpu_count=1, memory=128 * MB))
    info = await host.call("load", LoadImage("iota", str(image)))
    assert (info.state, info.signer) == ("loaded", "unsigned")


async def test_an_abandoned_start_leaves_no_agent_running(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    await host.call("create", CreateInstance("kappa", cpu_count=1, memory=128 * MB))
    await host.call("load", LoadImage("kappa", str(make_image(host.root, keys, body=SLEEPER))))
    inst = host.actor.instances["kappa"]
    with anyio.move_on_after(0.05):  # the caller gives up while the agent starts
        await host.call("start", StartInstance("kappa"))
    # Giving up reaches the actor a moment later, and whatever the abandoned start did, its
    # handler holds the instance's lock until it has cleaned up: a kill waits for that, then
    # stops what may have come up (or is refused: the start never launched anything).
    with contextlib.suppress(RemoteError):
        await host.call("kill", KillInstance("kappa"))
    assert inst.proc is None
    assert inst.state in ("loaded", "ready")
    assert not leftover_cgroups()


async def test_stopping_the_actor_stops_and_reclaims_every_instance(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    image = make_image(tmp_path, keys, body=SLEEPER)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with connect(hub.path, name="lifecycle") as ep, connect(hub.path) as bus:
            platform = LocalPlatform(group=GROUP)
            actor = LifecycleActor(
                ep,
                platform,
                open_instance_socket=hub.open_instance_socket,
                state_dir=tmp_path / "state",
                trusted_certs=[keys[1]],
            )
            async with anyio.create_task_group() as actors:
                await actors.start(actor.run)
                pids = []
                for name in ("lam", "mu"):
                    await bus.request(
                        "lifecycle", "create", CreateInstance(name, cpu_count=1, memory=128 * MB)
                    )
                    await bus.request("lifecycle", "load", LoadImage(name, str(image)))
                    info = await bus.request(
                        "lifecycle", "start", StartInstance(name), response=InstanceInfo
                    )
                    pids.append(info.pid)
                stopping = time.monotonic()
                actors.cancel_scope.cancel()
            assert time.monotonic() - stopping < 20  # no 30 s wait on watchers that are gone
            for pid in pids:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
        tg.cancel_scope.cancel()
    assert not leftover_cgroups()
