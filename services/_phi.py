"""The phi-accrual failure detector (Hayashibara, Défago, Yared, Katayama, SRDS 2004).

Instead of a fixed timeout, the detector keeps the recent intervals between an instance's heartbeats
and says, at any moment, how surprising the silence since the last one is: phi = -log10(P(a
heartbeat arrives later than now)), under a normal distribution of the intervals. phi = 1 means a
10 % chance that the instance is merely slow, 8 a chance of 10^-8. It adapts to each instance's
own rhythm and jitter; `threshold` is the one knob, in units of confidence.

Two guards make it fit heartbeats from processes on a busy host (as Akka's implementation does):
`acceptable_pause` is added to the mean, so a pause of that length (a GC, a scheduling hiccup) is
never suspicious, and the standard deviation is at least `min_std`, so a perfectly regular stream
does not turn a few milliseconds of delay into certainty. The normal CDF is Akka's logistic
approximation (error below 1e-4), cheap enough to evaluate for every instance many times a second.

The defaults for heartbeats every T seconds (`PhiConfig.for_period`): threshold 8, acceptable
pause max(T, 0.5 s), minimum deviation max(T/5, 50 ms), the last 100 intervals. With T = 1 s an
instance that stops is suspected about 3.0 s after its last heartbeat (2 to 3 periods after it
stopped); a heartbeat must be more than ~2 s late, under the steadiest rhythm, to be suspected.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PhiConfig:
    """A detector's settings (see the module docstring)."""

    expected: float = 1.0  # the heartbeat period, the first estimate of the mean interval
    threshold: float = 8.0
    acceptable_pause: float = 1.0
    min_std: float = 0.2
    window: int = 100

    @classmethod
    def for_period(cls, period: float, threshold: float = 8.0) -> PhiConfig:
        """The defaults for heartbeats every `period` seconds."""
        return cls(
            expected=period,
            threshold=threshold,
            acceptable_pause=max(period, 0.5),
            min_std=max(period / 5, 0.05),
        )


class PhiAccrual:
    """One heartbeat stream's detector; times are seconds on a monotonic clock."""

    def __init__(self, config: PhiConfig, first: float) -> None:
        """Start with the heartbeat that arrived at `first` (the first one seen)."""
        self.config = config
        self.last = first
        # Bootstrap with two intervals around the expected one (mean T, deviation T/4), so the
        # first real intervals refine an estimate instead of making one from a single sample.
        spread = config.expected / 4
        self._intervals: deque[float] = deque(
            (config.expected - spread, config.expected + spread), maxlen=config.window
        )
        self._sum = sum(self._intervals)
        self._squares = sum(i * i for i in self._intervals)

    def heartbeat(self, now: float) -> None:
        """A heartbeat arrived at `now`."""
        interval = max(0.0, now - self.last)
        self.last = now
        if len(self._intervals) == self._intervals.maxlen:
            old = self._intervals[0]
            self._sum -= old
            self._squares -= old * old
        self._intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval

    @property
    def mean(self) -> float:
        return self._sum / len(self._intervals)

    @property
    def std(self) -> float:
        n = len(self._intervals)
        variance = max(0.0, self._squares / n - (self._sum / n) ** 2)
        return max(math.sqrt(variance), self.config.min_std)

    def phi(self, now: float) -> float:
        """How suspicious the silence since the last heartbeat is at `now`."""
        elapsed = max(0.0, now - self.last)
        mean = self.mean + self.config.acceptable_pause
        y = (elapsed - mean) / self.std
        if y < -8.0:  # far earlier than the mean: certainly not late
            return 0.0
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        p_later = e / (1.0 + e) if elapsed > mean else 1.0 - 1.0 / (1.0 + e)
        return -math.log10(max(p_later, 1e-300))

    def suspects(self, now: float) -> bool:
        return self.phi(now) >= self.config.threshold
