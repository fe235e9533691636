"""How a side waits: spin briefly, then sleep on the doorbell, or poll with back-off without one.

Processes outnumber cores on the machines this runs on, so a spinner calls `os.sched_yield()` on
every turn (otherwise it keeps the very peer it waits for off the CPU), spins only for a short,
configurable window, and stops spinning while its recent spins kept missing (the peer is not
answering quickly right now, so spinning would only burn CPU). An idle side sleeps in the kernel and
costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """The knobs of waiting; the defaults suit request/reply traffic on a busy 2-core host.

    spin: seconds to spin (yielding the CPU each turn) before going to sleep; 0 never spins.
    adaptive: after `miss_limit` spins in a row that found nothing, spin only on every
        `probe_every`-th wait until a spin succeeds again.
    poll_min / poll_max: without a doorbell (a region with no interrupt userspace can see),
        the sleep between polls starts at poll_min and doubles up to poll_max; poll_max bounds
        both the added latency and the idle CPU cost (one wake-up per poll_max).
    cooperative: in async code, spin by yielding to the event loop on every turn, so other
        tasks run meanwhile (the answer is often produced by one of them: a handler in this
        very process). A process whose only job is this channel can set False to spin without
        the event-loop round trip (~4 us less per round trip here), blocking its loop for up to
        `spin`.
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
    """Per-side state of the adaptive rule: decides whether the next wait should spin."""

    __slots__ = ("_misses", "_policy", "_skipped", "spin_ns")

    def __init__(self, policy: WaitPolicy) -> None:
        self._policy = policy
        self.spin_ns = int(policy.spin * 1e9)
        self._misses = 0
        self._skipped = 0

    def should_spin(self) -> bool:
        if self.spin_ns == 0:
            return False
        policy = self._policy
        if not policy.adaptive or self._misses < policy.miss_limit:
            return True
        self._skipped += 1
        if self._skipped >= policy.probe_every:
            self._skipped = 0
            return True
        return False

    def record(self, hit: bool) -> None:
        if hit:
            self._misses = 0
        else:
            self._misses += 1
