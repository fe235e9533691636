"""The adaptive spin learns from recent wait times (no ring needed: the rule alone)."""

from __future__ import annotations

from multikernel.shm import WaitPolicy
from multikernel.shm._wait import SpinGovernor

US = 1000


def test_answers_within_the_window_keep_the_spin_and_an_odd_late_one_does_not_stop_it() -> None:
    governor = SpinGovernor(WaitPolicy(spin=50e-6))
    for _ in range(100):
        assert governor.should_spin()
        governor.learn(5 * US, caught=True)
    governor.learn(5_000 * US, caught=False)  # one reply came very late
    assert governor.should_spin()


def test_answers_later_than_the_window_stop_the_spin_within_a_few_waits() -> None:
    governor = SpinGovernor(WaitPolicy(spin=50e-6))
    spun = 0
    for _ in range(10):
        spun += governor.should_spin()
        governor.learn(120 * US, caught=False)  # the peer sleeps: ~120 us to be answered
    assert spun <= 6
    assert [governor.should_spin() for _ in range(64)].count(True) == 2  # probes only


def test_a_probe_that_catches_a_fast_answer_turns_the_spin_back_on() -> None:
    governor = SpinGovernor(WaitPolicy(spin=50e-6, probe_every=4))
    for _ in range(20):
        governor.learn(500 * US, caught=False)
    assert [governor.should_spin() for _ in range(3)] == [False, False, False]
    assert governor.should_spin()  # the probe
    governor.learn(4 * US, caught=True)
    assert all(governor.should_spin() for _ in range(10))


def test_no_adaptation_or_no_spin_when_the_policy_says_so() -> None:
    always = SpinGovernor(WaitPolicy(adaptive=False))
    never = SpinGovernor(WaitPolicy(spin=0))
    for _ in range(20):
        always.learn(10_000 * US, caught=False)
    assert always.should_spin()
    assert not never.should_spin()
