"""How a side waits: spin briefly, then sleep on the doorbell, or poll with back-off without one.

Processes outnumber cores on the machines this runs on, so a spinner yields the CPU on every
turn (otherwise it keeps the very peer it waits for off the CPU) and spins only for a short,
configurable window. Whether a wait spins at all is learnt from the recent waits: a side keeps a
running average of how long its waits took, and while that is longer than half the spin window
(the answers come too late for a spin to be sure to catch them: a peer that sleeps and must be
woken, sparse traffic) it goes to sleep at once, as a plain blocking read would, and pays no CPU
for spinning; every `probe_every`-th wait still spins, and one that catches its answer within
half the window brings spinning back at once.
An idle side sleeps in the kernel and costs nothing.

Also here: the cheap checks for cancellation that every async send and receive makes
(`cancel_pending`, `cancel_point`), and how an async spin lets the event loop run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio.lowlevel


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """The knobs of waiting; the defaults suit request/reply traffic on a busy 2-core host.

    spin: seconds to spin (yielding the CPU each turn) before going to sleep; 0 never spins.
    adaptive: learn from the recent waits whether to spin (see the module docstring); False
        spins before every sleep.
    miss_limit: about how many waits in a row must come later than the spin window before
        spinning pauses (a wait weighs 1 / (2 * miss_limit) in the running average), so an odd
        late answer does not stop it.
    probe_every: while paused, spin again on every n-th wait, to notice answers coming fast again.
    poll_min / poll_max: without a doorbell (a region with no interrupt userspace can see),
        the sleep between polls starts at poll_min and doubles up to poll_max; poll_max bounds
        both the added latency and the idle CPU cost (one wake-up per poll_max).
    cooperative: in async code, spin in short slices between which the event loop runs other
        tasks (the answer is often produced by one of them: a handler in this very process). A
        process whose only job is this channel can set False to spin without going back to the
        event loop, blocking its loop for up to `spin`.
    """

    spin: float = 50e-6
    adaptive: bool = True
    miss_limit: int = 4
    probe_every: int = 32
    poll_min: float = 10e-6
    poll_max: float = 1e-3
    cooperative: bool = True

    def __post_init__(self) -> None:
        if self.spin < 0 or self.poll_min <= 0 or self.poll_max < self.poll_min:
            raise ValueError(
                "WaitPolicy needs spin >= 0 and 0 < poll_min <= poll_max, "
                f"got spin={self.spin}, poll_min={self.poll_min}, poll_max={self.poll_max}"
            )
        if self.miss_limit < 1 or self.probe_every < 1:
            raise ValueError("WaitPolicy needs miss_limit >= 1 and probe_every >= 1")


class SpinGovernor:
    """Per-side state of the adaptive rule: learns how long waits take, decides whether to spin.

    `typical_ns` is a running average of recent waits (each counted up to twice the window, so
    one long idle stretch is forgotten quickly). Waits spin while it is at most half the window;
    a probe that catches its answer that fast resets it, since answers come fast again.
    """

    __slots__ = ("_policy", "_shift", "_skipped", "spin_ns", "typical_ns")

    def __init__(self, policy: WaitPolicy) -> None:
        self._policy = policy
        self.spin_ns = int(policy.spin * 1e9)
        self._shift = max(1, (2 * policy.miss_limit).bit_length() - 1)  # weight 2**-shift
        self.typical_ns = 0
        self._skipped = 0

    def should_spin(self) -> bool:
        if self.spin_ns == 0:
            return False
        policy = self._policy
        if not policy.adaptive or 2 * self.typical_ns <= self.spin_ns:
            return True
        self._skipped += 1
        if self._skipped >= policy.probe_every:
            self._skipped = 0
            return True
        return False

    def learn(self, waited_ns: int, *, caught: bool) -> None:
        """A wait took `waited_ns`; `caught`: it ended while spinning."""
        sample = min(waited_ns, 2 * self.spin_ns)
        if caught and 2 * sample <= self.spin_ns < 2 * self.typical_ns:
            self.typical_ns = sample  # a probe caught a fast answer: spin again from now on
            self._skipped = 0
        else:
            self.typical_ns += (sample - self.typical_ns) >> self._shift


async def _asyncio_checkpoint() -> None:
    await asyncio.sleep(0)  # what anyio's checkpoint does on asyncio, without finding the backend


def checkpoint_for_spin() -> Callable[[], Awaitable[None]]:
    """The cheapest way to let the running event loop run other tasks, found once per wait."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio, or another loop anyio runs on
        return anyio.lowlevel.checkpoint
    return _asyncio_checkpoint


def cancel_pending() -> bool:
    """Whether a send or receive must check for cancellation (`cancel_point`) before going on.

    anyio's `checkpoint_if_cancelled` runs on every send and receive, and costs 2-4 us there
    (finding the backend, then the task's cancel scopes through a weak-key dictionary): more
    than the ring's round trip. Under asyncio a task that a cancel scope (or anything else)
    cancelled has a cancellation request pending, which `Task.cancelling()` tells without an
    await; only then does the call yield (`cancel_point`), which raises it. One case differs: a
    task that cancels its own enclosing scope and then sends or receives without waiting raises
    at its next wait instead of at this call (nothing is lost: the frame was handed over).
    Under other loops (trio) the answer is always yes, and the check is anyio's own.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop: trio, or another loop anyio runs on
        return True
    return task is not None and task.cancelling() > 0


async def cancel_point() -> None:
    """After `cancel_pending`: under asyncio yield once (the pending cancellation raises), else
    anyio's `checkpoint_if_cancelled`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        await anyio.lowlevel.checkpoint_if_cancelled()
        return
    await asyncio.sleep(0)
