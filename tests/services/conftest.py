"""mkctl as a user runs it: a separate process talking to a real host in this test's loop."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import connect
from multikernel.services._host import HostConfig, cgroup_group, run_host
from multikernel.services._image import sign_image
from multikernel.services._signature import make_signing_key
from tests._run import group_dirs

from .fault_kit import owned

#: The workload of the test image: says it is up, sleeps until stopped, says why it stops.
SLEEPER = """\
import signal, sys, time
def stop(signum, frame):
    print("stopping on SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up")
time.sleep(300)
"""


#: A workload that ignores SIGTERM (and says so): only SIGKILL ends it.
STUBBORN = """\
import signal, time
signal.signal(signal.SIGTERM, lambda signum, frame: print("ignoring SIGTERM", flush=True))
print("up", flush=True)
while True:
    time.sleep(300)
"""


def make_image(root: Path, name: str, body: str, key: bytes, cert: bytes) -> Path:
    image = root / name
    image.mkdir()
    (image / "manifest.toml").write_text(
        f'name = "{name}"\nversion = "1"\nentry = ["{{python}}", "m.py"]\n'
    )
    (image / "m.py").write_text(body)
    sign_image(image, key, cert)
    return image


async def _serve(root: Path, *, isolate: bool) -> AsyncIterator[Path]:
    key, cert = make_signing_key("mkctl tests", algorithm="ec-p256")
    (root / "cert.pem").write_bytes(cert)
    make_image(root, "image", SLEEPER, key, cert)
    crash = "import sys\nprint('starting')\nsys.exit('no config file: /etc/app.toml')\n"
    make_image(root, "crasher", crash, key, cert)
    make_image(root, "oneshot", "print('hello')\nprint('world')\n", key, cert)
    make_image(root, "stubborn", STUBBORN, key, cert)
    config = HostConfig(
        root / "bus.sock", root / "state", trusted=[root / "cert.pem"], isolate=isolate
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        # The fault actor (a process of its own) is up once it owns its name; its first look at
        # the lifecycle is over by then, so no test sees it in a monitor or a listing.
        async with connect(config.socket, name="fixture") as ep:
            await owned(ep, "fault")
        yield root
        stop.set()
    left = [d for d in group_dirs(cgroup_group(config.state_dir)) if d.exists()]
    assert not left, f"the host left its cgroup group behind: {left}"


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Path]:
    """A host (hub + lifecycle actor) with signed images: `image` (sleeps until stopped),
    `crasher` (fails at start), `oneshot` (prints two lines and exits 0) and `stubborn`
    (ignores SIGTERM)."""
    async for root in _serve(tmp_path, isolate=True):
        yield root


@pytest.fixture
async def plain_host(tmp_path: Path) -> AsyncIterator[Path]:
    """A host whose instances are not isolated (so it has warnings to give)."""
    async for root in _serve(tmp_path, isolate=False):
        yield root


async def mkctl(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m multikernel.endpoints.mkctl ARGS` against the host in `root`."""
    env = {**os.environ, "MULTIKERNEL_BUS": str(root / "bus.sock"), **(env or {})}
    done = await anyio.run_process(
        [sys.executable, "-m", "multikernel.endpoints.mkctl", *args], env=env, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def first_line(err: str) -> str:
    return err.splitlines()[0] if err else ""


async def fails(root: Path, *args: str) -> tuple[int, str]:
    """Run mkctl expecting an error: its exit status and the first line of its stderr."""
    code, out, err = await mkctl(root, *args)
    assert code != 0, (args, out)
    assert "Traceback" not in err, err  # one line, not a traceback, unless --debug
    return code, first_line(err)
