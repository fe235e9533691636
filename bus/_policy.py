"""Access control: who may publish, subscribe, call, own names and monitor, from a TOML policy.

The hub binds an ``Identity`` to each endpoint when it attaches (never from what a sender writes)
and asks a ``Policy`` for a ``Decision`` when a subscription or a direct channel is set up, and
again for everything when it reloads the policy. Traffic within one instance is allowed by
default, except what ``[host_only]`` holds back (the host actors' services such as ``lifecycle``,
and the subjects instances speak on), which only a rule grants; across instances it is denied
unless a rule allows it. Explicit ``[[deny]]`` rules come first, then the same-instance default,
then ``[[rule]]`` allows, then the default denial; docs/access-control.md is the reference::

    policy = Policy.load("/etc/multikernel/policy.toml")
    decision = policy.may_connect(caller, callee, "resource")
    if not decision:
        raise AccessDeniedError(f"call 'resource' refused: {decision.reason}")

Decisions are pure and cached per (who, what), so asking again is one dict lookup. The rules that
apply to an identity for an action are flattened once (``_Rules``), so a decision that is not
cached walks a few expanded patterns, and one whose first token no pattern starts with is the
default at once; the hub asks for bare answers (``subscribe_verdicts``, ``publish_verdicts``) and
for reasons only to refuse. Rules are parsed and checked by ``multikernel.bus._rules``; pattern
containment lives in ``_patterns``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from multikernel.bus._patterns import expand, pattern_contains, patterns_overlap
from multikernel.bus._rules import (
    BUILTIN_HOST_ONLY,
    BUILTIN_RULES,
    HOST_ONLY_KEYS,
    Action,
    PolicyError,
    Rule,
    parse_policy,
)
from multikernel.protocol import validate_pattern, validate_subject

#: Decisions kept per policy before the cache starts over (it never grows without bound).
CACHE_LIMIT: Final = 1 << 16
#: Subscribe decisions have a smaller cache of their own: a pattern is asked about once per
#: subscription and the hub keeps the answer with it, so a cache as large as the other would only
#: hold ~300 bytes per subscription (a denial's reason names the pattern) for nothing.
SUBSCRIBE_CACHE_LIMIT: Final = 1 << 10

_VERB: Final = {"publish": "publish", "subscribe": "subscribe to", "call": "call", "own": "own"}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an endpoint is, as the hub bound it at attach time.

    ``name`` is the endpoint's self-chosen display name (diagnostic only, never used to decide);
    ``names`` are the well-known names it owns right now, which ``name:`` selectors look at.
    """

    endpoint_id: int
    instance: int
    uid: int
    pid: int
    name: str
    names: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer and why: ``reason`` names the rule or default that decided. Truthy iff allowed."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


_Key = tuple[str, int, int, frozenset[str], str, bool]


class _Rules(NamedTuple):
    """What decides one action for one identity: deny and allow patterns (expanded, in rule
    order) each with the decision it gives, the ``[host_only]`` patterns, and the first tokens
    of them all (``_EVERY_TOKEN`` when one starts with a wildcard): a thing whose first token
    is a literal outside that set concerns no rule, and only the defaults decide."""

    deny: tuple[tuple[str, Decision], ...]
    held: tuple[str, ...]
    allow: tuple[tuple[str, Decision], ...]
    firsts: frozenset[str]
    everything: bool  # no deny pattern, and an allow pattern is '>': allowed whatever the thing


_WILD: Final = ("*", ">")
_EVERY_TOKEN: Final = frozenset(_WILD)  # the firsts of a rule set with a wildcard-first pattern
_VERDICT: Final = {True: "allows", False: "denies"}


class Policy:
    """Immutable rules and a decision cache; build with ``default``, ``from_toml`` or ``load``.

    ``within_instance=True`` asks about traffic that stays inside ``who``'s own instance, where
    ``[defaults] same_instance`` applies; without it the question is about other instances. The
    ``may_deliver`` and ``may_connect`` combinators pick the right one from the two identities.
    """

    def __init__(self, text: str = "", *, source: str = "<default>") -> None:
        parsed = parse_policy(text, source)
        self.source: Final = source
        self.same_instance_allowed: Final = parsed.same_instance_allowed
        self._deny: tuple[Rule, ...] = parsed.deny
        self._allow: tuple[Rule, ...] = parsed.allow + (BUILTIN_RULES if parsed.builtin else ())
        # The built-in [host_only] always holds: a file adds to it, and grants with rules.
        self.host_only: Final = {
            key: BUILTIN_HOST_ONLY[key] + parsed.host_only[key] for key in HOST_ONLY_KEYS
        }
        self._cache: dict[_Key, Decision] = {}
        self._subscribe_cache: dict[_Key, Decision] = {}
        self._compiled: dict[tuple[Action, int, int, frozenset[str]], _Rules] = {}

    @classmethod
    def default(cls) -> Policy:
        """The policy without a file: the defaults and the built-in rules only."""
        return cls()

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> Policy:
        """Parse a policy; ``source`` names it in errors and reasons. Raises ``PolicyError``."""
        return cls(text, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and parse a policy file. Raises ``PolicyError`` if unreadable or malformed."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(
                f"{os.fspath(path)}: cannot read the policy file: {exc}",
                details={"source": os.fspath(path)},
            ) from exc
        return cls(text, source=os.fspath(path))

    def __repr__(self) -> str:
        return (
            f"<Policy from {self.source}: {len(self._deny)} deny, {len(self._allow)} allow rules>"
        )

    # -- questions about one endpoint ------------------------------------------------------------

    def may_publish(
        self, who: Identity, subject: str, *, within_instance: bool = False
    ) -> Decision:
        """May ``who`` publish on ``subject`` (a concrete subject)?"""
        return self._decide("publish", who, subject, within_instance)

    def may_subscribe(
        self, who: Identity, pattern: str, *, within_instance: bool = False
    ) -> Decision:
        """May ``who`` subscribe to ``pattern``: is it contained in one allowed pattern and does
        it overlap no denied one?"""
        return self._decide("subscribe", who, pattern, within_instance)

    def may_call(self, who: Identity, service: str, *, within_instance: bool = False) -> Decision:
        """May ``who`` open a channel to (call) the service or well-known name ``service``?"""
        return self._decide("call", who, service, within_instance)

    def may_own(self, who: Identity, name: str) -> Decision:
        """May ``who`` own the well-known ``name``? Names are hub-wide: no same-instance default."""
        return self._decide("own", who, name, False)

    def may_monitor(self, who: Identity) -> Decision:
        """May ``who`` use the privileged monitor mode (see all traffic)?"""
        return self._decide("monitor", who, "", False)

    # -- questions about a pair --------------------------------------------------------------------

    def may_deliver(
        self, publisher: Identity, subscriber: Identity, subject: str, pattern: str
    ) -> Decision:
        """May a publication on ``subject`` reach ``subscriber``'s subscription ``pattern``?

        Both sides must be allowed: the publisher to publish, the subscriber to subscribe, each
        under the same-instance default when they share an instance.
        """
        within = publisher.instance == subscriber.instance
        sent = self.may_publish(publisher, subject, within_instance=within)
        if not sent:
            return sent
        return self.may_subscribe(subscriber, pattern, within_instance=within)

    def may_connect(self, caller: Identity, callee: Identity, service: str) -> Decision:
        """May ``caller`` get a direct channel to ``callee``, which serves ``service``?

        Replies need no check: a callee may always answer on a channel it was called on.
        """
        within = caller.instance == callee.instance
        return self.may_call(caller, service, within_instance=within)

    # -- evaluation --------------------------------------------------------------------------------

    def _decide(self, action: Action, who: Identity, thing: str, within: bool) -> Decision:
        key = (action, who.instance, who.uid, who.names, thing, within)
        subscribing = action == "subscribe"
        cache = self._subscribe_cache if subscribing else self._cache
        decision = cache.get(key)
        if decision is None:
            decision = self._evaluate(action, who, thing, within)
            if len(cache) >= (SUBSCRIBE_CACHE_LIMIT if subscribing else CACHE_LIMIT):
                cache.clear()
            cache[key] = decision
        return decision

    def _evaluate(self, action: Action, who: Identity, thing: str, within: bool) -> Decision:
        if action == "subscribe":
            validate_pattern(thing)
        elif action != "monitor":
            validate_subject(thing)
        if action == "monitor":
            for listed, allowed in ((self._deny, False), (self._allow, True)):
                for rule in listed:
                    if rule.find(action, who.instance, who.uid, who.names, thing, pattern_contains):
                        return Decision(allowed, f"{rule.label} {_VERDICT[allowed]} monitor")
            return self._by_default(action, who, thing, within, None)
        rules = self._rules_for(action, who)
        first = thing.split(".", 1)[0]
        if rules.firsts is not _EVERY_TOKEN and first not in rules.firsts and first not in _WILD:
            return self._by_default(action, who, thing, within, None)  # no rule concerns it
        for pattern, decision in rules.deny:
            if patterns_overlap(pattern, thing):
                return decision
        held = None
        if within:
            test = patterns_overlap if action == "subscribe" else pattern_contains
            held = next((pattern for pattern in rules.held if test(pattern, thing)), None)
            if self.same_instance_allowed and held is None:
                return _SAME_INSTANCE_ALLOWED
        for pattern, decision in rules.allow:
            if pattern_contains(pattern, thing):
                return decision
        return self._by_default(action, who, thing, within, held)

    def _by_default(
        self, action: Action, who: Identity, thing: str, within: bool, held: str | None
    ) -> Decision:
        """The answer when no rule decided: the same-instance default, or a denial saying why."""
        if within and self.same_instance_allowed and held is None:
            return _SAME_INSTANCE_ALLOWED
        what = "monitor" if action == "monitor" else f"{_VERB[action]} {thing!r}"
        subject = f"instance {who.instance} (uid {who.uid})"
        if held is not None and self.same_instance_allowed:
            selector = f"instance:{who.instance} & uid:{who.uid}"
            return Decision(
                False,
                f"permission denied: {subject} may not {what}: [host_only] keeps {held!r} for "
                "the host's own user and root (grant it in the policy with [[rule]] "
                f'who = "{selector}" {action} = ["{thing}"])',
            )
        if within:
            default = 'same-instance traffic is denied ([defaults] same_instance = "deny")'
        elif action in ("own", "monitor"):
            default = "denied by default"
        else:
            default = "cross-instance traffic is denied by default"
        return Decision(False, f"no rule in {self.source} allows {subject} to {what}; {default}")

    def publish_verdicts(self, who: Identity, subject: str) -> tuple[bool, bool] | None:
        """May ``who`` publish ``subject`` (within its instance, across), when that follows from
        ``who``'s rules alone, with no work per subject: no rule pattern starts with the
        subject's first token (the defaults decide), or no deny rule applies and an allow rule
        grants ``>``. None when the subject must be looked at (``may_publish``). The subject is
        not validated here: the hub's router does that for every subject it routes."""
        rules = self._rules_for("publish", who)
        if rules.everything:
            return True, True
        if rules.firsts is not _EVERY_TOKEN and subject.split(".", 1)[0] not in rules.firsts:
            return self.same_instance_allowed, False
        return None

    def subscribe_verdicts(self, who: Identity, pattern: str) -> tuple[bool, bool]:
        """May ``who`` subscribe ``pattern`` (a valid one) within its instance, and across: the
        answers alone, as ``may_subscribe`` gives them, from ``who``'s rules when the pattern's
        first token concerns none of them or an allow rule grants ``>`` with no deny rule, else
        by evaluating (not cached: the hub keeps the answers with the subscription)."""
        rules = self._rules_for("subscribe", who)
        first = pattern.split(".", 1)[0]
        if rules.everything:
            return True, True
        if rules.firsts is not _EVERY_TOKEN and first not in rules.firsts and first not in _WILD:
            return self.same_instance_allowed, False
        within = self._evaluate("subscribe", who, pattern, True)
        return bool(within), bool(self._evaluate("subscribe", who, pattern, False))

    def _rules_for(self, action: Action, who: Identity) -> _Rules:
        """The rules that apply to ``who`` for ``action``, expanded and flattened in order, each
        pattern with the decision it gives; cached per identity (a rule set is asked about per
        pattern: walking selectors and formatting reasons each time cost ~5 us a decision)."""
        key = (action, who.instance, who.uid, who.names)
        rules = self._compiled.get(key)
        if rules is None:
            if len(self._compiled) >= CACHE_LIMIT:
                self._compiled.clear()
            rules = self._compiled[key] = self._compile(action, who)
        return rules

    def _compile(self, action: Action, who: Identity) -> _Rules:
        def flatten(rules: tuple[Rule, ...], allowed: bool) -> tuple[tuple[str, Decision], ...]:
            flat = []
            for rule in rules:
                if rule.grants[action] and rule.applies(who.instance, who.uid, who.names):
                    for raw in rule.grants[action]:
                        pattern = expand(raw, who.instance)
                        verdict = f"{rule.label} {_VERDICT[allowed]} {_granted(action, pattern)}"
                        flat.append((pattern, Decision(allowed, verdict)))
            return tuple(flat)

        deny, allow = flatten(self._deny, False), flatten(self._allow, True)
        raws = self.host_only[action] if action in HOST_ONLY_KEYS else ()
        held = tuple(expand(raw, who.instance) for raw in raws)
        firsts = {p.split(".", 1)[0] for p in (*held, *(p for p, _ in deny + allow))}
        every = bool(firsts & {"*", ">"})
        everything = not deny and any(pattern == ">" for pattern, _ in allow)
        return _Rules(deny, held, allow, _EVERY_TOKEN if every else frozenset(firsts), everything)


_SAME_INSTANCE_ALLOWED: Final = Decision(
    True, 'same-instance traffic is allowed ([defaults] same_instance = "allow")'
)


def _granted(action: Action, pattern: str) -> str:
    return "monitor" if action == "monitor" else f"{_VERB[action]} {pattern!r}"
