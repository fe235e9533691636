"""A restarted host finds its multikernel instances again, in the kernel's file system.

An instance is a kernel of its own: it runs on when the host's control plane dies, and the kernel
keeps what a restarted host needs to know about it (`instances/<name>/{id,status}` and the
overlay transactions that made and resized it). For every launch the lifecycle stores an
`MkLaunchRecord` (the instance's name, id and the transactions the launch made); a restarted host
(`_recovery.recover`) then, for each:

- **adopts** a launch whose instance the kernel still has, under the same id, `active`: the
  platform watches its `status` again, and kills and reclaims it like one it launched; it opens a
  new control connection to the instance's init, which brings the agent's sessions, its output
  and its exit status back (`_mk_control`);
- **reclaims** any other: force-halt if it is still `active` (a launch the lifecycle never saw
  become active); an instance the lifecycle made (`kept`: its create and load) stays `loaded`
  for its next start, one the launch made itself is also unloaded and every transaction it made
  and every grant under `/instances/<name>` rolled back, newest first. An instance the kernel no
  longer has (or has under another id: not ours) is left alone;
- a launch cut short before its record was stored (`reclaim_unit`) is found by the
  `instance-create` transaction that named it, and halted: the lifecycle still has the instance.
"""

from __future__ import annotations

import contextlib

import anyio
import msgspec

from multikernel.endpoints.log import get_logger
from multikernel.services._mk_kernel import REBOOT_CMD_HALT_FORCE
from multikernel.services._mk_steps import KernelSteps
from multikernel.services._platform import PlatformError

log = get_logger("multikernel.services.multikernel")


class MkLaunchRecord(msgspec.Struct, frozen=True):
    """What a restarted host needs to find one multikernel launch again."""

    name: str
    id: int
    transactions: tuple[int, ...]  # the launch's own (its instance-create first)
    kept: bool = False  # the instance outlives the launch (made by the lifecycle's create)


def encode_record(
    name: str, instance_id: int, transactions: list[int], *, kept: bool = False
) -> str:
    record = MkLaunchRecord(name, instance_id, tuple(transactions), kept)
    return msgspec.json.encode(record).decode()


def decode_record(record: str) -> MkLaunchRecord:
    return msgspec.json.decode(record, type=MkLaunchRecord)


def adoptable(steps: KernelSteps, found: MkLaunchRecord) -> bool:
    """The kernel still runs this launch's instance: same name, same id, `active`."""
    return steps.instance_id(found.name) == found.id and steps.status(found.name) == "active"


async def halt(steps: KernelSteps, name: str, instance_id: int, *, within: float) -> bool:
    """Force-halt instance `name` if the kernel runs it under `instance_id`; False if the
    kernel has no such instance (gone, or another's of that name: nothing of ours)."""
    if steps.instance_id(name) != instance_id:
        return False
    if steps.status(name) == "active":
        steps.reboot(f"cannot halt {name!r}", REBOOT_CMD_HALT_FORCE, instance_id)
        with anyio.move_on_after(within):
            while steps.status(name) == "active":  # noqa: ASYNC110 (the kernel only has a file)
                await anyio.sleep(0.01)
    return True


async def reclaim(
    steps: KernelSteps, name: str, instance_id: int, made: set[int], *, within: float
) -> None:
    """End what is left of instance `name` (id `instance_id`) in the kernel and roll back its
    transactions (`made`, plus every grant under `/instances/<name>`), newest first."""
    if not await halt(steps, name, instance_id, within=within):
        return
    if steps.status(name) == "loaded":
        await steps.unload(name, instance_id)
    created = steps.created(name)
    if created is not None:
        made = made | {created}
    for tx in sorted(made | set(steps.grants_of(name)), reverse=True):
        await steps.rollback(tx)
    log.info("instance reclaimed after a host restart", instance=name, id=instance_id)


async def reclaim_unit(steps: KernelSteps, unit: str, *, within: float) -> None:
    """A launch of `unit` cut short by a crash, before its record was stored: halt the instance
    its `instance-create` made, if the kernel runs it. The instance itself stays (`loaded` or
    `ready`), as the lifecycle still has it: its next start boots it, its delete removes it."""
    instance_id = steps.instance_id(unit)
    if instance_id is None or steps.created(unit) is None:
        return
    with contextlib.suppress(PlatformError):
        await halt(steps, unit, instance_id, within=within)
