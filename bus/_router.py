"""Subject routing for the hub: which subscriptions receive a message published on a subject.

The hub keeps one ``SubjectRouter``. A subscription has a key (the hub uses ``(session_id,
sid)``), a pattern in the subject grammar of ``multikernel.protocol`` (``*`` is exactly one token,
``>`` one or more trailing tokens) and optionally a queue group. ``match(subject)`` returns every
plain subscription whose pattern matches, plus exactly one member of each queue group that has a
matching member. As in NATS a group is named by its queue-group name alone, so its members may
subscribe with different patterns; a member is eligible for a message when its own pattern matches.

**Literal patterns are a dict.** Most subscriptions name one subject (per endpoint, instance,
service method); they are kept in one dict from the subject to its holder, so while there are no
wildcard subscriptions ``match`` is one dict lookup, whatever the number of distinct subjects
routed: no cache, nothing that slows down past a size (1M distinct subjects route as fast as 10).
A subject that matches nothing is validated on each call (one regular expression).

**Wildcard patterns are a trie.** Patterns with ``*`` or ``>`` are stored token by token: a node
has literal children, at most one ``*`` child and one ``>`` child, and holds the subscriptions
whose pattern ends there. A subject is walked level by level, following at each live node the
literal child for the token and the ``*`` child, and collecting the ``>`` child while tokens
remain: O(tokens x live branches), over the wildcard patterns only.

**The cache**, used only while wildcard subscriptions exist: each walk's result (with the
subject's literal holder merged in) is cached per subject, the plain keys and per group its
matching members in subscription order. It is bounded (``cache_size`` entries, oldest out first)
and always exact: subscribing or unsubscribing a literal pattern can only change the entry for
that very subject, which is dropped; a wildcard pattern may change any entry, so the cache is
cleared. Wildcard subscriptions are few and long-lived; finding the entries one affects would
cost a match per cached subject on every subscribe.

**Memory is returned.** Nodes and holders use ``__slots__``; a holder keeps one key as itself, a
few in a list, many in a dict; empty containers are ``None``; unsubscribing prunes the branch it
leaves empty, and the large dicts (subscriptions, literal subjects) are rebuilt once they have
shrunk to a quarter of their peak, since a Python dict never gives back its table. A plain literal
subscription costs about 200 bytes here (tests/bus/test_bus_router.py measures it).

**Queue groups rotate on every call**, hit or miss. A cache entry, and a literal holder, keeps a
cursor per group and hands out the group's matching members in turn, so each subject's messages
spread evenly and deterministically over the members that match it. A new cursor starts at the
group's running count of picks, so subjects that are each seen once still rotate across the
group. ``match_filtered`` applies a predicate first (the hub's access policy): plain keys it
rejects are dropped, and a rejected member passes its turn to the next one in rotation, so the
group still delivers once whenever an allowed member matches.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, TypeVar, cast

from multikernel.bus._compact import compacted
from multikernel.protocol import InvalidSubjectError, validate_pattern, validate_subject

K = TypeVar("K", bound=Hashable)

DEFAULT_CACHE_SIZE: Final = 4096
#: A holder keeps up to this many plain keys in a list (removal O(n)), more in a dict.
LIST_MAX: Final = 16


@dataclass(frozen=True)
class RouterStatistics:
    """A snapshot of a router's size and cache behaviour, for the inspector."""

    subscriptions: int
    queue_groups: int  #: groups with at least one member
    trie_nodes: int  #: nodes of the wildcard trie below the root
    cache_entries: int
    cache_hits: int
    cache_misses: int
    literal_subjects: int = 0  #: subjects with at least one literal subscription


class Subscription(NamedTuple, Generic[K]):
    """One subscription as ``SubjectRouter.subscriptions()`` lists it."""

    key: K
    pattern: str
    queue_group: str | None


# A holder's plain keys: None, one key as itself, a list of a few, or a dict of many (keys are
# hashable, so never a list or a dict themselves). Always in subscription order.
_Plain = Any


def _plain_add(held: _Plain, key: object) -> _Plain:
    if held is None:
        return key
    kind = type(held)
    if kind is list:
        if len(held) < LIST_MAX:
            held.append(key)
            return held
        grown = dict.fromkeys(held)
        grown[key] = None
        return grown
    if kind is dict:
        held[key] = None
        return held
    return [held, key]


def _plain_remove(held: _Plain, key: object) -> _Plain:
    kind = type(held)
    if kind is list:
        held.remove(key)
        return held if len(held) > 1 else held[0]
    if kind is dict:
        del held[key]
        if len(held) > LIST_MAX // 2:
            return held
        left = list(held)
        return left if len(left) > 1 else left[0]
    return None  # it was the one key


def _plain_list(held: _Plain) -> list[Any]:
    if held is None:
        return []
    kind = type(held)
    if kind is list or kind is dict:
        return list(held)
    return [held]


class _Holder(Generic[K]):
    """The subscriptions of one literal subject, or ending at one trie node."""

    __slots__ = ("cursors", "groups", "plain")

    def __init__(self) -> None:
        self.plain: _Plain = None
        self.groups: dict[str, list[K]] | None = None  # members in subscription order
        self.cursors: dict[str, int] | None = None  # per group: the next turn (literal holders)

    def is_empty(self) -> bool:
        return self.plain is None and self.groups is None


class _Node(_Holder[K]):
    __slots__ = ("children", "full", "star")

    def __init__(self) -> None:
        super().__init__()
        self.children: dict[str, _Node[K]] | None = None
        self.star: _Node[K] | None = None
        self.full: _Node[K] | None = None  # the '>' child

    def is_empty(self) -> bool:
        return (
            self.plain is None
            and self.groups is None
            and self.children is None
            and self.star is None
            and self.full is None
        )


class _Entry(Generic[K]):
    """A cached match: plain keys, and per group its members in subscription order."""

    __slots__ = ("cursors", "groups", "plain")

    def __init__(
        self,
        plain: tuple[K, ...],
        groups: tuple[tuple[str, tuple[K, ...]], ...],
        cursors: list[int],
    ) -> None:
        self.plain = plain
        self.groups = groups
        self.cursors = cursors


class _Grouped(NamedTuple):
    """A queue-group member's record; a plain subscription's record is its pattern alone."""

    pattern: str
    queue_group: str
    order: int


def _validate_group(name: str) -> str:
    if "." not in name:
        with contextlib.suppress(InvalidSubjectError):
            return validate_subject(name)
    raise InvalidSubjectError(
        f"queue group {name!r} is not a single token; use one token of A-Z a-z 0-9 _ -"
    )


def _is_wildcard(pattern: str) -> bool:
    return "*" in pattern or ">" in pattern  # a valid pattern has them only as whole tokens


class SubjectRouter(Generic[K]):
    """Subscriptions by subject pattern and queue group; ``match`` says who gets a subject."""

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 (no cache) or more, not {cache_size}")
        self._cache_size = cache_size
        self._root: _Node[K] = _Node()
        self._nodes = 0
        self._wildcards = 0  # wildcard subscriptions: while none, a match is one dict lookup
        self._literals: dict[str, _Holder[K]] = {}
        self._subs: dict[K, str | _Grouped] = {}
        self._subs_peak = self._literals_peak = 0  # their largest sizes since last rebuilt
        self._order = itertools.count()
        self._group_sizes: dict[str, int] = {}
        self._turns: dict[str, int] = {}  # picks per group, to seed new cursors
        self._cache: OrderedDict[str, _Entry[K]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    def subscribe(self, key: K, pattern: str, queue_group: str | None = None) -> None:
        """Add a subscription; raise ValueError if ``key`` is taken, InvalidSubjectError if
        the pattern or the queue group name breaks the grammar."""
        if key in self._subs:
            raise ValueError(f"subscription key {key!r} is already in use; unsubscribe it first")
        validate_pattern(pattern)
        if queue_group is not None:
            _validate_group(queue_group)
        wild = _is_wildcard(pattern)
        holder: _Holder[K]
        if wild:
            node = self._root
            for token in pattern.split("."):
                node = self._descend(node, token)
            holder = node
            self._wildcards += 1
        else:
            found = self._literals.get(pattern)
            if found is None:
                found = self._literals[pattern] = _Holder()
                self._literals_peak = max(self._literals_peak, len(self._literals))
            holder = found
        if queue_group is None:
            holder.plain = _plain_add(holder.plain, key)
            self._subs[key] = pattern
        else:
            if queue_group not in self._group_sizes:
                self._group_sizes[queue_group] = 0
                self._turns[queue_group] = 0
            self._group_sizes[queue_group] += 1
            if holder.groups is None:
                holder.groups = {}
            members = holder.groups.get(queue_group)
            if members is None:
                members = holder.groups[queue_group] = []
                if not wild:
                    if holder.cursors is None:
                        holder.cursors = {}
                    holder.cursors[queue_group] = self._turns[queue_group]
            members.append(key)
            self._subs[key] = _Grouped(pattern, queue_group, next(self._order))
        self._subs_peak = max(self._subs_peak, len(self._subs))
        self._invalidate(pattern, wild)

    def unsubscribe(self, key: K) -> bool:
        """Remove a subscription; False if ``key`` was not subscribed."""
        record = self._subs.pop(key, None)
        if record is None:
            return False
        if isinstance(record, str):
            pattern, group = record, None
        else:
            pattern, group = record.pattern, record.queue_group
        wild = _is_wildcard(pattern)
        tokens = pattern.split(".") if wild else []
        path: list[_Node[K]] = [self._root]
        holder: _Holder[K]
        if wild:
            for token in tokens:
                path.append(self._descend(path[-1], token))  # every node exists: none is made
            holder = path[-1]
        else:
            holder = self._literals[pattern]
        if group is None:
            holder.plain = _plain_remove(holder.plain, key)
        else:
            assert holder.groups is not None
            members = holder.groups[group]
            members.remove(key)
            if not members:
                del holder.groups[group]
                if holder.cursors is not None:
                    del holder.cursors[group]
                if not holder.groups:
                    holder.groups = holder.cursors = None
            self._group_sizes[group] -= 1
            if not self._group_sizes[group]:
                del self._group_sizes[group], self._turns[group]
        if wild:
            self._wildcards -= 1
            self._prune(path, tokens)
        elif holder.is_empty():
            del self._literals[pattern]
            self._literals, self._literals_peak = compacted(self._literals, self._literals_peak)
        self._subs, self._subs_peak = compacted(self._subs, self._subs_peak)
        self._invalidate(pattern, wild)
        return True

    def match(self, subject: str) -> list[K]:
        """The keys that receive ``subject``: every matching plain subscription and one member
        of each queue group with a matching member. Raise InvalidSubjectError for a subject
        that breaks the grammar."""
        if not self._wildcards:
            holder = self._literals.get(subject)
            if holder is None:
                validate_subject(subject)
                return []
            found = _plain_list(holder.plain)
            if holder.groups is not None:
                cursors, turns = cast(dict[str, int], holder.cursors), self._turns
                for group, members in holder.groups.items():
                    turn = cursors[group]
                    cursors[group] = turn + 1
                    turns[group] += 1
                    found.append(members[turn % len(members)])
            return found
        entry = self._entry(subject)
        found = list(entry.plain)
        if entry.groups:
            turns = self._turns
            for index, (group, keys) in enumerate(entry.groups):
                turn = entry.cursors[index]
                entry.cursors[index] = turn + 1
                turns[group] += 1
                found.append(keys[turn % len(keys)])
        return found

    def match_filtered(self, subject: str, allow: Callable[[K], bool]) -> list[K]:
        """Like ``match``, keeping only keys ``allow`` accepts; a group whose member in turn is
        rejected gives the turn to its next allowed member. ``allow`` is called once per
        matching plain key and, per group, until an allowed member is found."""
        if not self._wildcards:
            holder = self._literals.get(subject)
            if holder is None:
                validate_subject(subject)
                return []
            found = [key for key in _plain_list(holder.plain) if allow(key)]
            if holder.groups is not None:
                cursors = cast(dict[str, int], holder.cursors)
                for group, members in holder.groups.items():
                    turn = self._pick(found, group, members, cursors[group], allow)
                    cursors[group] = turn
            return found
        entry = self._entry(subject)
        found = [key for key in entry.plain if allow(key)]
        for index, (group, keys) in enumerate(entry.groups):
            entry.cursors[index] = self._pick(found, group, keys, entry.cursors[index], allow)
        return found

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, key: object) -> bool:
        return key in self._subs

    def keys(self) -> Iterator[K]:
        """The subscription keys, in subscription order."""
        return iter(self._subs)

    def subscriptions(self) -> Iterator[Subscription[K]]:
        """Every subscription as (key, pattern, queue_group), in subscription order."""
        for key, record in self._subs.items():
            if isinstance(record, str):
                yield Subscription(key, record, None)
            else:
                yield Subscription(key, record.pattern, record.queue_group)

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            subscriptions=len(self._subs),
            queue_groups=len(self._group_sizes),
            trie_nodes=self._nodes,
            cache_entries=len(self._cache),
            cache_hits=self._hits,
            cache_misses=self._misses,
            literal_subjects=len(self._literals),
        )

    def _pick(
        self,
        found: list[K],
        group: str,
        members: tuple[K, ...] | list[K],
        turn: int,
        allow: Callable[[K], bool],
    ) -> int:
        """Append the group's first allowed member from ``turn`` on; the next turn."""
        count = len(members)
        for step in range(count):
            member = members[(turn + step) % count]
            if allow(member):
                found.append(member)
                self._turns[group] += 1
                return turn + step + 1
        return turn

    def _descend(self, node: _Node[K], token: str) -> _Node[K]:
        """The child of ``node`` for a pattern token, created if missing."""
        if token == "*":
            child = node.star
            if child is None:
                child = node.star = _Node()
                self._nodes += 1
        elif token == ">":
            child = node.full
            if child is None:
                child = node.full = _Node()
                self._nodes += 1
        else:
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                self._nodes += 1
        return child

    def _prune(self, path: list[_Node[K]], tokens: list[str]) -> None:
        """Remove the branch an unsubscription left empty, deepest node first."""
        for depth in range(len(tokens), 0, -1):
            if not path[depth].is_empty():
                break
            parent, token = path[depth - 1], tokens[depth - 1]
            if token == "*":
                parent.star = None
            elif token == ">":
                parent.full = None
            else:
                assert parent.children is not None
                del parent.children[token]
                if not parent.children:
                    parent.children = None
            self._nodes -= 1

    def _entry(self, subject: str) -> _Entry[K]:
        entry = self._cache.get(subject)
        if entry is None:
            return self._walk(subject)
        self._hits += 1
        return entry

    def _walk(self, subject: str) -> _Entry[K]:
        """Match ``subject`` in the trie and its literal holder (a cache miss); cache it."""
        self._misses += 1
        level = [self._root]
        reached: list[_Holder[K]] = []  # holders whose subscriptions match
        literal = self._literals.get(subject)
        if literal is not None:
            reached.append(literal)
        for token in validate_subject(subject).split("."):
            following = []
            for node in level:
                if node.full is not None:
                    reached.append(node.full)  # '>' takes this token and any after it
                if node.children is not None:
                    child = node.children.get(token)
                    if child is not None:
                        following.append(child)
                if node.star is not None:
                    following.append(node.star)
            level = following
            if not level:
                break
        reached += level
        plain: list[K] = []
        members: dict[str, list[K]] = {}
        merged: list[str] = []  # groups with members at several holders: put back in order
        for holder in reached:
            if holder.plain is not None:
                plain += _plain_list(holder.plain)
            if holder.groups is not None:
                for group, keys in holder.groups.items():
                    if group in members:
                        members[group] += keys
                        merged.append(group)
                    else:
                        members[group] = list(keys)  # a holder's keys are in subscription order
        if members:
            subs = self._subs
            for group in merged:
                members[group].sort(key=lambda k: cast(_Grouped, subs[k]).order)
            groups = tuple((group, tuple(keys)) for group, keys in members.items())
            entry = _Entry(tuple(plain), groups, [self._turns[group] for group in members])
        else:
            entry = _Entry(tuple(plain), (), [])
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[subject] = entry
        return entry

    def _invalidate(self, pattern: str, wild: bool) -> None:
        """Drop the cached matches a change to ``pattern``'s subscriptions may have changed."""
        if wild:
            self._cache.clear()
        elif self._cache:
            self._cache.pop(pattern, None)
