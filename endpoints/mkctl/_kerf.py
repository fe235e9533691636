"""kerf's vocabulary in mkctl: its verbs where ours are named differently.

`kerf` (kerf-multikernel) is the multikernel kernel's own command line. Where a kerf verb has a
counterpart of ours under another name, mkctl takes kerf's name too (a hidden alias: `mkctl
--help` lists ours); its flags that differ are second names of our options (`-c`/`--cpu-count`
for `--cpus`, `-m` for `--memory`, `-f` for `kill --force`, `--id N` for an instance's name).
docs/platform.md ("mkctl and kerf") has the whole mapping, and where there is none, why.
"""

from __future__ import annotations

from typing import Final

#: kerf's verb → ours.
KERF_VERBS: Final = {
    "console": "logs",  # the instance's output (read-only; a shell is `exec -it`)
    "dump": "show",  # an instance as data: `mkctl dump NAME -o yaml`
}
