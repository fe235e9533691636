"""Subject routing for the hub: which subscriptions receive a message published on a subject.

The hub keeps one ``SubjectRouter``. A subscription has a key (the hub uses ``(session_id,
sid)``), a pattern in the subject grammar of ``multikernel.protocol`` (``*`` is exactly one token,
``>`` one or more trailing tokens) and optionally a queue group. ``match(subject)`` returns every
plain subscription whose pattern matches, plus exactly one member of each queue group that has a
matching member. As in NATS a group is named by its queue-group name alone, so its members may
subscribe with different patterns; a member is eligible for a message when its own pattern matches.

**The trie.** Patterns are stored token by token: a node has a dict of literal children, at most
one ``*`` child and one ``>`` child, and holds the subscriptions whose pattern ends there. A
subject is walked level by level, following at each live node the literal child for the token and
the ``*`` child, and collecting the ``>`` child while tokens remain. A walk costs O(tokens x
live branches): branches multiply only where ``*`` patterns fork off a literal path, and the cost
does not grow with the subscriptions that share no prefix with the subject (ten thousand
``svc.<name>.<method>`` subscriptions cost one dict lookup per token).

**The cache.** Publishers repeat subjects, so each walk's result is cached per subject: the plain
keys, and per group its matching members in subscription order. A hit is one dict lookup plus
O(result) to build the returned list; a miss validates the subject, walks and stores. The cache is
bounded (``cache_size`` entries, oldest out first) and always exact: subscribing or unsubscribing
a literal pattern can only change the entry for that very subject, which is dropped; a wildcard
pattern may change any entry, so the cache is cleared. Literal subscriptions are the ones that
churn (per endpoint, per instance, per service method); wildcard ones are few and long-lived, and
finding the entries a wildcard affects would cost a match per cached subject on every subscribe.
Subscribing and unsubscribing cost O(pattern tokens) plus that invalidation.

**Queue groups rotate on every call**, hit or miss. A cache entry keeps a cursor per group and
hands out the group's matching members in turn, so each subject's messages spread evenly and
deterministically over the members that match it. A new entry starts its cursors at the group's
running count of picks, so subjects that are each seen once (no reuse of an entry) still rotate
across the group. ``match_filtered`` applies a predicate first (the hub's access policy): plain
keys it rejects are dropped, and a rejected member passes its turn to the next one in rotation, so
the group still delivers once whenever an allowed member matches.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, NamedTuple, TypeVar

from multikernel.protocol import InvalidSubjectError, validate_pattern, validate_subject

K = TypeVar("K", bound=Hashable)

DEFAULT_CACHE_SIZE: Final = 4096


@dataclass(frozen=True)
class RouterStatistics:
    """A snapshot of a router's size and cache behaviour, for the inspector."""

    subscriptions: int
    queue_groups: int  #: groups with at least one member
    trie_nodes: int  #: nodes below the root
    cache_entries: int
    cache_hits: int
    cache_misses: int


class Subscription(NamedTuple, Generic[K]):
    """One subscription as ``SubjectRouter.subscriptions()`` lists it."""

    key: K
    pattern: str
    queue_group: str | None


class _Node(Generic[K]):
    __slots__ = ("children", "full", "groups", "plain", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.star: _Node[K] | None = None
        self.full: _Node[K] | None = None  # the '>' child
        self.plain: dict[K, None] = {}
        self.groups: dict[str, dict[K, None]] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.star or self.full or self.plain or self.groups)


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


class _Record(NamedTuple):
    pattern: str
    queue_group: str | None
    order: int


def _validate_group(name: str) -> str:
    if "." not in name:
        with contextlib.suppress(InvalidSubjectError):
            return validate_subject(name)
    raise InvalidSubjectError(
        f"queue group {name!r} is not a single token; use one token of A-Z a-z 0-9 _ -"
    )


class SubjectRouter(Generic[K]):
    """Subscriptions by subject pattern and queue group; ``match`` says who gets a subject."""

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 (no cache) or more, not {cache_size}")
        self._cache_size = cache_size
        self._root: _Node[K] = _Node()
        self._nodes = 0
        self._subs: dict[K, _Record] = {}
        self._order = itertools.count()
        self._group_sizes: dict[str, int] = {}
        self._turns: dict[str, int] = {}  # picks per group, to seed new cache entries' cursors
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
        node = self._root
        for token in pattern.split("."):
            node = self._descend(node, token)
        if queue_group is None:
            node.plain[key] = None
        else:
            node.groups.setdefault(queue_group, {})[key] = None
            if queue_group not in self._group_sizes:
                self._group_sizes[queue_group] = 0
                self._turns[queue_group] = 0
            self._group_sizes[queue_group] += 1
        self._subs[key] = _Record(pattern, queue_group, next(self._order))
        self._invalidate(pattern)

    def unsubscribe(self, key: K) -> bool:
        """Remove a subscription; False if ``key`` was not subscribed."""
        record = self._subs.pop(key, None)
        if record is None:
            return False
        tokens = record.pattern.split(".")
        path = [self._root]
        for token in tokens:
            path.append(self._descend(path[-1], token))  # every node exists: nothing is created
        node, group = path[-1], record.queue_group
        if group is None:
            del node.plain[key]
        else:
            members = node.groups[group]
            del members[key]
            if not members:
                del node.groups[group]
            self._group_sizes[group] -= 1
            if not self._group_sizes[group]:
                del self._group_sizes[group], self._turns[group]
        for depth in range(len(tokens), 0, -1):  # prune the branch that is left empty
            if not path[depth].is_empty():
                break
            parent, token = path[depth - 1], tokens[depth - 1]
            if token == "*":
                parent.star = None
            elif token == ">":
                parent.full = None
            else:
                del parent.children[token]
            self._nodes -= 1
        self._invalidate(record.pattern)
        return True

    def match(self, subject: str) -> list[K]:
        """The keys that receive ``subject``: every matching plain subscription and one member
        of each queue group with a matching member. Raise InvalidSubjectError for a subject
        that breaks the grammar (checked once, when the subject is not cached)."""
        entry = self._cache.get(subject)
        if entry is None:
            entry = self._walk(subject)
        else:
            self._hits += 1
        found = list(entry.plain)
        if entry.groups:
            cursors, turns = entry.cursors, self._turns
            for index, (group, members) in enumerate(entry.groups):
                turn = cursors[index]
                cursors[index] = turn + 1
                turns[group] += 1
                found.append(members[turn % len(members)])
        return found

    def match_filtered(self, subject: str, allow: Callable[[K], bool]) -> list[K]:
        """Like ``match``, keeping only keys ``allow`` accepts; a group whose member in turn is
        rejected gives the turn to its next allowed member. ``allow`` is called once per
        matching plain key and, per group, until an allowed member is found."""
        entry = self._cache.get(subject)
        if entry is None:
            entry = self._walk(subject)
        else:
            self._hits += 1
        found = [key for key in entry.plain if allow(key)]
        cursors, turns = entry.cursors, self._turns
        for index, (group, members) in enumerate(entry.groups):
            turn, count = cursors[index], len(members)
            for step in range(count):
                member = members[(turn + step) % count]
                if allow(member):
                    found.append(member)
                    cursors[index] = turn + step + 1
                    turns[group] += 1
                    break
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
            yield Subscription(key, record.pattern, record.queue_group)

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            subscriptions=len(self._subs),
            queue_groups=len(self._group_sizes),
            trie_nodes=self._nodes,
            cache_entries=len(self._cache),
            cache_hits=self._hits,
            cache_misses=self._misses,
        )

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
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                self._nodes += 1
        return child

    def _walk(self, subject: str) -> _Entry[K]:
        """Match ``subject`` in the trie (a cache miss) and cache the result."""
        self._misses += 1
        level = [self._root]
        reached: list[_Node[K]] = []  # nodes whose subscriptions match
        for token in validate_subject(subject).split("."):
            following = []
            for node in level:
                if node.full is not None:
                    reached.append(node.full)  # '>' takes this token and any after it
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
        merged: list[str] = []  # groups with members at several nodes: put back in order
        for node in reached:
            if node.plain:
                plain += node.plain
            if node.groups:
                for group, keys in node.groups.items():
                    if group in members:
                        members[group] += keys
                        merged.append(group)
                    else:
                        members[group] = list(keys)  # a node's keys are in subscription order
        if members:
            subs = self._subs
            for group in merged:
                members[group].sort(key=lambda k: subs[k].order)
            groups = tuple((group, tuple(keys)) for group, keys in members.items())
            entry = _Entry(tuple(plain), groups, [self._turns[group] for group in members])
        else:
            entry = _Entry(tuple(plain), (), [])
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[subject] = entry
        return entry

    def _invalidate(self, pattern: str) -> None:
        """Drop the cached matches a change to ``pattern``'s subscriptions may have changed."""
        if "*" in pattern or ">" in pattern:
            self._cache.clear()
        else:
            self._cache.pop(pattern, None)
