"""mkctl, as a user runs it: a separate process talking to a host."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.services._host import HostConfig, cgroup_group, run_host
from multikernel.services._image import sign_image
from multikernel.services._signature import make_signing_key
from tests._run import group_dirs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Path]:
    key, cert = make_signing_key("mkctl tests", algorithm="ec-p256")
    (tmp_path / "cert.pem").write_bytes(cert)
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.toml").write_text(
        'name = "t"\nversion = "1"\nentry = ["{python}", "m.py"]\n'
    )
    (image / "m.py").write_text("import time\ntime.sleep(300)\n")
    sign_image(image, key, cert)
    config = HostConfig(tmp_path / "bus.sock", tmp_path / "state", trusted=[tmp_path / "cert.pem"])
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        yield tmp_path
        stop.set()
    left = [d for d in group_dirs(cgroup_group(config.state_dir)) if d.exists()]
    assert not left, f"the host left its cgroup group behind: {left}"


async def mkctl(root: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MULTIKERNEL_BUS": str(root / "bus.sock")}
    done = await anyio.run_process(
        [sys.executable, "-m", "multikernel.endpoints.mkctl", *args], env=env, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


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


async def test_mkctl_errors_say_what_to_do_and_exit_1(host: Path) -> None:
    await mkctl(host, "create", "db", "--cpus", "1", "--memory", "128M")
    code, _, err = await mkctl(host, "start", "db")
    assert code == 1
    assert "mkctl load db --image PATH" in err
    code, _, err = await mkctl(host, "create", "db2", "--memory", "lots")
    assert code == 2
    assert "not a size" in err


async def test_mkctl_without_a_host_says_how_to_start_one(tmp_path: Path) -> None:
    code, _, err = await mkctl(tmp_path, "show")
    assert code == 1
    assert "mkctl host up" in err


async def test_bus_inspector_lists_endpoints(host: Path) -> None:
    code, out, _ = await mkctl(host, "bus", "list")
    assert code == 0
    assert "lifecycle" in out
    code, out, _ = await mkctl(host, "bus", "introspect")
    assert json.loads(out)["names"]["lifecycle"]
