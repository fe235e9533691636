"""`python -m multikernel.bus`: run the hub in the foreground until SIGTERM/SIGINT.

SIGHUP reloads the policy file (a bad file keeps the old policy and logs why); SIGTERM drains
(endpoints are told to hand over their names and finish in-flight work) before exiting.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import anyio

from multikernel.bus._hub import Hub
from multikernel.bus._policy import Policy
from multikernel.bus._rules import PolicyError
from multikernel.bus._session import Limits
from multikernel.bus._socket_access import SocketAccess
from multikernel.endpoints import runtime
from multikernel.endpoints.log import configure, get_logger
from multikernel.endpoints.wire import default_socket_path

log = get_logger("multikernel.bus")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multikernel.bus", description=__doc__)
    parser.add_argument("--socket", type=Path, default=None, help="control socket path")
    parser.add_argument("--policy", type=Path, default=None, help="access policy (TOML)")
    parser.add_argument("--max-pending", type=int, default=Limits.max_pending)
    parser.add_argument(
        "--slow-consumer",
        choices=["block", "drop", "disconnect"],
        default=Limits.slow_consumer,
        help="past --max-pending: hold the publishers (block), drop, or disconnect the subscriber",
    )
    parser.add_argument(
        "--block-patience",
        type=float,
        default=Limits.block_patience,
        help="seconds `block` holds a publisher for one subscriber before dropping for it",
    )
    parser.add_argument(
        "--max-subscriptions",
        type=int,
        default=Limits.max_subscriptions,
        help="subscriptions one endpoint may hold",
    )
    parser.add_argument("--grace", type=float, default=5.0, help="drain time on SIGTERM (s)")
    parser.add_argument(
        "--socket-mode",
        default=None,
        help="control socket mode, octal (default 0600: the hub's user only; 0660 with "
        "--socket-group lets a group in; docs/security.md)",
    )
    parser.add_argument(
        "--socket-group", default=None, help="control socket group (a name or a gid)"
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    policy = Policy.load(args.policy) if args.policy else Policy.default()
    limits = Limits(
        max_pending=args.max_pending,
        slow_consumer=args.slow_consumer,
        block_patience=args.block_patience,
        max_subscriptions=args.max_subscriptions,
    )
    access = SocketAccess.parse(args.socket_mode, args.socket_group)
    hub = Hub(
        args.socket or default_socket_path(), policy=policy, limits=limits, socket_access=access
    )
    # Signals are ours before the hub says it is listening: a SIGHUP sent on that cue must
    # reload, not kill the process with the default action.
    with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(hub.serve)
            async for signum in signals:
                if signum == signal.SIGHUP and args.policy:
                    try:
                        hub.reload_policy(Policy.load(args.policy))
                    except PolicyError as exc:
                        log.warning("policy not reloaded; the old one stays", error=str(exc))
                elif signum != signal.SIGHUP:
                    await hub.drain(args.grace)
                    tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure()
    runtime.raise_fd_limit()
    failed = False
    try:
        runtime.run(run, args)
    except* (PolicyError, RuntimeError, ValueError) as group:  # raised inside the hub's task group
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
