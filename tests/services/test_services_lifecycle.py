"""The lifecycle actor end to end: states, failures, signatures, isolation, cleanup."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
    NotFoundError,
    RefusedError,
    RemoteError,
    ShowInstances,
    StartInstance,
    UpdateInstance,
)
from multikernel.services._enforce import LocalHostSide
from multikernel.services._host import host_rule
from multikernel.services._image import sign_image
from multikernel.services._lifecycle import LifecycleActor
from multikernel.services._local import LocalPlatform
from multikernel.services._local_probe import online_cpus
from multikernel.services._local_process import LocalInstance
from multikernel.services._platform import InstanceProcess, LaunchSpec
from multikernel.services._pool import discover_pool
from multikernel.services._resource import ResourceActor
from multikernel.services._resource_store import ResourceStore
from multikernel.services._signature import make_signing_key
from tests._run import CGROUP_GROUP, cgroups_under, group_dirs

pytestmark = pytest.mark.anyio
MB = 1 << 20
#: This run's cpuset group: another run, a demo or a host never shares it (tests/_run.py).
CPUSET_GROUP = group_dirs(CGROUP_GROUP)[0]


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


@asynccontextmanager
async def resource_actor(hub: Hub, platform: LocalPlatform, state: Path) -> AsyncIterator[None]:
    """The resource actor the lifecycle actor asks, on this machine, in this process."""
    async with connect(hub.path, name="resource") as ep, anyio.create_task_group() as tg:
        store = ResourceStore(state / "resource.db")
        try:
            actor = ResourceActor(ep, discover_pool(), store, host=LocalHostSide(platform))
            await tg.start(actor.run)
            yield
            tg.cancel_scope.cancel()
        finally:
            store.close()


@pytest.fixture
async def host(tmp_path: Path, keys: tuple[bytes, bytes]) -> AsyncIterator[Host]:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    platform = LocalPlatform(group=CGROUP_GROUP)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        async with (
            resource_actor(hub, platform, tmp_path / "state"),
            connect(hub.path, name="lifecycle") as ep,
            connect(hub.path, name="test") as bus,
        ):
            actor = LifecycleActor(
                ep,
                platform,
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


def leftover_cgroups() -> set[Path]:
    """Instance cgroups of this run's platforms (another run's or a demo's are not looked at)."""
    return cgroups_under(CGROUP_GROUP)


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
    with pytest.raises(RefusedError, match="load an image: mkctl load beta --image PATH"):
        await host.call("start", StartInstance("beta"))
    with pytest.raises(NotFoundError, match="no instance named 'nope'"):
        await host.call("start", StartInstance("nope"))
    with pytest.raises(RefusedError, match="exists"):
        await host.call("create", CreateInstance("beta"))
    with pytest.raises(RefusedError, match="bad instance name"):
        await host.call("create", CreateInstance("Bad_Name"))
    with pytest.raises(RefusedError, match="not an online CPU"):
        await host.call("update", UpdateInstance("beta", cpus=(999,), memory=128 * MB))


async def test_a_create_that_fails_validation_leaves_nothing_behind(host: Host) -> None:
    refused = [
        (CreateInstance("omega", cpus=(999,), memory=128 * MB), "not an online CPU"),
        (CreateInstance("omega", cpu_count=1), "needs CPUs and memory"),
        (CreateInstance("omega", cpu_count=1, memory=1 * MB), "below the 16 MiB an instance needs"),
    ]
    async with await host.bus.subscribe("mk.instance.*.state") as states:
        for request, error in refused:
            with pytest.raises(RefusedError, match=error):
                await host.call("create", request)
        listed = await host.bus.request("lifecycle", "show", ShowInstances(), response=InstanceList)
        assert listed.instances == ()
        info = await host.call("create", CreateInstance("omega", cpu_count=1, memory=128 * MB))
        assert (info.id, info.state) == (1, "ready")  # no instance id was used up either
        first = (await states.receive()).decode(InstanceStateChanged)
    assert (first.name, first.old, first.new) == ("omega", "none", "empty")  # none announced
    assert not leftover_cgroups()
    assert not (host.root / "state" / "instances").exists()


async def test_an_active_instance_cannot_be_deleted(host: Host, keys: tuple[bytes, bytes]) -> None:
    await bring_up(host, "gamma", make_image(host.root, keys, body=SLEEPER))
    with pytest.raises(RefusedError, match="stop it first: mkctl kill gamma"):
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
    assert not (CPUSET_GROUP / "delta").exists()
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
    with pytest.raises(RefusedError) as refused:
        await host.call("load", LoadImage("eta", str(image)))
    assert refused.value.remote_type == error
    (info,) = (
        await host.bus.request("lifecycle", "show", ShowInstances("eta"), response=InstanceList)
    ).instances
    assert info.state == "ready"


async def start_isolated(
    host: Host, keys: tuple[bytes, bytes], cpu: int, memory: int
) -> tuple[InstanceInfo, AgentStatus, LocalInstance]:
    await host.call("create", CreateInstance("theta", cpus=(cpu,), memory=memory))
    await host.call("load", LoadImage("theta", str(make_image(host.root, keys, body=SLEEPER))))
    info = await host.call("start", StartInstance("theta"))
    status = await host.bus.request(
        f"instance.{info.id}.agent", "status", None, response=AgentStatus
    )
    proc = host.actor.instances["theta"].proc
    assert isinstance(proc, LocalInstance)
    return info, status, proc


def skip_unless(host: Host, mechanism: str) -> None:
    """Skip, saying why, when this host cannot apply `mechanism` (not root, no kernel support)."""
    capabilities = host.actor.platform.capabilities()
    if not getattr(capabilities, mechanism):
        reasons = "; ".join(capabilities.warnings) or "the platform says it is unavailable"
        pytest.skip(f"{mechanism} isolation is not applied on this host: {reasons}")


async def test_cpus_are_applied_and_read_back(host: Host, keys: tuple[bytes, bytes]) -> None:
    """CPU affinity applies everywhere, root or not, and the workload's children inherit it."""
    cpu = max(online_cpus())
    info, status, proc = await start_isolated(host, keys, cpu, 96 * MB)
    assert (status.hostname, status.cpus) == ("theta", (cpu,))
    assert host.actor.platform.inspect(proc).affinity == frozenset({cpu})
    command = ("python3", "-c", "import os; print(sorted(os.sched_getaffinity(0)))")
    target = f"instance.{info.id}.agent"
    ran = await host.bus.request(target, "exec", ExecRequest(command), response=ExecResult)
    assert ran.stdout.strip() == f"[{cpu}]".encode()  # what the workload's children get too
    await host.call("kill", KillInstance("theta"))


async def test_namespaces_are_applied_and_read_back(host: Host, keys: tuple[bytes, bytes]) -> None:
    skip_unless(host, "namespaces")  # PID/UTS/mount namespaces need root (CAP_SYS_ADMIN)
    _, status, proc = await start_isolated(host, keys, max(online_cpus()), 96 * MB)
    report = host.actor.platform.inspect(proc)
    assert status.pid == 1  # the agent is PID 1 of its own namespace
    assert report.namespaces.pid != report.host_namespaces.pid
    assert report.namespaces.uts != report.host_namespaces.uts
    await host.call("kill", KillInstance("theta"))


async def test_the_memory_limit_is_applied_and_updated_live(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    skip_unless(host, "memory_limit")  # a memory cgroup needs root and cgroup v1
    _, _, proc = await start_isolated(host, keys, max(online_cpus()), 96 * MB)
    assert host.actor.platform.inspect(proc).memory_limit == 128 * MB  # whole 128 MiB blocks
    await host.call("update", UpdateInstance("theta", memory=256 * MB))
    assert host.actor.platform.inspect(proc).memory_limit == 256 * MB  # live
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
    host: Host, keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    await host.call("create", CreateInstance("kappa", cpu_count=1, memory=128 * MB))
    await host.call("load", LoadImage("kappa", str(make_image(host.root, keys, body=SLEEPER))))
    inst = host.actor.instances["kappa"]
    platform = host.actor.platform
    launched = anyio.Event()
    real_launch = platform.launch

    async def launch(spec: LaunchSpec) -> InstanceProcess:
        proc = await real_launch(spec)
        launched.set()
        return proc

    monkeypatch.setattr(platform, "launch", launch)
    async with await host.bus.subscribe(f"mk.instance.{inst.id}.state") as states:
        async with anyio.create_task_group() as caller:
            caller.start_soon(host.call, "start", StartInstance("kappa"))
            await launched.wait()  # the agent runs; its hello is ~100 ms away
            caller.cancel_scope.cancel()  # the caller gives up while the agent starts
        while (change := (await states.receive()).decode(InstanceStateChanged)).new != "failed":
            pass
    assert change.reason == "start abandoned by its caller"
    with anyio.fail_after(30):
        await inst.exited.wait()  # set by its watcher once the launch is reclaimed
        async with inst.lock:  # and the start request has finished with the instance
            pass
    assert inst.proc is None
    assert not leftover_cgroups()
    assert (await host.call("kill", KillInstance("kappa"))).state == "loaded"


async def test_stopping_the_actor_stops_and_reclaims_every_instance(
    tmp_path: Path, keys: tuple[bytes, bytes]
) -> None:
    hub = Hub(tmp_path / "bus.sock", policy=Policy.from_toml(host_rule(os.getuid())))
    image = make_image(tmp_path, keys, body=SLEEPER)
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve)
        platform = LocalPlatform(group=CGROUP_GROUP)
        async with (
            resource_actor(hub, platform, tmp_path / "state"),
            connect(hub.path, name="lifecycle") as ep,
            connect(hub.path) as bus,
        ):
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


# -- grants have a real effect on running instances ------------------------------------------
# `update` goes to the resource actor, which changes the instance's cpuset and memory limit and
# has its agent move every thread; the kernel is asked what each process really has.

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="reading back cpusets and memory limits needs root: only root gets cgroups",
)
CPUS = sorted(discover_pool().cpus)
#: A workload that does `{work}`, then says so on mk.instance.<id>.ready and stays.
ANNOUNCING = """
import os, subprocess, anyio
from multikernel.endpoints import connect
{work}
async def main():
    async with connect(name="workload", reconnect=False) as ep:
        await ep.publish(f"mk.instance.{{os.environ['MULTIKERNEL_INSTANCE']}}.ready")
        await anyio.sleep_forever()
anyio.run(main)
"""
FORKS = ANNOUNCING.format(work="subprocess.Popen(['sleep', '300'])")
IDLE = ANNOUNCING.format(work="")
HOG = ANNOUNCING.format(  # touches 200 MiB and keeps it
    work="hog = bytearray(200 << 20)\nfor i in range(0, len(hog), 4096):\n    hog[i] = 1"
)


async def up(host: Host, keys: tuple[bytes, bytes], name: str, body: str, **asked: object) -> int:
    """Create, load and start `name`; return once its workload says it is ready."""
    (host.root / name).mkdir()
    info = await host.call("create", CreateInstance(name, **asked))  # type: ignore[arg-type]
    await host.call("load", LoadImage(name, str(make_image(host.root / name, keys, body=body))))
    async with await host.bus.subscribe(f"mk.instance.{info.id}.ready") as ready:
        await host.call("start", StartInstance(name))
        await ready.receive()
    return info.id


def seen_inside(host: Host, name: str) -> dict[str, object]:
    text = (host.root / "state" / "instances" / name / "resources.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


@needs_root
@pytest.mark.skipif(len(CPUS) < 2, reason="moving an instance between CPUs needs two of them")
async def test_a_cpu_grant_changes_the_cpuset_and_the_affinity_of_every_process(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    await up(host, keys, "alpha", FORKS, cpus=(CPUS[-1],), memory=128 * MB)
    proc = host.actor.instances["alpha"].proc
    assert proc is not None
    both = frozenset(CPUS[:2])
    info = await host.call("update", UpdateInstance("alpha", cpus=tuple(both)))
    report = host.actor.platform.inspect(proc)
    assert set(info.cpus) == report.cpuset_cpus == both
    assert len(report.processes) >= 3  # the agent, the workload and its child
    assert {pid: os.sched_getaffinity(pid) for pid in report.processes} == dict.fromkeys(
        report.processes, both
    )
    assert seen_inside(host, "alpha")["cpus"] == sorted(both)
    info = await host.call("update", UpdateInstance("alpha", cpu_count=1))  # give one back
    report = host.actor.platform.inspect(proc)
    assert len(info.cpus) == 1
    assert report.cpuset_cpus == set(info.cpus)
    assert {os.sched_getaffinity(pid) == set(info.cpus) for pid in report.processes} == {True}


@needs_root
async def test_a_memory_grant_changes_the_limit_and_a_shrink_below_use_is_refused(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    id = await up(host, keys, "beta", IDLE, cpu_count=1,
                  memory=128 * MB)  # fmt: skip
    proc = host.actor.instances["beta"].proc
    assert proc is not None
    await host.call("update", UpdateInstance("beta", memory=384 * MB))
    assert host.actor.platform.inspect(proc).memory_limit == 384 * MB
    status = await host.bus.request(f"instance.{id}.agent", "status", None, response=AgentStatus)
    assert status.memory == 384 * MB
    await host.call("update", UpdateInstance("beta", memory=256 * MB))
    assert host.actor.platform.inspect(proc).memory_limit == 256 * MB


@needs_root
async def test_shrinking_memory_below_what_the_instance_uses_is_refused_and_kills_nothing(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    await up(host, keys, "gamma", HOG, cpu_count=1, memory=384 * MB)  # 200 MiB in use
    proc = host.actor.instances["gamma"].proc
    assert proc is not None
    with pytest.raises(RefusedError) as refused:
        await host.call("update", UpdateInstance("gamma", memory=128 * MB))
    assert refused.value.remote_type == "GrantFailedError"
    message = str(refused.value)
    assert message.startswith("'gamma' did not get its new grant: the instance refused it: ")
    assert (
        "of memory, more than the 128 MiB asked: free memory inside it or ask for more" in message
    )
    report = host.actor.platform.inspect(proc)
    assert report.memory_limit == 384 * MB  # unchanged
    assert len(report.processes) >= 2  # nobody was OOM-killed
    assert host.actor.instances["gamma"].state == "active"


@needs_root
async def test_queue_grants_are_recorded_and_visible_inside_the_instance(
    host: Host, keys: tuple[bytes, bytes]
) -> None:
    queues = sorted(discover_pool().queues)
    if not queues:
        pytest.skip("this machine has no NIC, disk or GPU queue to grant")
    id = await up(host, keys, "delta", IDLE, cpu_count=1,
                  memory=128 * MB, queues=(queues[0],))  # fmt: skip
    status = await host.bus.request(f"instance.{id}.agent", "status", None, response=AgentStatus)
    assert status.queues == (queues[0],)
    assert seen_inside(host, "delta")["queues"] == [queues[0]]
    info = await host.call("update", UpdateInstance("delta", queues=()))
    assert info.queues == ()
    status = await host.bus.request(f"instance.{id}.agent", "status", None, response=AgentStatus)
    assert status.queues == ()


# -- refusals leave nothing behind ------------------------------------------------------------


async def test_a_refused_create_leaves_no_instance_and_says_why_in_sizes_for_people(
    host: Host,
) -> None:
    too_much = CreateInstance("huge", cpu_count=1, memory=int(41.5 * 2**30))
    with pytest.raises(RefusedError) as refused:
        await host.call("create", too_much)
    assert refused.value.remote_type == "ResourceUnavailableError"
    assert str(refused.value).startswith("41.5 GiB of memory asked for 'huge', ")
    with pytest.raises(RefusedError, match="CPU 999 is not an online CPU of this host's pool"):
        await host.call("create", CreateInstance("odd", cpus=(999,), memory=128 * MB))
    with pytest.raises(RefusedError, match="needs CPUs and memory"):
        await host.call("create", CreateInstance("half", cpu_count=1))
    with pytest.raises(RefusedError, match="give CPU ids or a CPU count, not both"):
        await host.call("create", CreateInstance("both", cpus=(0,), cpu_count=1, memory=128 * MB))
    shown = await host.bus.request("lifecycle", "show", ShowInstances(), response=InstanceList)
    assert shown.instances == ()


async def test_two_instances_never_share_a_cpu_and_a_refused_update_changes_nothing(
    host: Host,
) -> None:
    cpu = max(online_cpus())
    first = await host.call("create", CreateInstance("alpha", cpus=(cpu,), memory=128 * MB))
    with pytest.raises(RefusedError) as refused:
        await host.call("create", CreateInstance("beta", cpus=(cpu,), memory=128 * MB))
    assert str(refused.value).startswith(f"CPU {cpu} for 'beta' is held by 'alpha'; free: CPUs")
    await host.call("create", CreateInstance("gamma"))
    with pytest.raises(RefusedError, match="is held by 'alpha'"):
        await host.call("update", UpdateInstance("gamma", cpus=(cpu,), memory=128 * MB))
    (gamma,) = (
        await host.bus.request("lifecycle", "show", ShowInstances("gamma"), response=InstanceList)
    ).instances
    assert (gamma.state, gamma.cpus, gamma.memory) == ("empty", (), 0)
    await host.call("delete", DeleteInstance("alpha"))  # gives CPU back
    info = await host.call("update", UpdateInstance("gamma", cpus=(cpu,), memory=128 * MB))
    assert (info.state, info.cpus) == ("ready", first.cpus)
