"""An instance's launch spec on a platform whose instances are kernels of their own (`qemu`).

Such an instance boots the kernel and initramfs of its verified image, and its agent runs inside
that kernel, where no fd of the host reaches: it inherits no bus socket (it attaches over the
session channel the platform lays in the guest's memory) and no output pipe (the guest's console,
where the agent and its workload write, is the launch's output). Its workload is the command
`mkctl start NAME -- CMD` gives (the image's own entry is the guest's init, which runs the
agent); `{python}` in it is the guest's interpreter.
"""

from __future__ import annotations

import json
import os
from typing import Final

from multikernel.services._instances import Instance
from multikernel.services._platform import KernelImage, LaunchSpec

#: Platforms whose instances are kernels of their own, launched with `guest_spec`.
GUEST_PLATFORMS: Final = frozenset({"qemu"})
#: The interpreter in a guest (its init links it there).
GUEST_PYTHON: Final = "/bin/python3"


def guest_spec(inst: Instance, output: int, heartbeat: float | None = None) -> LaunchSpec:
    """How to launch `inst`'s agent inside a kernel of its own (the `qemu` platform): no fd
    crosses into it, so no bus socket (the agent attaches over the session channel the
    platform lays in the guest's memory) and no output pipe (its console, where the agent
    and its workload write, goes to `output`). It boots the kernel and initramfs of its
    verified image; `{python}` in the command is the guest's interpreter."""
    assert inst.image is not None
    assert inst.resources is not None
    assert inst.image_dir is not None
    manifest = inst.image.manifest
    params = manifest.parameters
    env = {
        "MULTIKERNEL_INSTANCE": str(inst.id),
        "MULTIKERNEL_INSTANCE_NAME": inst.name,
        "MULTIKERNEL_WORKLOAD": json.dumps(
            [arg.replace("{python}", GUEST_PYTHON) for arg in inst.command]
        ),
        "MULTIKERNEL_WORKLOAD_ENV": json.dumps(
            {**manifest.env, "MULTIKERNEL_PARAMETERS": json.dumps(params)}
        ),
        "MULTIKERNEL_MEMORY": str(inst.resources.memory),
        "MULTIKERNEL_QUEUES": json.dumps(list(inst.queues)),
        "MULTIKERNEL_RESOURCE_TX": str(inst.resource_tx),
        "PATH": "/bin",
    }
    if heartbeat is not None:
        env["MULTIKERNEL_HEARTBEAT"] = f"{heartbeat:g}"
    if level := os.environ.get("MULTIKERNEL_LOG_LEVEL"):
        env["MULTIKERNEL_LOG_LEVEL"] = level
    boot = KernelImage(
        inst.image_dir / str(params.get("kernel", "vmlinuz")),
        inst.image_dir / str(params.get("initramfs", "initramfs.cpio.gz")),
        str(params.get("kernel_release", "")),
    )
    return LaunchSpec(
            inst.name, inst.id, [GUEST_PYTHON, "-m", "multikernel.services.agent"], env, (),
            inst.resources, stdout=output, stderr=output, platform=inst.platform, boot=boot,
            interrupts=inst.interrupts,
        )  # fmt: skip
