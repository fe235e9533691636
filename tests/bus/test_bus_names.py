"""Well-known names: D-Bus RequestName/ReleaseName semantics, events, and invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from multikernel.bus._names import NameRegistry, NamesStatistics
from multikernel.protocol import (
    InvalidSubjectError,
    NameFlag,
    NameOwnerChanged,
    ReleaseNameResult,
    RequestNameResult,
)

ALLOW = NameFlag.ALLOW_REPLACEMENT
REPLACE = NameFlag.REPLACE_EXISTING
NO_QUEUE = NameFlag.DO_NOT_QUEUE
NAME = "mk.svc.store"


def changed(old: int, new: int, name: str = NAME) -> NameOwnerChanged:
    return NameOwnerChanged(name=name, old_owner=old, new_owner=new)


def line_of(names: NameRegistry, name: str = NAME) -> list[int]:
    return names.snapshot().get(name, [])


@pytest.fixture
def names() -> NameRegistry:
    return NameRegistry()


# --- requesting -------------------------------------------------------------------------------


def test_first_request_makes_the_primary_owner(names: NameRegistry) -> None:
    assert names.request(NAME, 1) == (RequestNameResult.PRIMARY_OWNER, [changed(0, 1)])
    assert names.owner(NAME) == 1


def test_later_requests_queue_in_arrival_order(names: NameRegistry) -> None:
    names.request(NAME, 1)
    assert names.request(NAME, 2) == (RequestNameResult.IN_QUEUE, [])
    assert names.request(NAME, 3) == (RequestNameResult.IN_QUEUE, [])
    assert (names.owner(NAME), names.queue(NAME)) == (1, [2, 3])


def test_replace_existing_does_not_take_over_without_allow_replacement(
    names: NameRegistry,
) -> None:
    names.request(NAME, 1)
    names.request(NAME, 2)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert line_of(names) == [1, 3, 2], "a REPLACE_EXISTING waiter heads the queue"


def test_replace_existing_takes_over_when_the_owner_allows_it(names: NameRegistry) -> None:
    names.request(NAME, 1, ALLOW)
    names.request(NAME, 2)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert line_of(names) == [3, 1, 2], "the replaced owner heads the queue"


def test_replaced_owner_that_asked_do_not_queue_loses_the_name(names: NameRegistry) -> None:
    names.request(NAME, 1, ALLOW | NO_QUEUE)
    names.request(NAME, 2)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert line_of(names) == [3, 2]
    assert names.names_of(1) == []


def test_do_not_queue_on_an_owned_name_returns_exists_and_queues_nothing(
    names: NameRegistry,
) -> None:
    names.request(NAME, 1)
    assert names.request(NAME, 2, NO_QUEUE) == (RequestNameResult.EXISTS, [])
    assert line_of(names) == [1]


def test_do_not_queue_with_replace_existing_takes_over_when_allowed(names: NameRegistry) -> None:
    names.request(NAME, 1, ALLOW)
    result = names.request(NAME, 2, REPLACE | NO_QUEUE)
    assert result == (RequestNameResult.PRIMARY_OWNER, [changed(1, 2)])
    assert line_of(names) == [2, 1]


def test_do_not_queue_with_replace_existing_returns_exists_when_not_allowed(
    names: NameRegistry,
) -> None:
    names.request(NAME, 1)
    assert names.request(NAME, 2, REPLACE | NO_QUEUE) == (RequestNameResult.EXISTS, [])
    assert line_of(names) == [1]


def test_owner_requesting_again_is_already_owner_and_updates_its_flags(
    names: NameRegistry,
) -> None:
    names.request(NAME, 1)
    assert names.request(NAME, 1, ALLOW) == (RequestNameResult.ALREADY_OWNER, [])
    assert names.request(NAME, 2, REPLACE)[0] is RequestNameResult.PRIMARY_OWNER


def test_owner_requesting_again_can_withdraw_allow_replacement(names: NameRegistry) -> None:
    names.request(NAME, 1, ALLOW)
    assert names.request(NAME, 1) == (RequestNameResult.ALREADY_OWNER, [])
    assert names.request(NAME, 2, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert names.owner(NAME) == 1


def test_waiter_requesting_again_keeps_its_place(names: NameRegistry) -> None:
    for endpoint in (1, 2, 3):
        names.request(NAME, endpoint)
    assert names.request(NAME, 2) == (RequestNameResult.IN_QUEUE, [])
    assert line_of(names) == [1, 2, 3]


def test_waiter_requesting_again_with_replace_existing_moves_to_the_head(
    names: NameRegistry,
) -> None:
    for endpoint in (1, 2, 3):
        names.request(NAME, endpoint)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert line_of(names) == [1, 3, 2]


def test_waiter_requesting_again_with_replace_existing_takes_over_when_allowed(
    names: NameRegistry,
) -> None:
    for endpoint, flags in ((1, ALLOW), (2, 0), (3, 0)):
        names.request(NAME, endpoint, flags)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert line_of(names) == [3, 1, 2]


def test_waiter_requesting_again_with_do_not_queue_leaves_the_queue(names: NameRegistry) -> None:
    for endpoint in (1, 2, 3):
        names.request(NAME, endpoint)
    assert names.request(NAME, 2, NO_QUEUE) == (RequestNameResult.EXISTS, [])
    assert line_of(names) == [1, 3]
    assert names.release(NAME, 2)[0] is ReleaseNameResult.NOT_OWNER


def test_waiter_requesting_again_updates_the_flags_it_is_promoted_with(
    names: NameRegistry,
) -> None:
    names.request(NAME, 1)
    names.request(NAME, 2)
    names.request(NAME, 2, ALLOW)
    names.release(NAME, 1)
    assert names.request(NAME, 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(2, 3)])


def test_unknown_flag_bits_are_ignored(names: NameRegistry) -> None:
    assert names.request(NAME, 1, 0x80 | int(ALLOW))[0] is RequestNameResult.PRIMARY_OWNER
    assert names.request(NAME, 2, 0x80 | int(REPLACE))[0] is RequestNameResult.PRIMARY_OWNER


# --- releasing --------------------------------------------------------------------------------


def test_release_by_the_owner_promotes_the_head_of_the_queue(names: NameRegistry) -> None:
    for endpoint in (1, 2, 3):
        names.request(NAME, endpoint)
    assert names.release(NAME, 1) == (ReleaseNameResult.RELEASED, [changed(1, 2)])
    assert line_of(names) == [2, 3]


def test_release_by_the_last_owner_frees_the_name(names: NameRegistry) -> None:
    names.request(NAME, 1)
    assert names.release(NAME, 1) == (ReleaseNameResult.RELEASED, [changed(1, 0)])
    assert names.owner(NAME) is None
    assert NAME not in names


def test_release_by_a_waiter_leaves_the_queue_without_events(names: NameRegistry) -> None:
    for endpoint in (1, 2, 3):
        names.request(NAME, endpoint)
    assert names.release(NAME, 2) == (ReleaseNameResult.RELEASED, [])
    assert line_of(names) == [1, 3]


def test_release_by_an_endpoint_not_in_line_is_not_owner(names: NameRegistry) -> None:
    names.request(NAME, 1)
    assert names.release(NAME, 2) == (ReleaseNameResult.NOT_OWNER, [])
    assert line_of(names) == [1]


def test_release_of_an_unknown_name_is_non_existent(names: NameRegistry) -> None:
    assert names.release(NAME, 1) == (ReleaseNameResult.NON_EXISTENT, [])


def test_successive_releases_promote_waiters_in_queue_order(names: NameRegistry) -> None:
    for endpoint in (1, 2, 3, 4):
        names.request(NAME, endpoint)
    events = [event for owner in (1, 2, 3, 4) for event in names.release(NAME, owner)[1]]
    assert events == [changed(1, 2), changed(2, 3), changed(3, 4), changed(4, 0)]


# --- endpoints going away ---------------------------------------------------------------------


def test_remove_owner_promotes_successors_in_name_order(names: NameRegistry) -> None:
    for name in ("mk.b", "mk.a", "mk.c"):
        names.request(name, 1)
    names.request("mk.b", 2)
    names.request("mk.a", 3)
    names.request("mk.a", 2)
    assert names.remove_owner(1) == [
        changed(1, 3, "mk.a"),
        changed(1, 2, "mk.b"),
        changed(1, 0, "mk.c"),
    ]
    assert names.snapshot() == {"mk.a": [3, 2], "mk.b": [2]}


def test_remove_owner_of_a_waiter_leaves_every_queue_silently(names: NameRegistry) -> None:
    for name in ("mk.a", "mk.b"):
        names.request(name, 1)
        names.request(name, 2)
        names.request(name, 3)
    assert names.remove_owner(2) == []
    assert names.snapshot() == {"mk.a": [1, 3], "mk.b": [1, 3]}


def test_remove_owner_of_an_unknown_endpoint_changes_nothing(names: NameRegistry) -> None:
    names.request(NAME, 1)
    assert names.remove_owner(9) == []
    assert line_of(names) == [1]


# --- validation and introspection -------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "mk.*", "mk.>", "mk..svc", "mk svc", ":1.5", ":mk"])
def test_invalid_names_are_refused_on_request(names: NameRegistry, name: str) -> None:
    with pytest.raises(InvalidSubjectError):
        names.request(name, 1)


@pytest.mark.parametrize("name", ["", "mk.*", ":1.5"])
def test_invalid_names_are_refused_on_release(names: NameRegistry, name: str) -> None:
    with pytest.raises(InvalidSubjectError):
        names.release(name, 1)


def test_unique_endpoint_names_are_refused_with_a_clear_message(names: NameRegistry) -> None:
    with pytest.raises(InvalidSubjectError, match="unique endpoint name"):
        names.request(":1.5", 1)


@pytest.mark.parametrize("endpoint", [0, -1])
def test_endpoint_ids_must_be_positive(names: NameRegistry, endpoint: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        names.request(NAME, endpoint)


def test_names_of_lists_only_primary_ownerships(names: NameRegistry) -> None:
    names.request("mk.b", 1)
    names.request("mk.a", 1)
    names.request("mk.c", 2)
    names.request("mk.c", 1)
    assert names.names_of(1) == ["mk.a", "mk.b"]
    assert names.names_of(3) == []


def test_len_and_contains_count_owned_names(names: NameRegistry) -> None:
    names.request("mk.a", 1)
    names.request("mk.b", 2)
    names.request("mk.b", 1)
    assert len(names) == 2
    assert "mk.a" in names
    assert "mk.z" not in names


def test_statistics_count_names_waiters_and_direct_handoffs(names: NameRegistry) -> None:
    names.request("mk.a", 1, ALLOW)
    names.request("mk.a", 2)
    names.request("mk.a", 3, REPLACE)  # 1 -> 3
    names.request("mk.b", 1)
    names.release("mk.a", 3)  # 3 -> 1
    names.release("mk.b", 1)  # 1 -> nobody: not a handoff
    assert names.statistics() == NamesStatistics(names=1, queued=1, handoffs=2)


# --- invariants under random operations -------------------------------------------------------

ENDPOINTS = st.integers(min_value=1, max_value=4)
NAMES = st.sampled_from(["mk.a", "mk.b", "mk.c"])
FLAGS = st.integers(min_value=0, max_value=7)


class NamesMachine(RuleBasedStateMachine):
    """Random request/release/remove_owner sequences keep the registry's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.names = NameRegistry()
        self.replayed: dict[str, int] = {}  # owners rebuilt from the events alone

    def apply(self, events: list[NameOwnerChanged], before: dict[str, int | None]) -> None:
        after = {name: self.names.owner(name) for name in before}
        moved = {name for name in before if before[name] != after[name]}
        assert sorted(e.name for e in events) == sorted(moved), "one event per change"
        for event in events:
            assert event.old_owner == (before[event.name] or 0)
            assert event.new_owner == (after[event.name] or 0)
            assert self.replayed.get(event.name, 0) == event.old_owner
            if event.new_owner:
                self.replayed[event.name] = event.new_owner
            else:
                del self.replayed[event.name]

    def owners(self) -> dict[str, int | None]:
        return {name: self.names.owner(name) for name in ("mk.a", "mk.b", "mk.c")}

    @rule(name=NAMES, endpoint=ENDPOINTS, flags=FLAGS)
    def request(self, name: str, endpoint: int, flags: int) -> None:
        before = self.owners()
        result, events = self.names.request(name, endpoint, flags)
        self.apply(events, before)
        line = self.names.snapshot().get(name, [])
        if result in (RequestNameResult.PRIMARY_OWNER, RequestNameResult.ALREADY_OWNER):
            assert line[0] == endpoint
        elif result is RequestNameResult.IN_QUEUE:
            assert endpoint in line[1:]
        else:
            assert endpoint not in line

    @rule(name=NAMES, endpoint=ENDPOINTS)
    def release(self, name: str, endpoint: int) -> None:
        before = self.owners()
        was_in_line = endpoint in self.names.snapshot().get(name, [])
        result, events = self.names.release(name, endpoint)
        self.apply(events, before)
        assert (result is ReleaseNameResult.RELEASED) == was_in_line
        assert endpoint not in self.names.snapshot().get(name, [])

    @rule(endpoint=ENDPOINTS)
    def remove_owner(self, endpoint: int) -> None:
        before = self.owners()
        events = self.names.remove_owner(endpoint)
        self.apply(events, before)
        assert [e.name for e in events] == sorted(e.name for e in events)
        assert all(endpoint not in line for line in self.names.snapshot().values())

    @invariant()
    def every_line_has_one_owner_and_no_duplicates(self) -> None:
        for name, line in self.names.snapshot().items():
            assert line, f"{name} is listed with nobody in line"
            assert len(set(line)) == len(line)
            assert self.names.owner(name) == line[0]
            assert self.names.queue(name) == line[1:]

    @invariant()
    def replaying_the_events_gives_every_owner(self) -> None:
        owned = {name: line[0] for name, line in self.names.snapshot().items()}
        assert self.replayed == owned

    @invariant()
    def introspection_agrees_with_the_lines(self) -> None:
        snapshot = self.names.snapshot()
        for endpoint in range(1, 5):
            expected = sorted(name for name, line in snapshot.items() if line[0] == endpoint)
            assert self.names.names_of(endpoint) == expected
        statistics = self.names.statistics()
        assert statistics.names == len(self.names) == len(snapshot)
        assert statistics.queued == sum(len(line) - 1 for line in snapshot.values())


NamesMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_names_machine = NamesMachine.TestCase
