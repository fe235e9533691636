"""Local users and privilege: who may connect to a host, and what the host actors keep for it.

The cross-process tests run a real host in this (root) process and its clients as `nobody`
(`unprivileged.py` drops to that uid after loading), so the hub learns the client's uid from the
kernel (SO_PEERCRED), exactly as for a real local user. They need root, to setuid.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from multikernel.bus import Identity, Policy, PolicyError, SocketAccess
from multikernel.bus._rules import BUILTIN_HOST_ONLY_TOML
from multikernel.endpoints import connect
from multikernel.services._host import HostConfig, host_rule, run_host

PEER = Path(__file__).with_name("unprivileged.py")
DOC = Path(__file__).parents[2] / "docs" / "access-control.md"
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="running a client as another user (nobody) needs root to setuid"
)
HOST_SERVICES = ("lifecycle", "resource", "fault", "upgrade")


def who(uid: int, instance: int = 0) -> Identity:
    return Identity(endpoint_id=1, instance=instance, uid=uid, pid=1, name="t")


def denial(uid: int, verb: str, thing: str, held: str, key: str) -> str:
    return (
        f"permission denied: instance 0 (uid {uid}) may not {verb} {thing!r}: [host_only] keeps "
        f"{held!r} for the host's own user and root (grant it in the policy with [[rule]] "
        f'who = "instance:0 & uid:{uid}" {key} = ["{thing}"])'
    )


# -- the policy: what [host_only] holds back from the same-instance default --------------------


@pytest.mark.parametrize("service", HOST_SERVICES)
def test_a_local_user_may_not_call_the_host_actors(service: str) -> None:
    decision = Policy.default().may_call(who(1000), service, within_instance=True)
    assert not decision
    assert decision.reason == denial(1000, "call", service, service, "call")


@pytest.mark.parametrize("service", HOST_SERVICES)
def test_root_and_the_hosts_own_user_may_call_the_host_actors(service: str) -> None:
    assert Policy.default().may_call(who(0), service, within_instance=True)
    hosts = Policy.from_toml(host_rule(1000))  # what a host run by uid 1000 appends
    assert hosts.may_call(who(1000), service, within_instance=True)
    assert not hosts.may_call(who(1001), service, within_instance=True)


def test_the_denial_names_the_rule_that_would_grant_it_and_that_rule_does() -> None:
    reason = Policy.default().may_call(who(1000), "lifecycle", within_instance=True).reason
    rule = reason.split("(grant it in the policy with ")[1].removesuffix(")")
    granted = Policy.from_toml(rule.replace("[[rule]] ", "[[rule]]\n").replace('" call', '"\ncall'))
    assert granted.may_call(who(1000), "lifecycle", within_instance=True)
    assert not granted.may_call(who(1001), "lifecycle", within_instance=True)


def test_other_services_on_the_instance_stay_open_to_its_users() -> None:
    assert Policy.default().may_call(who(1000), "db", within_instance=True)


def test_a_local_user_may_not_speak_for_an_instance() -> None:
    """Hellos and state changes on mk.instance.<n>.* are what the lifecycle actor believes."""
    policy = Policy.default()
    decision = policy.may_publish(who(1000), "mk.instance.3.hello", within_instance=True)
    assert decision.reason == denial(
        1000, "publish", "mk.instance.3.hello", "mk.instance.>", "publish"
    )
    assert policy.may_publish(who(1000), "mk.instance.0.note", within_instance=True)  # its own
    assert policy.may_publish(who(0, instance=3), "mk.instance.3.hello")  # a guest, its own
    assert policy.may_subscribe(who(1000), "mk.instance.*.state", within_instance=True)


def test_a_file_adds_to_host_only_and_cannot_take_the_builtin_away() -> None:
    policy = Policy.from_toml('[host_only]\ncall = ["billing"]\nsubscribe = ["audit.>"]\n')
    assert not policy.may_call(who(1000), "billing", within_instance=True)
    assert not policy.may_call(who(1000), "lifecycle", within_instance=True)
    assert not policy.may_subscribe(who(1000), ">", within_instance=True)  # overlaps audit.>
    assert policy.may_subscribe(who(1000), "app.>", within_instance=True)
    bare = Policy.from_toml("[defaults]\nbuiltin_rules = false\n")
    assert not bare.may_call(who(1000), "lifecycle", within_instance=True)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[host_only]\nown = ["x"]', "[host_only]: unknown key 'own'"),
        ('host_only = ["x"]', "'host_only' must be a table"),
        ('[host_only]\ncall = ["a.>.b"]', "[host_only]: bad pattern in call"),
    ],
)
def test_a_bad_host_only_table_is_refused_at_load(text: str, error: str) -> None:
    with pytest.raises(PolicyError, match=error.replace("[", r"\[").replace(".", r"\.")):
        Policy.from_toml(text, source="policy.toml")


def test_the_doc_shows_the_builtin_host_only_table_verbatim() -> None:
    assert BUILTIN_HOST_ONLY_TOML in DOC.read_text()


# -- the control socket's mode and group -------------------------------------------------------


def test_socket_access_defaults_to_the_hosts_own_user() -> None:
    assert SocketAccess() == SocketAccess.parse() == SocketAccess(0o600, None)
    assert SocketAccess.parse("0660", NOGROUP.gr_name) == SocketAccess(0o660, NOGROUP.gr_gid)
    assert SocketAccess.parse("666", "0") == SocketAccess(0o666, 0)


@pytest.mark.parametrize(
    ("mode", "group", "error"),
    [
        ("rw", None, "not a socket mode: 'rw'"),
        ("0777", None, "bits other than read and write"),
        ("4660", None, "not a socket mode"),
        ("0660", "no-such-group-here", "no group named 'no-such-group-here'"),
    ],
)
def test_bad_socket_access_says_what_to_write(mode: str, group: str | None, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        SocketAccess.parse(mode, group)


# -- cross-process: a local user against a real host --------------------------------------------


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse, so the socket's own mode decides who connects."""
    path = Path(tempfile.mkdtemp(prefix="mk-security-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@asynccontextmanager
async def host(root: Path, access: SocketAccess, policy: str = "") -> AsyncIterator[Path]:
    config = HostConfig(root / "bus.sock", root / "state", policy, socket_access=access)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(run_host, config, stop)
        yield config.socket
        stop.set()


async def as_nobody(sock: Path, mode: str, *args: str) -> tuple[int, str]:
    """What `nobody` (its primary group only) gets from the host on `sock` (unprivileged.py)."""
    uid, gid = str(NOBODY.pw_uid), str(NOBODY.pw_gid)
    code, out, err = await _run([sys.executable, str(PEER), uid, gid, str(sock), mode, *args], sock)
    assert not err, err
    return code, out


async def as_root(sock: Path, *args: str) -> tuple[int, str, str]:
    """mkctl ARGS, run by root."""
    return await _run([sys.executable, "-m", "multikernel.endpoints.mkctl", *args], sock)


async def _run(argv: list[str], sock: Path) -> tuple[int, str, str]:
    env = {**os.environ, "MULTIKERNEL_BUS": str(sock)}
    with anyio.fail_after(60):
        done = await anyio.run_process(argv, env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


REFUSED_AT_THE_SOCKET = (1, "PermissionError: Permission denied\n")
LIFECYCLE_REFUSED = (
    1,
    "AccessDeniedError: calling 'lifecycle' refused: "
    + denial(NOBODY.pw_uid, "call", "lifecycle", "lifecycle", "call")
    + "\n",
)


@pytest.mark.anyio
@needs_root
async def test_by_default_a_local_user_cannot_even_connect(public_dir: Path) -> None:
    async with host(public_dir, SocketAccess()) as sock:
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert (stat.S_IMODE(mode), sock.stat().st_uid) == (0o600, os.geteuid())
        assert await as_nobody(sock, "connect") == REFUSED_AT_THE_SOCKET
        assert (await as_root(sock, "show"))[0] == 0


@pytest.mark.anyio
@needs_root
async def test_a_0660_socket_admits_its_group_only(public_dir: Path) -> None:
    async with host(public_dir, SocketAccess(0o660, 0)) as sock:  # root's group: not nobody's
        assert (stat.S_IMODE(sock.stat().st_mode), sock.stat().st_gid) == (0o660, 0)
        assert await as_nobody(sock, "connect") == REFUSED_AT_THE_SOCKET
    async with host(public_dir, SocketAccess(0o660, NOGROUP.gr_gid)) as sock:
        assert await as_nobody(sock, "connect") == (0, "connected\n")
        assert await as_nobody(sock, "request", "lifecycle", "show", "{}") == LIFECYCLE_REFUSED


@pytest.mark.anyio
@needs_root
async def test_a_widened_socket_still_keeps_lifecycle_for_root(public_dir: Path) -> None:
    """Every local user may connect to a 0666 socket; none but root may drive the host."""
    async with host(public_dir, SocketAccess(0o666)) as sock:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666
        assert (await as_root(sock, "create", "web", "--cpus", "1", "--memory", "128M"))[0] == 0
        create = '{"name": "intruder", "cpu_count": 1, "memory": 134217728}'
        for method, body in (("create", create), ("delete", '{"name": "web"}'), ("show", "{}")):
            assert await as_nobody(sock, "request", "lifecycle", method, body) == LIFECYCLE_REFUSED
        code, out, _ = await as_root(sock, "show", "--json")
        assert code == 0
        assert [info["name"] for info in json.loads(out)] == ["web"]  # root's, untouched
        assert (await as_root(sock, "delete", "web"))[0] == 0


@pytest.mark.anyio
@needs_root
async def test_the_policy_can_grant_lifecycle_to_a_local_user(public_dir: Path) -> None:
    grant = f'[[rule]]\nwho = "instance:0 & uid:{NOBODY.pw_uid}"\ncall = ["lifecycle"]\n'
    async with host(public_dir, SocketAccess(0o660, NOGROUP.gr_gid), grant) as sock:
        create = '{"name": "granted", "cpu_count": 1, "memory": 134217728}'
        code, out = await as_nobody(sock, "request", "lifecycle", "create", create)
        assert (code, json.loads(out)["state"]) == (0, "ready")
        code, out = await as_nobody(sock, "request", "lifecycle", "delete", '{"name": "granted"}')
        assert (code, json.loads(out)["name"]) == (0, "granted")


@pytest.mark.anyio
@needs_root
async def test_a_local_user_cannot_speak_for_an_instance(public_dir: Path) -> None:
    """A forged hello or state change never reaches the host's subscribers (the lifecycle actor)."""
    async with (
        host(public_dir, SocketAccess(0o666)) as sock,
        connect(sock, name="root") as bus,
        await bus.subscribe("mk.instance.>") as seen,
    ):
        forged = ["mk.instance.7.hello", "mk.instance.7.state", "mk.instance.0.note"]
        assert await as_nobody(sock, "publish", *forged) == (0, "published\n")
        with anyio.fail_after(10):
            first = await seen.receive()  # published last, on the user's own instance 0
    assert first.subject == "mk.instance.0.note"
