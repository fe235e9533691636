"""`python -m multikernel.services.resource`: the resource actor, in a process of its own.

Started (and restarted, and stopped) by the host; see `_resource_process` for its arguments.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from multikernel.endpoints import runtime
from multikernel.endpoints.log import configure
from multikernel.protocol import MultikernelError
from multikernel.services._resource_process import (
    ResourceConfig,
    die_with_parent,
    run_until_terminated,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multikernel.services.resource")
    p.add_argument("--config", required=True, help="ResourceConfig as JSON")
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--parent", type=int, default=None, help="exit when this process dies")
    args = p.parse_args(argv)
    configure()
    if args.parent is not None:
        die_with_parent(args.parent)
    try:
        config = msgspec.json.decode(args.config, type=ResourceConfig)
        runtime.run(run_until_terminated, config, args.ready_fd)
    except (MultikernelError, msgspec.ValidationError, OSError) as error:
        print(f"resource: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
