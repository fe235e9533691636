"""Set algebra on subject patterns: containment, overlap, and the ``{instance}`` placeholder.

A pattern stands for the set of concrete subjects it matches (``*`` one token, ``>`` one or more
trailing tokens). Access control needs two questions answered exactly, for any two patterns:

- ``pattern_contains(outer, inner)``: does every subject ``inner`` matches also match ``outer``?
  A subscription is allowed only if an allowed pattern contains it.
- ``patterns_overlap(a, b)``: is there a subject both match? A subscription is denied if it
  overlaps a denied pattern: it could receive something the policy forbids.

Both walk the two token lists once, O(tokens), and treat tokens as an unbounded alphabet: ``*``
is never contained in a literal token. A concrete subject is a pattern without wildcards, so for
subjects and names they reduce to ``subject_matches``. Inputs are assumed valid
(``validate_pattern``); the policy validates them once, on a cache miss.
"""

from __future__ import annotations

import re
from typing import Final

#: The one placeholder a policy pattern may use; it stands for the asking endpoint's instance.
INSTANCE_PLACEHOLDER: Final = "{instance}"

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def pattern_contains(outer: str, inner: str) -> bool:
    """Whether every subject matched by ``inner`` is also matched by ``outer``."""
    if outer == inner or outer == ">":
        return True
    outer_tokens = outer.split(".")
    inner_tokens = inner.split(".")
    for index, token in enumerate(outer_tokens):
        if token == ">":
            # The rest of outer takes any one or more tokens: inner must still have some.
            return index < len(inner_tokens)
        if index >= len(inner_tokens):
            return False  # outer needs more tokens than inner's subjects have
        theirs = inner_tokens[index]
        if theirs == ">":
            return False  # inner reaches subjects of any length, outer has a fixed one
        if token != "*" and token != theirs:
            return False  # a literal contains only itself, never a '*'
    return len(outer_tokens) == len(inner_tokens)


def patterns_overlap(first: str, second: str) -> bool:
    """Whether at least one subject matches both patterns."""
    if first == second:
        return True
    a_tokens = first.split(".")
    b_tokens = second.split(".")
    for index in range(max(len(a_tokens), len(b_tokens))):
        if index >= len(a_tokens) or index >= len(b_tokens):
            return False  # one ended without '>', the other needs more tokens
        a, b = a_tokens[index], b_tokens[index]
        if a == ">" or b == ">":
            return True  # both still have a token here, and '>' takes the rest of either
        if a != b and a != "*" and b != "*":
            return False
    return True


def placeholders(text: str) -> list[str]:
    """The names of every ``{...}`` placeholder in ``text``, in order."""
    return _PLACEHOLDER.findall(text)


def expand(text: str, instance: int) -> str:
    """``text`` with ``{instance}`` replaced by ``instance``."""
    return text.replace(INSTANCE_PLACEHOLDER, str(instance))
