"""Subject names: the grammar, its validation, and wildcard matching.

A subject is a dot-separated list of tokens, ``mk.instance.3.state``. A token is one or more of
``A-Z a-z 0-9 _ -``. A subscription *pattern* may also use two wildcards: ``*`` stands for
exactly one token, and ``>`` for one or more trailing tokens and may only be the last token.
Published subjects never contain wildcards. Limits: 255 bytes and 32 tokens.

Validation raises ``InvalidSubjectError`` naming the first thing that is wrong and where.
Matching (``subject_matches``) assumes both sides were validated: the hub validates each subject
once, when a subscription is made or a subject is first seen, not on every message.
"""

from __future__ import annotations

import re
from typing import Final, NoReturn

from multikernel.protocol._errors import InvalidSubjectError

MAX_SUBJECT_BYTES: Final = 255
MAX_SUBJECT_TOKENS: Final = 32

_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
# The whole grammar in one expression, for the fast path; the slow path explains failures.
_SUBJECT = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_PATTERN = re.compile(r"(?:[A-Za-z0-9_\-]+|\*)(?:\.(?:[A-Za-z0-9_\-]+|\*))*(?:\.>)?|>")


def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a valid concrete subject (no wildcards), else raise."""
    if (
        _SUBJECT.fullmatch(subject) is not None
        and len(subject) <= MAX_SUBJECT_BYTES
        and subject.count(".") < MAX_SUBJECT_TOKENS
    ):
        return subject
    _explain(subject, wildcards=False)


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern (``*`` and ``>`` allowed)."""
    if (
        _PATTERN.fullmatch(pattern) is not None
        and len(pattern) <= MAX_SUBJECT_BYTES
        and pattern.count(".") < MAX_SUBJECT_TOKENS
    ):
        return pattern
    _explain(pattern, wildcards=True)


def _explain(text: str, *, wildcards: bool) -> NoReturn:
    """Raise InvalidSubjectError naming the first rule ``text`` breaks."""
    what = "pattern" if wildcards else "subject"
    if not text:
        raise InvalidSubjectError(f"empty {what}; use dot-separated tokens such as 'mk.instance.3'")
    if not text.isascii():
        raise InvalidSubjectError(
            f"{what} {text!r} is not ASCII; tokens may use only A-Z a-z 0-9 _ -"
        )
    if len(text) > MAX_SUBJECT_BYTES:
        raise InvalidSubjectError(
            f"{what} is {len(text)} bytes, longer than the limit of {MAX_SUBJECT_BYTES}"
        )
    tokens = text.split(".")
    if len(tokens) > MAX_SUBJECT_TOKENS:
        raise InvalidSubjectError(
            f"{what} {text!r} has {len(tokens)} tokens, more than the limit of {MAX_SUBJECT_TOKENS}"
        )
    for position, token in enumerate(tokens, start=1):
        if not token:
            raise InvalidSubjectError(
                f"{what} {text!r} has an empty token at position {position}; "
                "separate tokens with single dots and do not start or end with a dot"
            )
        if token in ("*", ">"):
            if not wildcards:
                raise InvalidSubjectError(
                    f"subject {text!r} contains the wildcard {token!r} at position {position}; "
                    "wildcards are for subscriptions, a published subject names one thing"
                )
            if token == ">" and position != len(tokens):
                raise InvalidSubjectError(
                    f"pattern {text!r} has '>' at position {position}; '>' matches the rest of "
                    "a subject and may only be the last token"
                )
            continue
        if _TOKEN.fullmatch(token) is None:
            bad = next(c for c in token if _TOKEN.fullmatch(c) is None)
            raise InvalidSubjectError(
                f"{what} {text!r} has the character {bad!r} in token {position} ({token!r}); "
                "tokens may use only A-Z a-z 0-9 _ -" + ("" if wildcards else ", and no wildcards")
            )
    raise InvalidSubjectError(f"{what} {text!r} breaks the subject grammar")  # pragma: no cover


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a (validated) subscription pattern matches a (validated) concrete subject."""
    if pattern == subject:
        return True
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[index]:
            return False
    return len(pattern_tokens) == len(subject_tokens)
