"""`python -m multikernel.services.host`: run a multikernel host (hub + actors) in the foreground.

Usually started by `mkctl host up`. With `--ready-fd N` it writes "ready <pid>\\n" to fd N once
its control socket listens, then closes it. With `--pid-file PATH` it writes its pid there once
ready and removes the file when it exits, so `mkctl host down` finds a host however it started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio

from multikernel.bus import SocketAccess
from multikernel.endpoints import runtime
from multikernel.endpoints.log import configure, get_logger
from multikernel.endpoints.wire import default_socket_path
from multikernel.protocol import MultikernelError, parse_cpus, parse_size
from multikernel.services._host import HostConfig, multikernel_platform, run_host
from multikernel.services._mk_steps import BootImage
from multikernel.services._rebalance import load_rebalancer

log = get_logger("multikernel.host")


def _cpu_list(text: str) -> frozenset[int]:
    spec = parse_cpus(text if text.startswith("@") else "@" + text)
    return frozenset(spec.ids)


def _percent(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a percentage from 1 to 100, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multikernel.services.host", description=__doc__)
    p.add_argument("--socket", type=Path, default=None, help="the bus control socket")
    p.add_argument("--state-dir", type=Path, default=None, help="where instances' files live")
    p.add_argument("--policy", type=Path, default=None, help="access policy (TOML)")
    p.add_argument(
        "--trusted-keys",
        type=Path,
        action="append",
        default=[],
        help="certificate file or directory of certificates trusted to sign images",
    )
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned images")
    p.add_argument(
        "--no-isolation",
        action="store_true",
        help="no namespaces or cgroups for instances (CPU affinity only)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        help="seconds between the agents' heartbeats (default 1)",
    )
    p.add_argument(
        "--no-fault",
        action="store_true",
        help="do not run the fault actor (failed instances stay down)",
    )
    p.add_argument("--no-upgrade", action="store_true", help="do not run the upgrade actor")
    p.add_argument(
        "--reserve-cpus", type=_cpu_list, default=frozenset(), help="CPUs kept for the host (@0)"
    )
    p.add_argument(
        "--reserve-memory", type=parse_size, default=0, help="memory kept for the host (1G)"
    )
    p.add_argument("--placement", default="pack", help="pack, spread or package.module:attr")
    p.add_argument(
        "--cpu-share", type=int, default=1, help="instances that may share one CPU (default 1)"
    )
    p.add_argument(
        "--ack-timeout", type=float, default=5.0, help="seconds an instance has to acknowledge"
    )
    p.add_argument(
        "--elastic-max-cpus",
        type=int,
        default=0,
        help="CPUs an instance may grow to by asking (default 0: what its operator granted)",
    )
    p.add_argument(
        "--elastic-max-memory",
        type=parse_size,
        default=0,
        help="memory an instance may grow to by asking (default 0: what its operator granted)",
    )
    p.add_argument(
        "--rebalance",
        nargs="?",
        const="pressure",
        default="",
        metavar="POLICY",
        help="resize grants by the instances' load reports: pressure (the default policy) or "
        "package.module:attr (off unless given; docs/resources.md)",
    )
    p.add_argument(
        "--sysfs-root", type=Path, default=Path("/"), help="read the machine from this tree (tests)"
    )
    p.add_argument(
        "--memory-bandwidth",
        type=_percent,
        default=None,
        metavar="PERCENT",
        help="limit each instance's memory bandwidth (resctrl MB, where the machine has it)",
    )
    p.add_argument(
        "--metrics",
        default="127.0.0.1:0",
        help="HOST:PORT for Prometheus metrics (port 0: any free one; 'off': none)",
    )
    p.add_argument("--pid-file", type=Path, default=None, help="write the host's pid there")
    p.add_argument(
        "--socket-mode",
        default=None,
        help="control socket mode, octal (default 0600: the host's user and root only; 0660 "
        "with --socket-group lets that group connect; docs/security.md)",
    )
    p.add_argument("--socket-group", default=None, help="control socket group (a name or a gid)")
    p.add_argument(
        "--platform",
        choices=("local", "multikernel"),
        default="local",
        help="what runs instances: process trees here (local), or kernels of their own on a "
        "multikernel kernel (docs/platform.md)",
    )
    p.add_argument(
        "--kernfs",
        type=Path,
        default=Path("/sys/fs/multikernel"),
        help="the multikernel file system (--platform multikernel)",
    )
    p.add_argument("--kernel", type=Path, default=None, help="the kernel instances boot (vmlinux)")
    p.add_argument("--initrd", type=Path, default=None, help="their initrd (with our init)")
    p.add_argument("--cmdline", default="", help="their kernel command line")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from(args: argparse.Namespace) -> HostConfig:
    socket_path = args.socket or default_socket_path()
    policy_text, source = "", "<default>"
    if args.policy is not None:
        policy_text, source = args.policy.read_text(), str(args.policy)
    if args.rebalance:
        load_rebalancer(args.rebalance)  # a bad name fails here, not in the resource actor
    return HostConfig(
        socket=socket_path,
        state_dir=args.state_dir or socket_path.parent,
        policy_text=policy_text,
        policy_source=source,
        trusted=list(args.trusted_keys),
        allow_unsigned=args.allow_unsigned,
        isolate=not args.no_isolation,
        heartbeat=args.heartbeat,
        fault=not args.no_fault,
        upgrade=not args.no_upgrade,
        reserve_cpus=args.reserve_cpus,
        reserve_memory=args.reserve_memory,
        placement=args.placement,
        cpu_share=args.cpu_share,
        ack_timeout=args.ack_timeout,
        elastic_max_cpus=args.elastic_max_cpus,
        elastic_max_memory=args.elastic_max_memory,
        rebalance=args.rebalance,
        sysfs_root=args.sysfs_root,
        memory_bandwidth=args.memory_bandwidth,
        metrics="" if args.metrics == "off" else args.metrics,
        socket_access=SocketAccess.parse(args.socket_mode, args.socket_group),
        platform=args.platform,
        kernfs=args.kernfs,
        boot=None if args.kernel is None else BootImage(args.kernel, args.initrd, args.cmdline),
    )


async def _serve(config: HostConfig, ready_fd: int | None, pid_file: Path | None) -> None:
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_host, config)
            if pid_file is not None:
                _write_pid(pid_file)
            log.info("host ready", pid=os.getpid(), pid_file=str(pid_file or ""))
            if ready_fd is not None:
                os.write(ready_fd, f"ready {os.getpid()}\n".encode())
                os.close(ready_fd)
    finally:
        if pid_file is not None:
            _remove_pid(pid_file)


def _write_pid(pid_file: Path) -> None:
    pid_file.write_text(f"{os.getpid()}\n")


def _remove_pid(pid_file: Path) -> None:
    """Remove the pid file if it is still ours (a newer host may have taken the path)."""
    try:
        if int(pid_file.read_text()) == os.getpid():
            pid_file.unlink()
    except (OSError, ValueError):
        return


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure()
    runtime.raise_fd_limit()
    try:
        config = config_from(args)
        if config.platform == "multikernel":
            multikernel_platform(config)  # no kernel there: say so in one line, before anything
        runtime.run(_serve, config, args.ready_fd, args.pid_file)
    except (MultikernelError, OSError, RuntimeError, ValueError) as exc:
        print(f"host: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
