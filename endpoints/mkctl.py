"""`mkctl`: drive a multikernel host, its instances and its bus from the command line.

A pure client of the bus: every verb is a request to an actor (`lifecycle`, an instance's agent)
or to the hub. `mkctl host up` starts the host process by module name; `mkctl image` runs the
image tool the same way. Human output on a terminal, JSON with `--json`; errors say what to do
next and exit with status 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from multikernel.endpoints._connect import connect
from multikernel.endpoints._endpoint import Endpoint
from multikernel.endpoints._hublink import HubUnavailableError
from multikernel.endpoints.wire import default_socket_path
from multikernel.protocol import (
    AgentStatus,
    CreateInstance,
    DeleteInstance,
    ExecRequest,
    ExecResult,
    InstanceInfo,
    InstanceList,
    KillInstance,
    LoadImage,
    MultikernelError,
    ShowInstances,
    StartInstance,
    UpdateInstance,
)

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M', '1G', '1.5G', '4096' (bytes) → bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M, 1G, 4096)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "bkmgt".index(unit or "b"))


def parse_cpus(text: str) -> tuple[tuple[int, ...], int]:
    """'2' → pick two; '0,3' or '0-1' → those CPUs. Returns (cpus, count)."""
    if text.isdigit() and "," not in text and "-" not in text:
        return (), int(text)
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a CPU list: {text!r} (use a count like 2, or ids like 0,2 or 0-1)"
        ) from None
    return tuple(sorted(cpus)), 0


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else _socket(args).parent


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket_path()


def _size(n: int) -> str:
    for unit in ("G", "M", "K"):
        scale = 1024 ** "BKMG".index(unit)
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:g}{unit}"
    return str(n)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _show(infos: Sequence[InstanceInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([msgspec.to_builtins(i) for i in infos], indent=2))
        return
    rows = [
        {
            "name": i.name,
            "id": i.id,
            "state": i.state,
            "cpus": ",".join(map(str, i.cpus)) or "-",
            "memory": _size(i.memory) if i.memory else "-",
            "image": f"{i.image} {i.image_version}".strip() or "-",
            "signer": i.signer or "-",
            "pid": i.pid or "-",
            "last exit": i.last_exit or "-",
        }
        for i in infos
    ]
    print(
        _table(
            rows, ["name", "id", "state", "cpus", "memory", "image", "signer", "pid", "last exit"]
        )
    )
    warnings = {w for i in infos for w in i.warnings}
    for warning in sorted(warnings):
        print(f"warning: {warning}", file=sys.stderr)


# -- host ------------------------------------------------------------------------------------


def host_up(args: argparse.Namespace) -> int:
    state = _state_dir(args)
    command = [
        sys.executable,
        "-m",
        "multikernel.services.host",
        "--socket",
        str(_socket(args)),
        "--state-dir",
        str(state),
    ]
    if args.policy:
        command += ["--policy", args.policy]
    for key in args.trusted_keys:
        command += ["--trusted-keys", key]
    if args.allow_unsigned:
        command.append("--allow-unsigned")
    if args.no_isolation:
        command.append("--no-isolation")
    for flag, value in (("--socket-mode", args.socket_mode), ("--socket-group", args.socket_group)):
        if value is not None:
            command += [flag, value]
    if args.foreground:
        os.execv(sys.executable, command)  # the host takes over this process
    state.mkdir(parents=True, exist_ok=True)
    pidfile = state / "host.pid"
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        print(
            f"a host is already running (pid {pidfile.read_text().strip()}); mkctl host down first",
            file=sys.stderr,
        )
        return 1
    read, write = os.pipe()
    with (state / "host.log").open("ab") as log:
        proc = subprocess.Popen(
            [*command, "--ready-fd", str(write)],
            pass_fds=(write,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    os.close(write)
    with os.fdopen(read) as ready:
        line = ready.readline()  # EOF if the host died before it was ready
    if not line.startswith("ready"):
        proc.wait()
        print(
            f"the host did not start (exit status {proc.returncode}); see {state / 'host.log'}",
            file=sys.stderr,
        )
        return 1
    pidfile.write_text(f"{proc.pid}\n")
    print(f"host up: pid {proc.pid}, socket {_socket(args)}, log {state / 'host.log'}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def host_down(args: argparse.Namespace) -> int:
    pidfile = _state_dir(args) / "host.pid"
    if not pidfile.exists():
        print(
            f"no host pid file at {pidfile}: is a host running? (mkctl host status)",
            file=sys.stderr,
        )
        return 1
    pid = int(pidfile.read_text())
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfile.unlink()
        print("the host had already stopped")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)  # it stops its instances and drains the bus
        import select

        if not select.select([pidfd], [], [], 30)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)
    pidfile.unlink(missing_ok=True)
    print(f"host down (pid {pid})")
    return 0


# -- talking to the bus -----------------------------------------------------------------------


async def _with_bus(args: argparse.Namespace, work: Any) -> int:
    try:
        async with connect(_socket(args), name="mkctl", reconnect=False) as ep:
            return int(await work(ep) or 0)
    except HubUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MultikernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _lifecycle(args: argparse.Namespace, method: str, body: object) -> int:
    async def work(ep: Endpoint) -> int:
        if method == "show":
            infos = (await ep.request("lifecycle", "show", body, response=InstanceList)).instances
            if not infos and not args.json:
                print("no instances; create one: mkctl create NAME --cpus 1 --memory 256M")
                return 0
        else:
            infos = (await ep.request("lifecycle", method, body, response=InstanceInfo),)
        _show(infos, args.json)
        return 0

    return anyio.run(_with_bus, args, work, backend="asyncio", backend_options={"use_uvloop": True})


def _exec(args: argparse.Namespace) -> int:
    async def work(ep: Endpoint) -> int:
        (info,) = (
            await ep.request("lifecycle", "show", ShowInstances(args.name), response=InstanceList)
        ).instances
        if info.state != "active":
            print(
                f"error: {args.name!r} is {info.state}; start it first: mkctl start {args.name}",
                file=sys.stderr,
            )
            return 1
        target = f"instance.{info.id}.agent"
        if not args.command:
            status = await ep.request(target, "status", None, response=AgentStatus)
            print(json.dumps(msgspec.to_builtins(status), indent=2))
            return 0
        result = await ep.request(
            target, "exec", ExecRequest(tuple(args.command)), response=ExecResult
        )
        sys.stdout.buffer.write(result.stdout)
        sys.stderr.buffer.write(result.stderr)
        return result.status

    return anyio.run(_with_bus, args, work, backend="asyncio", backend_options={"use_uvloop": True})


def _bus(args: argparse.Namespace) -> int:
    async def work(ep: Endpoint) -> int:
        if args.bus_command in ("list", "introspect", "stats"):
            snap = await ep.introspect()
            if args.json or args.bus_command == "introspect":
                print(json.dumps(msgspec.to_builtins(snap), indent=2, default=str))
            elif args.bus_command == "list":
                rows = [
                    {
                        "id": e.endpoint_id,
                        "name": e.name,
                        "instance": e.instance,
                        "pid": e.pid,
                        "names": ",".join(e.names) or "-",
                        "subs": len(e.subscriptions),
                    }
                    for e in snap.endpoints
                ]
                print(_table(rows, ["id", "name", "instance", "pid", "names", "subs"]))
            else:
                rows = [
                    {
                        "name": e.name,
                        "in": e.frames_in,
                        "out": e.frames_out,
                        "dropped": e.dropped,
                        "pending": e.pending,
                        "denied": e.denied,
                    }
                    for e in snap.endpoints
                ]
                print(_table(rows, ["name", "in", "out", "dropped", "pending", "denied"]))
                print(" ".join(f"{k}={v}" for k, v in snap.counters.items()))
        elif args.bus_command == "pub":
            await ep.publish(args.subject, json.loads(args.body))
        elif args.bus_command == "call":
            body = json.loads(args.body) if args.body else None
            print(json.dumps(await ep.request(args.service, args.method, body), default=str))
        elif args.bus_command == "monitor":
            from multikernel.protocol import decode_header

            async with ep.monitor(args.pattern) as records:
                async for record in records:
                    header = decode_header(record.frame)
                    print(
                        f"{record.ts_ns / 1e9:.6f} {record.path:6} {header.kind.name:8} "
                        f"{record.source}->{record.destination} {header.subject} "
                        f"{header.body_len}B",
                        flush=True,
                    )
        return 0

    return anyio.run(_with_bus, args, work, backend="asyncio", backend_options={"use_uvloop": True})


def _host_status(args: argparse.Namespace) -> int:
    async def work(ep: Endpoint) -> int:
        snap = await ep.introspect()
        infos = (
            await ep.request("lifecycle", "show", ShowInstances(), response=InstanceList)
        ).instances
        if args.json:
            print(
                json.dumps(
                    {
                        "hub_pid": snap.hub_pid,
                        "uptime_s": snap.uptime_s,
                        "endpoints": len(snap.endpoints),
                        "instances": [msgspec.to_builtins(i) for i in infos],
                    },
                    indent=2,
                )
            )
        else:
            print(
                f"host up {snap.uptime_s:.0f} s (pid {snap.hub_pid}), {len(snap.endpoints)} "
                f"endpoints, {len(infos)} instances, socket {_socket(args)}"
            )
            if infos:
                _show(infos, False)
        return 0

    return anyio.run(_with_bus, args, work, backend="asyncio", backend_options={"use_uvloop": True})


def _image(args: argparse.Namespace, rest: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "multikernel.services.images", *rest])


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mkctl", description=__doc__)
    top.add_argument(
        "--socket",
        default=None,
        help="bus control socket (default: $MULTIKERNEL_BUS or the standard path)",
    )
    top.add_argument(
        "--state-dir", default=None, help="host state directory (default: the socket's)"
    )
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    host = verbs.add_parser("host", help="start, stop or inspect the host (hub + actors)")
    host_verbs = host.add_subparsers(dest="host_command", required=True)
    up = host_verbs.add_parser("up", help="start the host (in the background unless --foreground)")
    up.add_argument("--foreground", action="store_true")
    up.add_argument("--policy", default=None, help="access policy file (TOML)")
    up.add_argument(
        "--trusted-keys", action="append", default=[], help="certificate(s) trusted to sign images"
    )
    up.add_argument("--allow-unsigned", action="store_true", help="accept unsigned images")
    up.add_argument(
        "--no-isolation", action="store_true", help="CPU affinity only, no namespaces/cgroups"
    )
    up.add_argument(
        "--socket-mode",
        default=None,
        help="control socket mode, octal (default 0600: your user and root; docs/security.md)",
    )
    up.add_argument("--socket-group", default=None, help="control socket group (name or gid)")
    host_verbs.add_parser("down", help="stop the host: instances are shut down, the bus drained")
    status = host_verbs.add_parser("status", help="is a host up, and what does it run")
    status.add_argument("--json", action="store_true")

    def instance_verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help)
        p.add_argument("name", help="instance name")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    create = instance_verb("create", "create an instance (ready at once if given resources)")
    update = instance_verb("update", "change an instance's CPUs or memory (live when active)")
    for p in (create, update):
        p.add_argument(
            "--cpus", type=parse_cpus, default=((), 0), help="a count (2) or ids (0,2 / 0-1)"
        )
        p.add_argument("--memory", type=parse_size, default=0, help="e.g. 256M, 1G")
    load = instance_verb("load", "verify an image's signature and load it into an instance")
    load.add_argument("--image", required=True, help="image directory or archive")
    start = instance_verb("start", "start a loaded instance (its agent, then its workload)")
    start.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- CMD... instead of the image's entry"
    )
    kill = instance_verb("kill", "stop an instance: negotiated shutdown, then forced")
    kill.add_argument("--force", action="store_true", help="skip the negotiation")
    kill.add_argument("--grace", type=float, default=5.0, help="seconds to wait for a clean halt")
    instance_verb("delete", "forget a stopped instance and release what it holds")
    show = verbs.add_parser("show", help="instances: state, resources, image, signer")
    show.add_argument("name", nargs="?", default="")
    show.add_argument("--json", action="store_true")
    exec_ = verbs.add_parser(
        "exec", help="run a command inside an active instance (no command: status)"
    )
    exec_.add_argument("name")
    exec_.add_argument("command", nargs=argparse.REMAINDER)

    verbs.add_parser(
        "image", help="keygen | sign | verify | pack images (mkctl image -h)", add_help=False
    )

    bus = verbs.add_parser(
        "bus", help="inspect the bus: list, introspect, stats, monitor, pub, call"
    )
    bus_verbs = bus.add_subparsers(dest="bus_command", required=True)
    for name in ("list", "introspect", "stats"):
        bus_verbs.add_parser(name).add_argument("--json", action="store_true")
    monitor = bus_verbs.add_parser(
        "monitor", help="every frame on the bus, with timestamps (privileged)"
    )
    monitor.add_argument("pattern", nargs="?", default=">")
    pub = bus_verbs.add_parser("pub", help="publish a JSON body on a subject")
    pub.add_argument("subject")
    pub.add_argument("body")
    call = bus_verbs.add_parser("call", help="call a service's method with a JSON body")
    call.add_argument("service")
    call.add_argument("method")
    call.add_argument("body", nargs="?", default="")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["image"]:
        return _image(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    match args.verb:
        case "host":
            return {"up": host_up, "down": host_down, "status": _host_status}[args.host_command](
                args
            )
        case "create":
            cpus, count = args.cpus
            return _lifecycle(args, "create", CreateInstance(args.name, cpus, count, args.memory))
        case "update":
            cpus, count = args.cpus
            return _lifecycle(args, "update", UpdateInstance(args.name, cpus, count, args.memory))
        case "load":
            image = str(Path(args.image).resolve())
            return _lifecycle(args, "load", LoadImage(args.name, image))
        case "start":
            return _lifecycle(args, "start", StartInstance(args.name, tuple(args.command)))
        case "kill":
            return _lifecycle(args, "kill", KillInstance(args.name, args.force, args.grace))
        case "delete":
            return _lifecycle(args, "delete", DeleteInstance(args.name))
        case "show":
            return _lifecycle(args, "show", ShowInstances(args.name))
        case "exec":
            return _exec(args)
        case "bus":
            return _bus(args)
    return 2


def run() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
