"""The policy file format: parse TOML into checked rules, or say exactly what is wrong and where.

A policy has four top-level tables, all optional: ``[defaults]``, ``[host_only]`` (what the
same-instance default never grants), ``[[rule]]`` (allows) and ``[[deny]]``. A rule says ``who``
it is about (a selector, or a list of them meaning any-of) and
lists the subject patterns it grants for ``publish`` / ``subscribe`` and the name patterns for
``call`` / ``own``, plus ``monitor = true``. Patterns may use ``{instance}``, the asking endpoint's
own instance number. Everything is validated at load: a malformed file raises ``PolicyError``
naming the file, the rule (``[[rule]] #2``, numbered from 1 in file order) and the problem.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, TypeAlias

from multikernel.bus._patterns import expand, placeholders
from multikernel.protocol import (
    InvalidSubjectError,
    MultikernelError,
    subject_matches,
    validate_pattern,
)

Action: TypeAlias = Literal["publish", "subscribe", "call", "own", "monitor"]
GRANTS: Final = ("publish", "subscribe", "call", "own")
RULE_KEYS: Final = ("who", *GRANTS, "monitor")
DEFAULTS_KEYS: Final = ("same_instance", "builtin_rules")
TOP_KEYS: Final = ("defaults", "host_only", "rule", "deny")
#: The actions the same-instance default may grant, so the ones `[host_only]` may hold back.
HOST_ONLY_KEYS: Final = ("call", "publish", "subscribe")
SELECTORS: Final = (
    "*, host, guest, instance:N, instance:*, uid:N or name:NAME (join with & for all-of)"
)

#: Allow rules that follow a file's own (unless ``[defaults] builtin_rules = false``).
BUILTIN_TOML: Final = """\
[[rule]]  # the host's privileged endpoints may do everything
who = "host"
publish = [">"]
subscribe = [">"]
call = [">"]
own = [">"]
monitor = true

[[rule]]  # every endpoint has its instance's own subtree of subjects and names
who = "*"
publish = ["mk.instance.{instance}.>"]
subscribe = ["mk.instance.{instance}.>"]
own = ["instance.{instance}.>"]
"""

#: Held back from the same-instance default whatever a file says (a file's `[host_only]` adds to
#: it): on instance 0 only root and the host's own user, through their rules, reach the host
#: actors' services or speak for an instance; anyone else needs a rule of their own.
BUILTIN_HOST_ONLY_TOML: Final = """\
[host_only]  # the host actors' services, and the subjects instances speak on
call = ["lifecycle", "resource", "fault", "upgrade"]
publish = ["mk.instance.>", "mk.upgrade.>", "mk.upgrades.>"]
"""

_NUMBER = re.compile(r"[0-9]+")


class PolicyError(MultikernelError):
    """A policy file that cannot be used: unreadable, not TOML, or breaking the format.

    The message names the file, the table and rule number, and what is wrong; ``details`` holds
    ``source`` and ``where``.
    """


@dataclass(frozen=True, slots=True)
class Term:
    """One selector term: ``kind``, with ``number`` (instance:N, uid:N) or ``pattern`` (name:)."""

    kind: Literal["any", "host", "guest", "instance", "uid", "name"]
    number: int = 0
    pattern: str = ""

    def matches(self, instance: int, uid: int, names: frozenset[str]) -> bool:
        match self.kind:
            case "any":
                return True
            case "host":
                return instance == 0 and uid == 0
            case "guest":
                return instance != 0
            case "instance":
                return instance == self.number
            case "uid":
                return uid == self.number
            case "name":
                pattern = expand(self.pattern, instance)
                return any(subject_matches(pattern, name) for name in names)


@dataclass(frozen=True, slots=True)
class Rule:
    """A checked ``[[rule]]`` or ``[[deny]]``: any-of (all-of terms), and what it grants."""

    label: str
    who: tuple[tuple[Term, ...], ...]
    grants: Mapping[str, tuple[str, ...]]
    monitor: bool

    def applies(self, instance: int, uid: int, names: frozenset[str]) -> bool:
        """Whether the rule's ``who`` selects this identity."""
        return any(all(t.matches(instance, uid, names) for t in terms) for terms in self.who)

    def find(
        self,
        action: Action,
        instance: int,
        uid: int,
        names: frozenset[str],
        thing: str,
        test: Callable[[str, str], bool],
    ) -> str | None:
        """The first of this rule's ``action`` patterns (expanded) that ``test(pattern, thing)``
        accepts, if the rule applies to the identity; ``"monitor"`` for a monitor grant."""
        patterns = () if action == "monitor" else self.grants[action]
        if not (patterns or (action == "monitor" and self.monitor)):
            return None
        if not self.applies(instance, uid, names):
            return None
        if action == "monitor":
            return "monitor"
        for raw in patterns:
            pattern = expand(raw, instance)
            if test(pattern, thing):
                return pattern
        return None


@dataclass(frozen=True, slots=True)
class ParsedPolicy:
    """A checked file: its defaults and its own rules (the built-in rules are kept apart)."""

    same_instance_allowed: bool
    builtin: bool
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    host_only: Mapping[str, tuple[str, ...]]  # the file's own, by action (HOST_ONLY_KEYS)


def parse_policy(text: str, source: str) -> ParsedPolicy:
    """Parse and check a whole policy file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _fail(source, "", f"not valid TOML: {exc}")
    _check_keys(data, TOP_KEYS, source, "", "top-level key")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        _fail(source, "", "'defaults' must be a table: write [defaults]")
    _check_keys(defaults, DEFAULTS_KEYS, source, "[defaults]", "key")
    same_instance = defaults.get("same_instance", "allow")
    if same_instance not in ("allow", "deny"):
        _fail(
            source, "[defaults]", f'same_instance must be "allow" or "deny", not {same_instance!r}'
        )
    builtin = defaults.get("builtin_rules", True)
    if not isinstance(builtin, bool):
        _fail(source, "[defaults]", f"builtin_rules must be true or false, not {builtin!r}")
    host_only = data.get("host_only", {})
    if not isinstance(host_only, dict):
        _fail(source, "", "'host_only' must be a table: write [host_only]")
    _check_keys(host_only, HOST_ONLY_KEYS, source, "[host_only]", "key")
    return ParsedPolicy(
        same_instance_allowed=same_instance == "allow",
        builtin=builtin,
        allow=_rules(data.get("rule", []), "rule", source),
        deny=_rules(data.get("deny", []), "deny", source),
        host_only={
            key: _patterns(host_only.get(key, []), key, source, "[host_only]")
            for key in HOST_ONLY_KEYS
        },
    )


def _rules(tables: object, table: str, source: str) -> tuple[Rule, ...]:
    if not isinstance(tables, list):
        _fail(
            source, "", f"{table!r} must be an array of tables: write [[{table}]] before each one"
        )
    return tuple(_rule(t, f"[[{table}]] #{n}", source) for n, t in enumerate(tables, start=1))


def _rule(table: object, where: str, source: str) -> Rule:
    if not isinstance(table, dict):
        _fail(source, where, "must be a table of keys such as who = ... and publish = [...]")
    _check_keys(table, RULE_KEYS, source, where, "key")
    if "who" not in table:
        _fail(source, where, "missing 'who': say whom the rule is about, e.g. who = \"instance:2\"")
    who = table["who"]
    selectors = _strings(who, "who", source, where)
    if not selectors:
        _fail(source, where, "'who' is an empty list: it would select nobody")
    grants = {key: _patterns(table.get(key, []), key, source, where) for key in GRANTS}
    monitor = table.get("monitor", False)
    if not isinstance(monitor, bool):
        _fail(source, where, f"monitor must be true or false, not {monitor!r}")
    if not monitor and not any(grants.values()):
        verb = "denies" if where.startswith("[[deny]]") else "grants"
        _fail(source, where, f"{verb} nothing: add publish, subscribe, call, own or monitor")
    return Rule(
        label=f"{where} in {source} (who = {json.dumps(who)})",
        who=tuple(_selector(s, source, where) for s in selectors),
        grants=grants,
        monitor=monitor,
    )


def _selector(text: str, source: str, where: str) -> tuple[Term, ...]:
    return tuple(_term(part.strip(), text, source, where) for part in text.split("&"))


def _term(text: str, selector: str, source: str, where: str) -> Term:
    kind, _, value = text.partition(":")
    match kind, value:
        case ("*", "") | ("instance", "*"):
            return Term("any")
        case ("host" | "guest", ""):
            return Term(kind)
        case ("instance" | "uid", _) if _NUMBER.fullmatch(value):
            return Term(kind, number=int(value))
        case ("name", _) if value:
            return Term("name", pattern=_pattern(value, f"who {selector!r}", source, where))
    within = "" if text == selector else f" in {selector!r}"
    _fail(source, where, f"bad selector {text!r}{within}; use {SELECTORS}")


def _patterns(value: object, key: str, source: str, where: str) -> tuple[str, ...]:
    return tuple(_pattern(p, key, source, where) for p in _strings(value, key, source, where))


def _pattern(text: str, key: str, source: str, where: str) -> str:
    for name in placeholders(text):
        if name != "instance":
            _fail(
                source,
                where,
                f"unknown placeholder {{{name}}} in {key} {text!r}; "
                "the only placeholder is {instance}",
            )
    try:
        validate_pattern(expand(text, 0))
    except InvalidSubjectError as exc:
        _fail(source, where, f"bad pattern in {key}: {exc}")
    return text


def _strings(value: object, key: str, source: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    _fail(source, where, f"{key} must be a string or a list of strings, not {value!r}")


def _check_keys(
    table: Mapping[str, Any], known: tuple[str, ...], source: str, where: str, what: str
) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            _fail(source, where, f"unknown {what} {key!r}; {hint}expected {', '.join(known)}")


def _fail(source: str, where: str, problem: str) -> NoReturn:
    place = f"{source}: {where}" if where else source
    raise PolicyError(f"{place}: {problem}", details={"source": source, "where": where})


BUILTIN_RULES: Final = parse_policy(BUILTIN_TOML, "the built-in rules").allow
BUILTIN_HOST_ONLY: Final = parse_policy(BUILTIN_HOST_ONLY_TOML, "the built-in rules").host_only
