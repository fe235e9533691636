"""The phi-accrual detector, fed synthetic heartbeat arrival times: deterministic, no clock."""

from __future__ import annotations

import random

import pytest

from multikernel.services._phi import PhiAccrual, PhiConfig


def steady(detector: PhiAccrual, period: float, beats: int, jitter: float, seed: int) -> float:
    """Feed `beats` heartbeats `period` apart (± `jitter`); return the last arrival time."""
    rng = random.Random(seed)
    t = detector.last
    for _ in range(beats):
        t += period + rng.uniform(-jitter, jitter)
        detector.heartbeat(t)
    return t


def first_suspicion(detector: PhiAccrual, since: float, step: float = 0.001) -> float:
    """Seconds after `since` (the last heartbeat) at which the detector first suspects."""
    t = since
    while not detector.suspects(t):
        t += step
    return t - since


@pytest.mark.parametrize("seed", range(5))
def test_it_never_fires_under_normal_load(seed: int) -> None:
    """Heartbeats every second with ±50 ms of jitter, and one in twenty late by up to 1.5 s
    (a loaded host, a GC pause): phi stays under the threshold just before every arrival."""
    config = PhiConfig.for_period(1.0)
    detector = PhiAccrual(config, 0.0)
    rng = random.Random(seed)
    t = 0.0
    worst = 0.0
    for _ in range(5000):
        interval = 1.0 + rng.uniform(-0.05, 0.05)
        if rng.random() < 0.05:
            interval += rng.uniform(0.0, 1.5)
        t += interval
        worst = max(worst, detector.phi(t - 1e-6))  # the most suspicious moment: just before
        detector.heartbeat(t)
    assert worst < config.threshold


def test_a_perfectly_regular_stream_tolerates_a_late_heartbeat() -> None:
    """The minimum deviation keeps a metronome from making a second's delay a certainty."""
    config = PhiConfig.for_period(1.0)
    detector = PhiAccrual(config, 0.0)
    last = steady(detector, 1.0, 1000, 0.0, seed=0)
    assert not detector.suspects(last + 2.0)  # one heartbeat late by a whole period


@pytest.mark.parametrize("period", [1.0, 0.5, 2.0])
def test_a_stopped_instance_is_caught_within_a_few_heartbeat_intervals(period: float) -> None:
    config = PhiConfig.for_period(period)
    detector = PhiAccrual(config, 0.0)
    last = steady(detector, period, 200, period * 0.05, seed=1)
    after = first_suspicion(detector, last)
    # It stopped somewhere in the period after its last heartbeat: caught 2 to 4 periods later.
    assert 2 * period <= after <= 4 * period


def test_the_defaults_at_one_second_catch_it_about_three_seconds_after_the_last_beat() -> None:
    detector = PhiAccrual(PhiConfig.for_period(1.0), 0.0)
    last = steady(detector, 1.0, 100, 0.02, seed=2)
    assert first_suspicion(detector, last) == pytest.approx(3.05, abs=0.1)


def test_it_learns_the_rhythm_it_sees() -> None:
    """Started expecting 1 s, an instance that beats every 3 s is suspected later, not at once."""
    detector = PhiAccrual(PhiConfig.for_period(1.0), 0.0)
    last = steady(detector, 3.0, 100, 0.1, seed=3)
    assert not detector.suspects(last + 4.0)
    assert 4.0 < first_suspicion(detector, last) < 7.0


def test_phi_grows_with_the_silence() -> None:
    detector = PhiAccrual(PhiConfig.for_period(1.0), 0.0)
    last = steady(detector, 1.0, 100, 0.05, seed=4)
    values = [detector.phi(last + dt / 10) for dt in range(0, 60)]
    assert values == sorted(values)
    assert values[0] == 0.0
