"""Subject grammar: validation with clear errors, and wildcard matching."""

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multikernel.protocol import (
    MAX_SUBJECT_BYTES,
    MAX_SUBJECT_TOKENS,
    InvalidSubjectError,
    subject_matches,
    validate_pattern,
    validate_subject,
)

TOKENS = st.text(alphabet="ab_-9", min_size=1, max_size=3)
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERNS = st.builds(
    lambda tokens, tail: ".".join([*tokens, *tail]),
    st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=5),
    st.sampled_from([[], [">"]]),
).filter(bool)


@pytest.mark.parametrize(
    "subject", ["mk", "mk.instance.3.state", "A-b_c.0", "_inbox.x9", "a." * 31 + "a"]
)
def test_valid_subjects_are_accepted(subject: str) -> None:
    assert validate_subject(subject) == subject


@pytest.mark.parametrize("pattern", ["*", ">", "mk.*.state", "mk.>", "*.*.>", "mk.instance.3"])
def test_valid_patterns_are_accepted(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("subject", "complaint"),
    [
        ("", "empty subject"),
        ("a..b", "empty token at position 2"),
        (".a", "empty token at position 1"),
        ("a.", "empty token at position 2"),
        ("a.b c", "character ' ' in token 2"),
        ("mk.état", "not ASCII"),
        ("mk.*.state", r"wildcard '\*' at position 2"),
        ("mk.>", "wildcard '>' at position 2"),
        ("a" * (MAX_SUBJECT_BYTES + 1), "256 bytes"),
        ("a." * MAX_SUBJECT_TOKENS + "a", "33 tokens"),
        ("a\n", "character '\\\\n'"),
    ],
)
def test_invalid_subject_says_what_is_wrong(subject: str, complaint: str) -> None:
    with pytest.raises(InvalidSubjectError, match=complaint):
        validate_subject(subject)


@pytest.mark.parametrize(
    ("pattern", "complaint"),
    [
        ("a.>.b", "'>' at position 2"),
        (">.a", "'>' at position 1"),
        ("a.**", "character '\\*' in token 2"),
        ("a.b>", "character '>' in token 2"),
        ("a..*", "empty token"),
        ("", "empty pattern"),
    ],
)
def test_invalid_pattern_says_what_is_wrong(pattern: str, complaint: str) -> None:
    with pytest.raises(InvalidSubjectError, match=complaint):
        validate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("mk.instance.3", "mk.instance.3", True),
        ("mk.instance.3", "mk.instance.4", False),
        ("mk.*.state", "mk.instance.state", True),
        ("mk.*.state", "mk.state", False),
        ("mk.*", "mk.a.b", False),
        ("mk.>", "mk.a.b", True),
        ("mk.>", "mk", False),
        (">", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("mk.instance", "mk.instance.3", False),
        ("mk.instance.3", "mk.instance", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


def _reference_match(pattern: str, subject: str) -> bool:
    regex = r"\.".join(
        r"[^.]+(\.[^.]+)*" if token == ">" else r"[^.]+" if token == "*" else re.escape(token)
        for token in pattern.split(".")
    )
    return re.fullmatch(regex, subject) is not None


@given(PATTERNS, SUBJECTS)
def test_subject_matches_agrees_with_a_regex_reference(pattern: str, subject: str) -> None:
    assert subject_matches(pattern, subject) is _reference_match(pattern, subject)


@given(SUBJECTS)
def test_every_subject_is_also_a_pattern_matching_itself(subject: str) -> None:
    assert validate_subject(subject) == validate_pattern(subject)
    assert subject_matches(subject, subject)


@given(st.text(max_size=40))
def test_validation_accepts_or_raises_invalid_subject_only(text: str) -> None:
    for validate in (validate_subject, validate_pattern):
        with contextlib.suppress(InvalidSubjectError):
            validate(text)
