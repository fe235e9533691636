"""`NameRegistry.move`, one move of an atomic switch: the bookkeeping alone, without a hub."""

from __future__ import annotations

from multikernel.bus._names import NameRegistry
from multikernel.protocol import NameFlag, NameOwnerChanged


def test_a_queued_successor_takes_the_name_and_the_old_owner_waits_at_the_head() -> None:
    names = NameRegistry()
    names.request("svc", 1)
    names.request("svc", 2)
    names.request("svc", 3)
    assert names.move("svc", 3) == [NameOwnerChanged("svc", 1, 3)]
    assert names.snapshot() == {"svc": [3, 1, 2]}
    assert names.names_of(3) == ["svc"]
    assert names.names_of(1) == []
    assert names.remove_owner(3) == [NameOwnerChanged("svc", 3, 1)]  # the name falls back


def test_an_owner_that_would_not_queue_loses_the_name_on_a_move() -> None:
    names = NameRegistry()
    names.request("svc", 1, NameFlag.DO_NOT_QUEUE)
    assert names.move("svc", 2) == [NameOwnerChanged("svc", 1, 2)]
    assert names.snapshot() == {"svc": [2]}
    assert names.remove_owner(1) == []


def test_moving_to_the_owner_changes_nothing_and_an_unowned_name_is_taken() -> None:
    names = NameRegistry()
    names.request("svc", 1)
    assert names.move("svc", 1) == []
    assert names.move("other", 2) == [NameOwnerChanged("other", 0, 2)]
    assert names.snapshot() == {"other": [2], "svc": [1]}
