"""Well-known names: who owns each one, who waits for it, and the events that say so.

An endpoint asks the hub for a well-known name (``mk.svc.store``) with D-Bus's ``RequestName``
flags and gets D-Bus's answers. ``NameRegistry`` is that bookkeeping and nothing else (no I/O,
no clock), so the hub calls it from its control loop and tests drive it directly.

Each name has a *line*: the primary owner first, then the endpoints waiting for it in order, each
remembering the flags it last asked with. A request by endpoint ``E`` with flags ``F`` follows
dbus-daemon's ``bus_registry_acquire_service`` case by case:

1. nobody owns the name: ``E`` owns it (PRIMARY_OWNER);
2. ``E`` owns it: its flags are replaced by ``F`` (ALREADY_OWNER);
3. ``F`` has DO_NOT_QUEUE and ``E`` cannot take the name over (``F`` lacks REPLACE_EXISTING, or
   the owner did not ALLOW_REPLACEMENT): nothing is queued, and ``E`` leaves the queue if it was
   waiting (EXISTS);
4. ``E`` cannot take the name over: ``E`` waits (IN_QUEUE); a newcomer joins the tail, or the
   head with REPLACE_EXISTING; a waiter keeps its place, or moves to the head with
   REPLACE_EXISTING; either way its flags become ``F``;
5. otherwise ``E`` takes the name over (PRIMARY_OWNER) and the old owner goes to the head of the
   queue, unless it holds the name with DO_NOT_QUEUE, in which case it loses it.

Releasing a name (or the endpoint going away, ``remove_owner``) takes the endpoint out of the
line, and if it owned the name the next waiter is promoted. Every change of primary owner is
returned as one ``NameOwnerChanged(name, old, new)`` (0 for nobody), in the order it happened,
so the hub can publish them and move direct channels to the new owner in that same order.
"""

from __future__ import annotations

from dataclasses import dataclass

from multikernel.protocol import (
    InvalidSubjectError,
    NameFlag,
    NameOwnerChanged,
    ReleaseNameResult,
    RequestNameResult,
    validate_subject,
)

_KNOWN_FLAGS = NameFlag.ALLOW_REPLACEMENT | NameFlag.REPLACE_EXISTING | NameFlag.DO_NOT_QUEUE


@dataclass(frozen=True, slots=True)
class NamesStatistics:
    """A moment's view of a ``NameRegistry``.

    ``names`` is how many names have an owner, ``queued`` how many (name, waiter) entries wait
    behind owners, and ``handoffs`` how many times so far a name passed directly from one
    endpoint to another (by replacement, release or removal), as opposed to being taken up
    from nobody or dropped to nobody.
    """

    names: int
    queued: int
    handoffs: int


@dataclass(slots=True)
class _Entry:
    endpoint: int
    flags: NameFlag


def validate_name(name: str) -> str:
    """Return ``name`` if it may be requested as a well-known name, else raise.

    Well-known names are concrete subjects (no wildcards); names beginning with ``:`` are the
    hub's unique endpoint names, which nobody requests or releases.
    """
    if name.startswith(":"):
        raise InvalidSubjectError(
            f"{name!r} is a unique endpoint name (it begins with ':'); request a well-known name "
            "such as 'mk.svc.store' instead"
        )
    return validate_subject(name)


class NameRegistry:
    """The owners and queues of every well-known name on one hub (see the module docstring)."""

    def __init__(self) -> None:
        self._lines: dict[str, list[_Entry]] = {}  # name -> [owner, *waiters]; never empty
        self._joined: dict[int, set[str]] = {}  # endpoint -> names whose line it is in
        self._handoffs = 0

    def request(
        self, name: str, owner: int, flags: int = 0
    ) -> tuple[RequestNameResult, list[NameOwnerChanged]]:
        """Ask for ``name`` on behalf of endpoint ``owner``; unknown flag bits are ignored."""
        validate_name(name)
        _check_endpoint(owner)
        wanted = NameFlag(flags) & _KNOWN_FLAGS
        line = self._lines.get(name)
        if line is None:
            self._lines[name] = [_Entry(owner, wanted)]
            self._joined.setdefault(owner, set()).add(name)
            return RequestNameResult.PRIMARY_OWNER, [self._changed(name, 0, owner)]
        primary = line[0]
        if primary.endpoint == owner:
            primary.flags = wanted
            return RequestNameResult.ALREADY_OWNER, []
        takes_over = (
            NameFlag.REPLACE_EXISTING in wanted and NameFlag.ALLOW_REPLACEMENT in primary.flags
        )
        waiting = _find(line, owner)
        if not takes_over and NameFlag.DO_NOT_QUEUE in wanted:
            if waiting is not None:
                del line[waiting]
                self._leave(owner, name)
            return RequestNameResult.EXISTS, []
        if waiting is None:
            entry = _Entry(owner, wanted)
            self._joined.setdefault(owner, set()).add(name)
        else:
            entry = line.pop(waiting)
            entry.flags = wanted
        if NameFlag.REPLACE_EXISTING in wanted:
            line.insert(1, entry)  # the head of the queue, even when it cannot take over
        else:
            line.insert(len(line) if waiting is None else waiting, entry)
        if not takes_over:
            return RequestNameResult.IN_QUEUE, []
        del line[0]  # ``entry`` was at the head of the queue, right behind the old owner
        if NameFlag.DO_NOT_QUEUE in primary.flags:
            self._leave(primary.endpoint, name)
        else:
            line.insert(1, primary)
        return RequestNameResult.PRIMARY_OWNER, [self._changed(name, primary.endpoint, owner)]

    def release(self, name: str, owner: int) -> tuple[ReleaseNameResult, list[NameOwnerChanged]]:
        """Give up ``name``, whether ``owner`` holds it or waits for it."""
        validate_name(name)
        line = self._lines.get(name)
        if line is None:
            return ReleaseNameResult.NON_EXISTENT, []
        position = _find(line, owner)
        if position is None:
            return ReleaseNameResult.NOT_OWNER, []
        return ReleaseNameResult.RELEASED, self._drop(name, line, position)

    def remove_owner(self, owner: int) -> list[NameOwnerChanged]:
        """Forget an endpoint that went away: it leaves every line, owners are promoted.

        The events come in name order (sorted), one per name ``owner`` held.
        """
        events: list[NameOwnerChanged] = []
        for name in sorted(self._joined.get(owner, ())):
            line = self._lines[name]
            position = _find(line, owner)
            assert position is not None
            events += self._drop(name, line, position)
        return events

    def move(self, name: str, new_owner: int) -> list[NameOwnerChanged]:
        """Give ``name`` to ``new_owner`` (one move of an atomic switch during an upgrade).

        ``new_owner`` leaves the queue if it waited there, keeping the flags it asked with; the
        old owner goes to the head of the queue (so the name falls back to it if the new owner
        goes away), unless it holds the name with DO_NOT_QUEUE, like a REPLACE_EXISTING
        take-over. Who may move what is the hub's to check.
        """
        validate_name(name)
        _check_endpoint(new_owner)
        line = self._lines.get(name)
        if line is None:
            self._lines[name] = [_Entry(new_owner, NameFlag(0))]
            self._joined.setdefault(new_owner, set()).add(name)
            return [self._changed(name, 0, new_owner)]
        primary = line[0]
        if primary.endpoint == new_owner:
            return []
        waiting = _find(line, new_owner)
        if waiting is None:
            entry = _Entry(new_owner, NameFlag(0))
            self._joined.setdefault(new_owner, set()).add(name)
        else:
            entry = line.pop(waiting)
        del line[0]
        if NameFlag.DO_NOT_QUEUE in primary.flags:
            self._leave(primary.endpoint, name)
        else:
            line.insert(0, primary)
        line.insert(0, entry)
        return [self._changed(name, primary.endpoint, new_owner)]

    def owner(self, name: str) -> int | None:
        """The primary owner of ``name``, or None if nobody owns it."""
        line = self._lines.get(name)
        return None if line is None else line[0].endpoint

    def queue(self, name: str) -> list[int]:
        """The endpoints waiting for ``name``, next owner first (the owner is not included)."""
        return [entry.endpoint for entry in self._lines.get(name, [])[1:]]

    def names_of(self, owner: int) -> list[str]:
        """The names ``owner`` holds as primary owner, sorted (names it waits for are not)."""
        joined = self._joined.get(owner, ())
        return sorted(name for name in joined if self._lines[name][0].endpoint == owner)

    def snapshot(self) -> dict[str, list[int]]:
        """Every owned name, sorted, mapped to its line: ``[owner, *waiters]``."""
        return {name: [e.endpoint for e in self._lines[name]] for name in sorted(self._lines)}

    def statistics(self) -> NamesStatistics:
        """Counts for the inspector (see ``NamesStatistics``)."""
        queued = sum(len(line) - 1 for line in self._lines.values())
        return NamesStatistics(names=len(self._lines), queued=queued, handoffs=self._handoffs)

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, name: object) -> bool:
        return name in self._lines

    def _drop(self, name: str, line: list[_Entry], position: int) -> list[NameOwnerChanged]:
        """Take the entry at ``position`` out of ``name``'s line; report a change of owner."""
        departed = line.pop(position).endpoint
        self._leave(departed, name)
        if position > 0:
            return []
        if not line:
            del self._lines[name]
            return [self._changed(name, departed, 0)]
        return [self._changed(name, departed, line[0].endpoint)]

    def _leave(self, endpoint: int, name: str) -> None:
        joined = self._joined[endpoint]
        joined.discard(name)
        if not joined:
            del self._joined[endpoint]

    def _changed(self, name: str, old: int, new: int) -> NameOwnerChanged:
        if old and new:
            self._handoffs += 1
        return NameOwnerChanged(name=name, old_owner=old, new_owner=new)


def _find(line: list[_Entry], endpoint: int) -> int | None:
    for position, entry in enumerate(line):
        if entry.endpoint == endpoint:
            return position
    return None


def _check_endpoint(owner: int) -> None:
    if owner <= 0:
        raise ValueError(f"endpoint ids are positive (0 means 'no owner'), got {owner}")
