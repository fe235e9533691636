"""mkctl, as a user runs it: a separate process talking to a host; errors and their status."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from multikernel.protocol import Grant, History, PoolInfo, format_size
from multikernel.services._host import cgroup_group

from .conftest import fails, first_line, mkctl

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def test_a_user_drives_an_instance_with_mkctl(host: Path) -> None:
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "load", "web", "--image", str(host / "image")))[0] == 0
    code, out, _ = await mkctl(host, "start", "web")
    assert code == 0
    assert "active" in out
    code, out, _ = await mkctl(host, "show", "web", "--json")
    (info,) = json.loads(out)
    assert (info["name"], info["state"], info["memory"]) == ("web", "active", 128 << 20)
    code, out, _ = await mkctl(host, "exec", "web", "--", "true")
    assert (code, out) == (0, "")
    assert (await mkctl(host, "kill", "web"))[0] == 0
    assert (await mkctl(host, "delete", "web"))[0] == 0
    code, out, _ = await mkctl(host, "show")
    assert "no instances" in out


async def test_lifecycle_errors_are_one_line_with_their_exit_status(host: Path) -> None:
    assert (await mkctl(host, "create", "db", "--cpus", "1", "--memory", "128M"))[0] == 0
    assert await fails(host, "start", "db") == (
        4,
        "error: cannot start 'db': it is ready, and start needs loaded; "
        "load an image: mkctl load db --image PATH",
    )
    assert await fails(host, "show", "nope") == (
        3,
        "error: no instance named 'nope' (known: db); mkctl create nope",
    )
    assert await fails(host, "kill", "nope") == (
        3,
        "error: no instance named 'nope' (known: db); mkctl create nope",
    )
    assert await fails(host, "create", "db", "--memory", "128M") == (
        4,
        "error: an instance named 'db' exists: pick another name or delete it",
    )
    code, message = await fails(host, "create", "big", "--cpus", "4096", "--memory", "128M")
    assert code == 4
    assert message.startswith(f"error: 4096 CPUs asked for 'big', {os.cpu_count() - 1} free; ")
    assert message.endswith("and 128 MiB")  # who holds what: 'db', its CPU and its memory
    assert "held: 'db' CPUs " in message
    assert await fails(host, "create", "small", "--memory", "1M") == (
        4,
        "error: 1 MiB of memory is below the 16 MiB an instance needs",
    )
    _, out, _ = await mkctl(host, "show", "--json")
    assert [i["name"] for i in json.loads(out)] == ["db"]  # refused creates left nothing
    assert await fails(host, "exec", "db", "--", "true") == (
        4,
        "error: cannot exec in 'db': it is ready; start it first: mkctl start db",
    )


async def test_image_errors_are_refused_or_not_found(host: Path) -> None:
    unsigned = host / "unsigned"
    unsigned.mkdir()
    (unsigned / "manifest.toml").write_text('name = "u"\nversion = "1"\nentry = ["true"]\n')
    assert (await mkctl(host, "create", "web", "--memory", "128M"))[0] == 0
    assert await fails(host, "load", "web", "--image", str(unsigned)) == (
        4,
        f"error: {unsigned}: the image is not signed; sign it with `mkctl image sign`, or allow "
        "unsigned images in this host's configuration",
    )
    missing = host / "missing.tar"
    assert await fails(host, "load", "web", "--image", str(missing)) == (
        3,
        f"error: {missing}: cannot read the image (No such file or directory); pass a "
        "directory or a .tar/.tar.gz file",
    )


async def test_active_instance_errors(host: Path) -> None:
    await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M")
    await mkctl(host, "load", "web", "--image", str(host / "image"))
    assert (await mkctl(host, "start", "web"))[0] == 0
    assert await fails(host, "delete", "web") == (
        4,
        "error: 'web' is active: stop it first: mkctl kill web",
    )
    assert await fails(host, "exec", "web", "--", "no-such-command") == (
        3,
        "error: 'no-such-command': no such command in the instance",
    )
    assert await fails(host, "exec", "--timeout", "0.2", "web", "--", "sleep", "30") == (
        5,
        "error: 'sleep' did not finish within 0.2 s and was killed; give it longer with "
        "--timeout SECONDS",
    )
    assert (await mkctl(host, "kill", "web"))[0] == 0


async def test_bus_errors_are_one_line_with_their_exit_status(host: Path) -> None:
    assert await fails(host, "bus", "call", "nobody", "method") == (
        3,
        "error: nobody owns 'nobody'; the request was not delivered",
    )
    assert await fails(host, "bus", "call", "lifecycle", "nomethod") == (
        3,
        "error: 'lifecycle' has no method 'nomethod'",
    )
    assert await fails(host, "bus", "call", "lifecycle", "show", "{bad") == (
        2,
        "error: BODY is not valid JSON (Expecting property name enclosed in double quotes at "
        """column 2): '{bad'; write e.g. '{"key": 1}', '"text"' or 42""",
    )
    assert await fails(host, "bus", "pub", "mk.test", "nope") == (
        2,
        "error: BODY is not valid JSON (Expecting value at column 1): 'nope'; "
        """write e.g. '{"key": 1}', '"text"' or 42""",
    )
    assert await fails(host, "bus", "pub", "a..b", "1") == (
        2,
        "error: subject 'a..b' has an empty token at position 2; separate tokens with single "
        "dots and do not start or end with a dot",
    )


async def test_usage_errors_exit_2_with_one_line(host: Path) -> None:
    assert await fails(host, "create", "db2", "--memory", "lots") == (
        2,
        "error: mkctl create: Invalid value for '--memory': not a size: 'lots' (use e.g. 256M, "
        "1.5G, 2GiB or 4096 bytes)",
    )
    code, line = await fails(host, "create", "db2", "--memory", "0")
    assert code == 2
    assert line.startswith("error: mkctl create: Invalid value for '--memory': ")
    code, line = await fails(host, "create", "db2", "--cpus", "0", "--memory", "128M")
    assert (code, line) == (
        2,
        "error: mkctl create: Invalid value for '--cpus': --cpus 0 asks for no CPU: a count is a "
        "number (2); a list of CPU ids starts with @ (@1, @0-3,6); CPU 0 alone is @0",
    )
    code, line = await fails(host, "create", "db2", "--cpus", "@x", "--memory", "128M")
    assert code == 2
    assert "a list of CPU ids starts with @" in line
    _, out, _ = await mkctl(host, "show", "--json")
    assert json.loads(out) == []  # no usage error reached the host
    code, line = await fails(host, "frobnicate")
    assert code == 2
    assert line == "error: mkctl: No such command 'frobnicate'."


async def test_debug_adds_the_traceback_after_the_same_line(host: Path) -> None:
    code, _, err = await mkctl(host, "--debug", "show", "nope")
    assert code == 3
    assert first_line(err) == "error: no instance named 'nope' (known: none); mkctl create nope"
    assert "Traceback (most recent call last)" in err
    assert "UnknownInstanceError" in err


async def test_mkctl_without_a_host_says_how_to_start_one(tmp_path: Path) -> None:
    code, _, err = await mkctl(tmp_path, "show")
    assert code == 1
    assert first_line(err) == (
        f"error: no hub is listening on {tmp_path / 'bus.sock'} (No such file or directory); "
        "start one with `mkctl host up` or `python -m multikernel.bus`, or set $MULTIKERNEL_BUS"
    )
    code, _, err = await mkctl(tmp_path, "--state-dir", str(tmp_path), "host", "down")
    assert (code, first_line(err)) == (
        3,
        f"error: no host pid file at {tmp_path / 'host.pid'}: is a host running? "
        "(mkctl host status)",
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to run mkctl without the power to bypass modes",
)
async def test_a_user_who_may_not_reach_the_hub_is_refused(host: Path) -> None:
    """Root without CAP_DAC_OVERRIDE stands for a user the socket's mode keeps out."""
    sock = host / "bus.sock"
    sock.chmod(0)
    env = {**os.environ, "MULTIKERNEL_BUS": str(sock)}
    argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    done = await anyio.run_process(
        [*argv, sys.executable, "-m", "multikernel.endpoints.mkctl", "show"], env=env, check=False
    )
    assert done.returncode == 4
    assert first_line(done.stderr.decode()) == (
        f"error: this user may not attach to the hub on {sock} (Permission denied): "
        "run as the host's user or root, or use a hub of your own (`mkctl host up --socket PATH`)"
    )


@pytest.mark.skipif(
    os.geteuid() != 0, reason="an instance gets a UTS namespace only when the host runs as root"
)
async def test_mkctl_exec_runs_inside_the_instance(host: Path) -> None:
    """With a UTS namespace of its own, the instance's hostname is its name."""
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "load", "web", "--image", str(host / "image")))[0] == 0
    assert (await mkctl(host, "start", "web"))[0] == 0
    assert await mkctl(host, "exec", "web", "--", "hostname") == (0, "web\n", "")
    assert (await mkctl(host, "kill", "web"))[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="instances get cgroups only when the host is root")
async def test_an_instance_lives_in_its_hosts_own_cgroup_group(host: Path) -> None:
    """`multikernel/<host-id>/<name>`: another host, demo or test run never shares it."""
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "load", "web", "--image", str(host / "image")))[0] == 0
    assert (await mkctl(host, "start", "web"))[0] == 0
    code, out, _ = await mkctl(host, "exec", "web", "--", "cat", "/proc/self/cgroup")
    assert code == 0
    group = cgroup_group(host / "state")
    assert (host / "state" / "host-id").read_text().strip() == group.split("/")[1]
    cgroups = dict(line.split(":", 2)[1:] for line in out.splitlines())
    assert cgroups["cpuset"] == f"/{group}/web"
    assert cgroups["memory"].endswith(f"/{group}/web")
    assert (await mkctl(host, "kill", "web"))[0] == 0


async def test_cpus_are_a_count_or_an_at_list(host: Path) -> None:
    """`--cpus 1` is one CPU the resource actor places; `--cpus @N` is CPU N itself."""
    last = max(os.sched_getaffinity(0))
    code, out, _ = await mkctl(host, "create", "one", "--cpus", f"@{last}", "--memory", "128M",
                               "--json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["cpus"] == [last]
    code, line = await fails(host, "create", "two", "--cpus", f"@{last}", "--memory", "128M")
    assert code == 4
    assert line.startswith(f"error: CPU {last} for 'two' is held by 'one'; free: ")
    code, out, _ = await mkctl(host, "create", "three", "--memory", "200M", "--json")
    assert code == 0
    three = json.loads(out)
    assert len(three["cpus"]) == 1
    assert three["cpus"] != [last]
    assert three["memory"] == 256 << 20  # whole 128 MiB memory blocks


async def test_resources_show_the_pool_grants_free_and_history(host: Path) -> None:
    assert (await mkctl(host, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "update", "web", "--memory", "256M"))[0] == 0
    code, out, _ = await mkctl(host, "resources", "pool", "--json")
    assert code == 0
    pool = msgspec.json.decode(out, type=PoolInfo)
    holders = {c.id: c.holders for c in pool.cpus}
    assert sorted(h for hs in holders.values() for h in hs) == ["web"]
    assert pool.memory_total - pool.memory_free == 256 << 20
    code, out, _ = await mkctl(host, "resources", "grants", "web", "-o", "json")
    (grant,) = msgspec.json.decode(out, type=list[Grant])
    assert (grant.instance, grant.memory, len(grant.cpus)) == ("web", 256 << 20, 1)
    code, out, _ = await mkctl(host, "resources", "history", "web", "--json")
    history = msgspec.json.decode(out, type=History)
    assert [(r.kind, r.state) for r in history.transactions] == [
        ("update", "committed"),
        ("allocate", "committed"),
    ]  # newest first
    code, out, _ = await mkctl(host, "resources", "history", "web")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["TX", "INSTANCE", "KIND", "STATE", "CHANGE"]
    assert "128 MiB -> 256 MiB" in lines[1]
    code, out, _ = await mkctl(host, "resources", "free")
    assert code == 0
    assert out.splitlines()[1] == f"memory: {format_size(pool.memory_free)}"
    code, out, _ = await mkctl(host, "resources")
    assert code == 0
    assert out.splitlines()[0].split() == ["TOTAL", "HELD", "FREE"]
    assert any(line.split()[:2] == ["web", str(grant.instance_id)] for line in out.splitlines())
    assert await fails(host, "resources", "grants", "nope") == (
        3,
        "error: 'nope' holds nothing (instances with grants: web)",
    )
