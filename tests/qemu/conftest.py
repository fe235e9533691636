"""Guests under QEMU: one image per run (cached per user across runs), asyncio only.

Booting a guest takes seconds under TCG, so these tests run under one event loop (not the three
the rest of the suite tries) and boot as few guests as they can. Without QEMU (Debian's
`qemu-system-x86`, which `.ci/run` installs) they are skipped, with that reason.
"""

from __future__ import annotations

import shutil

import pytest

from multikernel.services._qemu_image import GuestImage, build_image
from multikernel.services._qemu_vm import QEMU


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {"use_uvloop": False})


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest kernel and initramfs (fetched and built the first time)."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (Debian's qemu-system-x86; .ci/run installs it)")
    return build_image()
