"""Guests on a normal host, through mkctl: `mkctl create NAME --platform qemu`, a signed guest
image loaded and checked, `start`, `exec`, `logs`, `show`, a negotiated `kill`, `delete`; and the
issue's end to end test: two guests and a local instance call each other's services and share a
subject, one guest is killed in the middle of a call from the other, which fails cleanly."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from multikernel.endpoints import Endpoint, Subscription, connect
from multikernel.services._host import HostConfig, run_host
from multikernel.services._image import sign_image
from multikernel.services._qemu_image import GuestImage, write_image_dir
from multikernel.services._signature import make_signing_key
from tests.services.conftest import make_image, mkctl

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKLOAD = (Path(__file__).with_name("e2e_workload.py")).read_text()
POLICY = """
[[rule]]
who = "*"
own = ["svc.>"]
call = ["svc.>"]
publish = ["demo.>"]
subscribe = ["demo.>"]
"""


@pytest.fixture
async def host(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[tuple[Path, Endpoint]]:
    """A host (no fault or upgrade actor: nothing here fails by itself) with a signed guest
    image (`guest`) and a signed local image (`local`), and the test's endpoint on it."""
    key, cert = make_signing_key("qemu tests", algorithm="ec-p256")
    (tmp_path / "cert.pem").write_bytes(cert)
    sign_image(write_image_dir(guest_image, tmp_path / "guest"), key, cert)
    make_image(tmp_path, "local", WORKLOAD, key, cert)
    config = HostConfig(
        tmp_path / "bus.sock", tmp_path / "state", policy_text=POLICY,
        trusted=[tmp_path / "cert.pem"], fault=False, upgrade=False, metrics="",
        cpu_share=4,  # three 1-CPU instances on a 2-CPU machine
    )  # fmt: skip
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        async with connect(config.socket, name="test") as ep:
            yield tmp_path, ep
        stop.set()


async def ok(root: Path, *args: str) -> str:
    code, out, err = await mkctl(root, *args)
    assert code == 0, (args, out, err)
    return out


async def show(root: Path, name: str) -> dict[str, object]:
    (info,) = json.loads(await ok(root, "show", name, "-o", "json"))
    assert isinstance(info, dict)
    return info


async def results(sub: Subscription, expected: set[str]) -> None:
    """Wait until every `expected` line has come on `demo.result`."""
    seen: set[str] = set()
    with anyio.fail_after(300):  # two guests' workloads start under TCG: 25-130 s here
        async for message in sub:
            seen.add(message.decode(bytes).decode())
            if expected <= seen:
                return


@pytest.mark.timeout(300)
async def test_a_qemu_instance_runs_through_the_lifecycle_with_mkctl(
    host: tuple[Path, Endpoint], guest_image: GuestImage
) -> None:
    root, _ = host
    code, _, err = await mkctl(root, "create", "pc", "--interrupts", "--memory", "128M")
    assert (code, err.splitlines()[0]) == (
        4,
        "error: --interrupts is for instances with a kernel of their own (--platform qemu); "
        "'pc' runs on local, whose channels always have doorbells",
    )
    await ok(root, "create", "web", "--platform", "qemu", "--cpus", "1", "--memory", "256M")
    code, _, err = await mkctl(root, "load", "web", "--image", str(root / "local"))
    assert (code, err.splitlines()[0]) == (
        4,  # refused
        "error: 'web' runs on qemu, which boots a guest kernel: load an image made with mkctl "
        'image build (its manifest says platform = "qemu")',
    )
    await ok(root, "load", "web", "--image", str(root / "guest"))  # its signature checked
    await ok(root, "start", "web")
    info = await show(root, "web")
    assert (info["state"], info["platform"], info["memory"]) == ("active", "qemu", 256 << 20)
    assert (
        await ok(root, "exec", "web", "--", "uname", "-r")
    ).strip() == guest_image.kernel_version
    assert (await ok(root, "exec", "web", "--", "hostname")).strip() == "web"
    assert "multikernel-guest: agent starting" in await ok(root, "logs", "web")  # its console
    await ok(root, "kill", "web", "--grace", "60")  # SHUTDOWN -> ACK -> HALTED, then power off
    info = await show(root, "web")
    assert (info["state"], info["cause"], info["last_exit"]) == (
        "loaded",
        "requested",
        "exit status 0",
    )
    await ok(root, "delete", "web")


@pytest.mark.timeout(900)
async def test_two_guests_and_a_local_instance_call_and_hear_each_other(
    host: tuple[Path, Endpoint],
) -> None:
    """RPC from guest b to a service in guest a and to one in the local instance; a subject
    heard by all three; a negotiated stop; guest a killed in the middle of a call from b.
    Guest b runs in interrupt mode (it rings the hub), guest a is polled."""
    root, ep = host
    for name, mode in (("a", ()), ("b", ("--interrupts",))):  # b rings the host, a is polled
        await ok(root, "create", name, "--platform", "qemu", *mode, "--cpus", "1", "-m", "256M")
        await ok(root, "load", name, "--image", str(root / "guest"))
    assert (await show(root, "b"))["interrupts"] is True
    await ok(root, "create", "lo", "--cpus", "1", "--memory", "128M")
    await ok(root, "load", "lo", "--image", str(root / "local"))
    async with await ep.subscribe("demo.result") as sub:
        await ok(root, "start", "lo", "--", sys.executable, "-c", WORKLOAD, "lo")
        await ok(root, "start", "a", "--", "{python}", "-c", WORKLOAD, "a")
        await ok(root, "start", "b", "--", "{python}", "-c", WORKLOAD, "b", "a", "lo", "stall:a")
        await results(
            sub,
            {"lo ready", "a ready", "b ready", "b called a: b asks via a",
             "b called lo: b asks via lo", "a stalls"},
        )  # fmt: skip
        await ep.publish("demo.news", b"go")
        await results(
            sub,
            {f"{x} heard from {y}" for x in ("a", "b", "lo") for y in ("a", "b", "lo") if x != y},
        )
        await ok(root, "kill", "a", "--force")  # b's call to a.stall is in flight
        await results(sub, {"b stall failed NoRespondersError"})
    info = await show(root, "a")
    assert (info["state"], info["last_exit"]) == ("loaded", "killed by signal 9")
    for name in ("b", "lo"):
        await ok(root, "kill", name, "--grace", "60")
        assert (await show(root, name))["last_exit"] == "exit status 0"
    assert [e for e in (await ep.introspect()).endpoints if e.instance] == []
    assert not [p for p in os.listdir("/tmp") if p.startswith("mk-qemu-a-")]
