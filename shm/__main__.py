"""`python -m multikernel.shm orphans [--remove]`: list or delete regions of dead processes."""

from __future__ import annotations

import argparse
import sys

from multikernel.shm._region import SHM_DIR, find_orphans, name_prefix, remove_orphans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multikernel.shm")
    sub = parser.add_subparsers(dest="command", required=True)
    orphans = sub.add_parser("orphans", help="named regions whose creating process is gone")
    orphans.add_argument("--remove", action="store_true", help="delete them")
    orphans.add_argument("--dir", default=str(SHM_DIR), help="where to look (default /dev/shm)")
    orphans.add_argument(
        "--tag", default="", help="only regions made under this $MULTIKERNEL_SHM_TAG"
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    directory = Path(args.dir)
    prefix = name_prefix(args.tag)
    if args.remove:
        paths = remove_orphans(directory, prefix=prefix)
    else:
        paths = list(find_orphans(directory, prefix=prefix))
    verb = "removed" if args.remove else "orphan"
    for path in paths:
        print(f"{verb} {path}")
    if not paths:
        print("no orphaned regions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
