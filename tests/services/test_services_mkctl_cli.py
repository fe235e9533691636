"""mkctl's command line: output formats, version, completion, help, and the host verbs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import click
import msgspec
import pytest
import yaml

from multikernel.endpoints.mkctl import cli
from multikernel.protocol import EndpointInfo, InstanceInfo, ServiceInfo

from .conftest import fails, mkctl

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


async def _ready_instance(host: Path, name: str = "web") -> None:
    assert (await mkctl(host, "create", name, "--cpus", "1", "--memory", "128M"))[0] == 0
    assert (await mkctl(host, "load", name, "--image", str(host / "image")))[0] == 0


async def test_every_read_verb_gives_json_before_or_after_the_verb(host: Path) -> None:
    """JSON outputs decode into the protocol's own types: the schema is the contract."""
    await _ready_instance(host)
    for args in (("-o", "json", "show"), ("show", "-o", "json"), ("--json", "show"),
                 ("show", "--json")):  # fmt: skip
        code, out, _ = await mkctl(host, *args)
        assert code == 0, args
        (info,) = msgspec.json.decode(out, type=list[InstanceInfo])
        assert (info.name, info.state, info.memory) == ("web", "loaded", 128 << 20)
    _, out, _ = await mkctl(host, "bus", "list", "-o", "json")
    endpoints = msgspec.json.decode(out, type=list[EndpointInfo])
    assert "lifecycle" in {name for e in endpoints for name in e.names}
    _, out, _ = await mkctl(host, "-o", "json", "bus", "introspect")
    services = msgspec.json.decode(out, type=list[ServiceInfo])
    (lifecycle,) = [s for s in services if s.name == "lifecycle"]
    assert {"create", "show", "kill"} <= {m.name for m in lifecycle.methods}
    _, out, _ = await mkctl(host, "bus", "stats", "--json")
    assert json.loads(out)["hub"]["sessions"] >= 1
    _, out, _ = await mkctl(host, "host", "status", "-o", "json")
    status = json.loads(out)
    assert [i["name"] for i in status["instances"]] == ["web"]
    _, out, _ = await mkctl(host, "bus", "call", "lifecycle", "show", "{}", "-o", "json")
    assert [i["name"] for i in json.loads(out)["instances"]] == ["web"]


async def test_yaml_and_wide(host: Path) -> None:
    await _ready_instance(host)
    code, out, _ = await mkctl(host, "show", "-o", "yaml")
    assert code == 0
    (info,) = msgspec.convert(yaml.safe_load(out), type=list[InstanceInfo])
    assert info.name == "web"
    _, out, _ = await mkctl(host, "show", "-o", "wide")
    header = out.splitlines()[0].split()
    assert header[:3] == ["NAME", "ID", "STATE"]
    assert {"SIGNER", "RESTARTS", "ISOLATION"} <= set(header)
    _, out, _ = await mkctl(host, "show")
    assert "SIGNER" not in out.splitlines()[0]
    assert "\x1b[" not in out  # no colour off a terminal


async def test_delete_says_what_it_deleted(host: Path) -> None:
    await _ready_instance(host)
    code, out, _ = await mkctl(host, "delete", "web")
    assert (code, out) == (0, "deleted instance web (id 1)\n")
    code, out, _ = await mkctl(host, "show")
    assert out.startswith("no instances")


async def test_isolation_warnings_are_short_and_said_once(plain_host: Path) -> None:
    code, _, err = await mkctl(plain_host, "create", "web", "--memory", "128M")
    assert code == 0
    lines = err.splitlines()
    assert lines == [
        "warning: isolation is off (--no-isolation): instances share the host's namespaces, "
        "are pinned to their CPUs by affinity only, and their memory is not limited"
    ]
    assert "Platform" not in err
    code, _, err = await mkctl(plain_host, "show")
    assert (code, err) == (0, "")  # once per host
    code, _, err = await mkctl(plain_host, "host", "status")
    assert err.startswith("warning: isolation is off")  # where to look again


@pytest.mark.skipif(
    Path("/sys/fs/resctrl").exists() or os.geteuid() != 0,
    reason="an isolated host on a machine without resctrl says just that",
)
async def test_an_isolated_host_without_resctrl_says_so_once(host: Path) -> None:
    code, _, err = await mkctl(host, "create", "web", "--memory", "128M")
    assert (code, err) == (
        0,
        "warning: no resctrl on this machine: cache and memory bandwidth are shared\n",
    )
    code, _, err = await mkctl(host, "show")
    assert (code, err) == (0, "")


async def test_version() -> None:
    done = await anyio.run_process([sys.executable, "-m", "multikernel.endpoints.mkctl",
                                    "--version"])  # fmt: skip
    assert done.stdout.decode() == "mkctl 0.1.0\n"
    script = Path(sys.executable).with_name("mkctl")  # the console script works too
    done = await anyio.run_process([str(script), "--version"])
    assert done.stdout.decode() == "mkctl 0.1.0\n"


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F"), ("zsh", "#compdef mkctl"), ("fish", "complete --no-files")],
)
async def test_completion_scripts_are_generated(shell: str, marker: str) -> None:
    done = await anyio.run_process(
        [sys.executable, "-m", "multikernel.endpoints.mkctl", "completion", shell]
    )
    script = done.stdout.decode()
    assert marker in script
    assert "_MKCTL_COMPLETE" in script


async def test_completion_completes_verbs_and_options(tmp_path: Path) -> None:
    script = str(Path(sys.executable).with_name("mkctl"))
    env = {**os.environ, "_MKCTL_COMPLETE": "bash_complete", "COMP_WORDS": "mkctl bu",
           "COMP_CWORD": "1", "MULTIKERNEL_BUS": str(tmp_path / "none.sock")}  # fmt: skip
    done = await anyio.run_process([script], env=env)
    assert done.stdout.decode().split() == ["plain,bus"]
    env.update(COMP_WORDS="mkctl bus ", COMP_CWORD="2")
    done = await anyio.run_process([script], env=env)
    verbs = {line.split(",")[1] for line in done.stdout.decode().split()}
    assert {"list", "introspect", "stats", "monitor", "call", "pub"} <= verbs


def _commands(group: click.Command, path: str = "mkctl") -> list[tuple[str, click.Command]]:
    found = [(path, group)]
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            found += _commands(command, f"{path} {name}")
    return found


def test_every_option_and_verb_has_help() -> None:
    for path, command in _commands(cli):
        assert command.help or command.short_help, path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts}"


def test_bus_help_describes_every_bus_verb() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multikernel.endpoints.mkctl", "bus", "--help"],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    bus = cli.commands["bus"]
    assert isinstance(bus, click.Group)
    for verb in bus.commands:
        assert f"  {verb} " in done.stdout, verb


async def test_host_down_stops_a_foreground_host(tmp_path: Path) -> None:
    env = {**os.environ, "MULTIKERNEL_BUS": str(tmp_path / "bus.sock")}
    argv = [sys.executable, "-m", "multikernel.endpoints.mkctl", "--state-dir", str(tmp_path)]
    proc = await anyio.open_process([*argv, "host", "up", "--foreground"], env=env)
    async with proc:
        assert proc.stderr is not None
        seen = b""
        with anyio.fail_after(30):
            while b'"host ready"' not in seen:  # its log says when the pid file is written
                seen += await proc.stderr.receive()
        assert (tmp_path / "host.pid").read_text() == f"{proc.pid}\n"
        code, out, _ = await mkctl(tmp_path, "--state-dir", str(tmp_path), "host", "down")
        assert (code, out) == (0, f"host down (pid {proc.pid})\n")
        with anyio.fail_after(30):
            assert await proc.wait() == 0
    assert not (tmp_path / "host.pid").exists()


async def test_host_up_starts_a_host_in_the_background_and_host_down_stops_it(
    tmp_path: Path,
) -> None:
    """The default `host up`: the host goes on in the background, its log in the state dir."""
    state = ("--state-dir", str(tmp_path))
    code, out, err = await mkctl(tmp_path, *state, "host", "up", "--metrics", "off")
    assert code == 0, err
    pid = int((tmp_path / "host.pid").read_text())
    log = tmp_path / "host.log"
    assert out == f"host up: pid {pid}, socket {tmp_path / 'bus.sock'}, log {log}\n"
    pidfd = os.pidfd_open(pid)  # not our child (mkctl's, which has exited): watch it this way
    try:
        assert (await mkctl(tmp_path, "show"))[0] == 0  # it serves
        assert await fails(tmp_path, *state, "host", "up") == (
            4,
            f"error: a host is already running (pid {pid}); mkctl host down first",
        )
        code, out, _ = await mkctl(tmp_path, *state, "host", "down")
        assert (code, out) == (0, f"host down (pid {pid})\n")
        with anyio.fail_after(30):
            await anyio.wait_readable(pidfd)  # it has exited
    finally:
        with contextlib.suppress(ProcessLookupError):  # (the pidfd: never a reused pid)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # if the test failed before down
        os.close(pidfd)
    assert not (tmp_path / "host.pid").exists()
    assert b'"host ready"' in log.read_bytes()


async def test_host_up_keeps_what_it_is_told_to_reserve(tmp_path: Path) -> None:
    env = {**os.environ, "MULTIKERNEL_BUS": str(tmp_path / "bus.sock")}
    argv = [sys.executable, "-m", "multikernel.endpoints.mkctl", "--state-dir", str(tmp_path)]
    code, _, err = await mkctl(tmp_path, "host", "up", "--reserve-cpus", "x")
    assert code == 2
    assert "Invalid value for '--reserve-cpus'" in err
    assert not (tmp_path / "host.pid").exists()  # nothing started
    last = max(os.sched_getaffinity(0))
    up = [*argv, "host", "up", "--foreground", "--reserve-cpus", f"@{last}", "--reserve-memory",
          "1G", "--metrics", "off"]  # fmt: skip
    proc = await anyio.open_process(up, env=env)
    async with proc:
        assert proc.stderr is not None
        seen = b""
        with anyio.fail_after(30):
            while b'"host ready"' not in seen:
                seen += await proc.stderr.receive()
        code, out, _ = await mkctl(tmp_path, "resources", "pool", "--json")
        pool = json.loads(out)
        assert [c["id"] for c in pool["cpus"] if c.get("reserved")] == [last]
        assert last not in pool["free_cpus"]
        assert pool["memory_reserved"] == 1 << 30
        refused = ("create", "web", "--cpus", f"@{last}", "--memory", "128M")
        code, line = await fails(tmp_path, *refused)
        assert code == 4
        assert f"CPU {last}" in line
        assert (await mkctl(tmp_path, "--state-dir", str(tmp_path), "host", "down"))[0] == 0
        with anyio.fail_after(30):
            assert await proc.wait() == 0


def test_docs_cli_md_documents_every_verb_and_exit_status() -> None:
    from multikernel.endpoints.mkctl import EXIT_CODES

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for path, command in _commands(cli):
        if path == "mkctl" or isinstance(command, click.Group):
            continue
        verb = path.removeprefix("mkctl ")
        assert f"`{verb}" in text, f"docs/cli.md does not document `{verb}`"
    for code in EXIT_CODES:
        assert f"\n| {code} | " in text, f"docs/cli.md does not explain exit status {code}"
    for fmt in ("table", "wide", "json", "yaml"):
        assert f"`{fmt}`" in text
