"""`NameRegistry` driven directly: dbus-daemon's RequestName and ReleaseName, case by case.

The cases are those of the module's docstring (bus/_names.py), numbered the same way; the hub
and the in-memory bus only add I/O around this bookkeeping.
"""

from __future__ import annotations

import dataclasses

import pytest

from multikernel.bus._names import NameRegistry, NamesStatistics, validate_name
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


def changed(old: int, new: int, name: str = "svc") -> NameOwnerChanged:
    return NameOwnerChanged(name=name, old_owner=old, new_owner=new)


def registry(*line: tuple[int, int]) -> NameRegistry:
    """A registry where endpoints asked for "svc" in this order, with these flags."""
    names = NameRegistry()
    for endpoint, flags in line:
        names.request("svc", endpoint, flags)
    return names


# -- 1. nobody owns the name --------------------------------------------------------------------


def test_the_first_to_ask_owns_the_name() -> None:
    names = NameRegistry()
    assert names.request("svc", 1) == (RequestNameResult.PRIMARY_OWNER, [changed(0, 1)])
    assert names.owner("svc") == 1
    # Asked with no flags: it does not allow replacement, and a second asker queues.
    assert names.request("svc", 2, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert names.release("svc", 2) == (ReleaseNameResult.RELEASED, [])
    assert names.names_of(1) == ["svc"]
    assert "svc" in names
    assert len(names) == 1


# -- 2. the owner asks again --------------------------------------------------------------------


def test_the_owner_asking_again_is_already_owner_and_takes_the_new_flags() -> None:
    names = registry((1, ALLOW))
    assert names.request("svc", 1, 0) == (RequestNameResult.ALREADY_OWNER, [])
    # Its new flags count: without ALLOW_REPLACEMENT, a REPLACE_EXISTING request only queues.
    assert names.request("svc", 2, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert names.owner("svc") == 1


# -- 3. DO_NOT_QUEUE without a way to take over -------------------------------------------------


def test_do_not_queue_is_exists_and_queues_nothing() -> None:
    names = registry((1, 0))
    assert names.request("svc", 2, NO_QUEUE) == (RequestNameResult.EXISTS, [])
    assert names.queue("svc") == []
    assert names.names_of(2) == []
    assert names.remove_owner(2) == []  # it is in no line


def test_do_not_queue_takes_a_waiter_out_of_the_queue() -> None:
    names = registry((1, 0), (2, 0), (3, 0))
    assert names.request("svc", 2, NO_QUEUE) == (RequestNameResult.EXISTS, [])
    assert names.queue("svc") == [3]
    assert names.release("svc", 2) == (ReleaseNameResult.NOT_OWNER, [])


def test_do_not_queue_with_replace_existing_still_needs_the_owners_leave() -> None:
    names = registry((1, 0))
    assert names.request("svc", 2, NO_QUEUE | REPLACE) == (RequestNameResult.EXISTS, [])
    assert names.owner("svc") == 1


def test_do_not_queue_with_replace_existing_takes_a_name_that_allows_it() -> None:
    names = registry((1, ALLOW))
    result = names.request("svc", 2, NO_QUEUE | REPLACE)
    assert result == (RequestNameResult.PRIMARY_OWNER, [changed(1, 2)])
    assert names.queue("svc") == [1]  # the old owner did not ask not to be queued


# -- 4. waiting in the queue ----------------------------------------------------------------------


def test_newcomers_wait_in_the_order_they_asked() -> None:
    names = registry((1, 0), (2, 0), (3, 0))
    assert names.request("svc", 4) == (RequestNameResult.IN_QUEUE, [])
    assert names.queue("svc") == [2, 3, 4]
    assert names.snapshot() == {"svc": [1, 2, 3, 4]}


def test_a_waiter_asking_again_keeps_its_place() -> None:
    names = registry((1, 0), (2, 0), (3, 0), (4, 0))
    assert names.request("svc", 3, ALLOW) == (RequestNameResult.IN_QUEUE, [])
    assert names.queue("svc") == [2, 3, 4]


def test_replace_existing_that_cannot_take_over_goes_to_the_head_of_the_queue() -> None:
    names = registry((1, 0), (2, 0))
    assert names.request("svc", 3, REPLACE) == (RequestNameResult.IN_QUEUE, [])
    assert names.queue("svc") == [3, 2]
    assert names.request("svc", 2, REPLACE) == (RequestNameResult.IN_QUEUE, [])  # a waiter too
    assert names.queue("svc") == [2, 3]


def test_a_waiters_new_flags_are_the_ones_it_is_promoted_with() -> None:
    names = registry((1, 0), (2, 0))
    names.request("svc", 2, ALLOW)  # asked again while waiting
    names.release("svc", 1)
    assert names.request("svc", 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(2, 3)])


# -- 5. taking the name over -------------------------------------------------------------------


def test_replacement_takes_the_name_and_the_old_owner_waits_first() -> None:
    names = registry((1, ALLOW), (2, 0))
    assert names.request("svc", 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert names.snapshot() == {"svc": [3, 1, 2]}
    assert names.names_of(1) == []  # it waits: it holds nothing
    assert names.names_of(3) == ["svc"]


def test_a_waiter_that_takes_over_leaves_its_place_in_the_queue() -> None:
    names = registry((1, ALLOW), (2, 0), (3, 0))
    assert names.request("svc", 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert names.snapshot() == {"svc": [3, 1, 2]}


def test_an_owner_that_asked_not_to_queue_loses_the_name_to_a_replacement() -> None:
    names = registry((1, ALLOW | NO_QUEUE), (2, 0))
    assert names.request("svc", 3, REPLACE) == (RequestNameResult.PRIMARY_OWNER, [changed(1, 3)])
    assert names.snapshot() == {"svc": [3, 2]}
    assert names.release("svc", 1) == (ReleaseNameResult.NOT_OWNER, [])
    assert names.remove_owner(1) == []


def test_replace_existing_without_the_owners_leave_does_not_take_over() -> None:
    names = registry((1, 0))
    assert names.request("svc", 2, REPLACE | ALLOW) == (RequestNameResult.IN_QUEUE, [])
    assert names.owner("svc") == 1


def test_unknown_flag_bits_are_ignored() -> None:
    names = registry((1, ALLOW))
    assert names.request("svc", 2, REPLACE | 0x100) == (
        RequestNameResult.PRIMARY_OWNER,
        [changed(1, 2)],
    )
    names = registry((1, 0x100))  # not ALLOW_REPLACEMENT, whatever else it says
    assert names.request("svc", 2, REPLACE)[0] == RequestNameResult.IN_QUEUE


# -- releasing and going away --------------------------------------------------------------------


def test_release_by_the_owner_promotes_the_next_in_line() -> None:
    names = registry((1, 0), (2, 0), (3, 0))
    assert names.release("svc", 1) == (ReleaseNameResult.RELEASED, [changed(1, 2)])
    assert names.snapshot() == {"svc": [2, 3]}


def test_release_by_the_last_owner_frees_the_name() -> None:
    names = registry((1, 0))
    assert names.release("svc", 1) == (ReleaseNameResult.RELEASED, [changed(1, 0)])
    assert names.owner("svc") is None
    assert "svc" not in names
    assert len(names) == 0
    assert names.request("svc", 2) == (RequestNameResult.PRIMARY_OWNER, [changed(0, 2)])


def test_release_by_a_waiter_leaves_the_owner_alone() -> None:
    names = registry((1, 0), (2, 0), (3, 0))
    assert names.release("svc", 2) == (ReleaseNameResult.RELEASED, [])
    assert names.snapshot() == {"svc": [1, 3]}


def test_release_of_a_name_nobody_owns_or_by_a_stranger() -> None:
    names = registry((1, 0))
    assert names.release("other", 1) == (ReleaseNameResult.NON_EXISTENT, [])
    assert names.release("svc", 2) == (ReleaseNameResult.NOT_OWNER, [])


def test_an_endpoint_that_goes_away_leaves_every_line_in_name_order() -> None:
    names = NameRegistry()
    for name in ("b.svc", "a.svc", "c.svc"):
        names.request(name, 1)
    names.request("a.svc", 2)
    names.request("c.svc", 3)
    names.request("b.svc", 3)
    names.request("b.svc", 1)  # already owner
    names.request("d.svc", 2)
    names.request("d.svc", 1)  # waits
    assert names.remove_owner(1) == [
        changed(1, 2, "a.svc"),
        changed(1, 3, "b.svc"),
        changed(1, 3, "c.svc"),
    ]  # and it left d.svc's queue, saying nothing
    assert names.snapshot() == {"a.svc": [2], "b.svc": [3], "c.svc": [3], "d.svc": [2]}
    assert names.remove_owner(1) == []
    assert names.names_of(3) == ["b.svc", "c.svc"]


def test_names_of_lists_only_names_held_sorted() -> None:
    names = NameRegistry()
    names.request("z.svc", 1)
    names.request("a.svc", 1)
    names.request("m.svc", 2)
    names.request("m.svc", 1)
    assert names.names_of(1) == ["a.svc", "z.svc"]
    assert names.names_of(9) == []
    assert names.queue("nothing") == []
    assert names.owner("nothing") is None


def test_names_of_leaves_out_names_it_waits_for_whoever_owns_them() -> None:
    names = registry((1, 0), (2, 0))  # 2 waits behind an owner with a smaller id
    assert names.names_of(2) == []
    assert names.names_of(1) == ["svc"]


def test_endpoint_ids_as_large_as_the_hubs_are_compared_by_value() -> None:
    """The hub's ids start at the clock (sixteen digits): no small-int identity to lean on."""
    first, second = (int(f"179602621643309{n}") for n in (8, 9))
    names = NameRegistry()
    names.request("svc", first)
    assert names.request("svc", int(str(first))) == (RequestNameResult.ALREADY_OWNER, [])
    names.request("svc", second)
    assert names.names_of(int(str(first))) == ["svc"]
    assert names.release("svc", int(str(second))) == (ReleaseNameResult.RELEASED, [])
    assert names.release("svc", int(str(first))) == (
        ReleaseNameResult.RELEASED,
        [changed(first, 0)],
    )


# -- statistics ----------------------------------------------------------------------------------


def test_statistics_count_names_waiters_and_handoffs() -> None:
    names = NameRegistry()
    assert names.statistics() == NamesStatistics(names=0, queued=0, handoffs=0)
    names.request("a.svc", 1, ALLOW)  # taken up from nobody: not a hand-off
    names.request("a.svc", 2)
    names.request("a.svc", 3, REPLACE)  # 1 -> 3
    names.request("b.svc", 4)
    assert names.statistics() == NamesStatistics(names=2, queued=2, handoffs=1)
    names.release("a.svc", 3)  # 3 -> 1
    names.release("b.svc", 4)  # dropped to nobody: not a hand-off
    names.remove_owner(1)  # 1 -> 2
    assert names.statistics() == NamesStatistics(names=1, queued=0, handoffs=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        names.statistics().names = 0  # type: ignore[misc]


# -- what may be asked for -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [":1.42", "mk.*", "mk.>", "", "a..b", "a b"])
def test_names_that_cannot_be_requested_or_released(name: str) -> None:
    names = NameRegistry()
    with pytest.raises(InvalidSubjectError):
        names.request(name, 1)
    with pytest.raises(InvalidSubjectError):
        names.release(name, 1)
    assert len(names) == 0


def test_a_unique_name_is_refused_with_what_to_ask_for_instead() -> None:
    with pytest.raises(InvalidSubjectError, match=r"unique endpoint name.*'mk\.svc\.store'"):
        validate_name(":1.42")
    assert validate_name("mk.svc.store") == "mk.svc.store"


@pytest.mark.parametrize("endpoint", [0, -1])
def test_endpoint_ids_are_positive(endpoint: int) -> None:
    with pytest.raises(ValueError, match="endpoint ids are positive"):
        NameRegistry().request("svc", endpoint)
