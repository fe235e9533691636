"""Access control: defaults, rules and selectors, denials, {instance}, containment, bad files."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multikernel.bus import _policy
from multikernel.bus._patterns import pattern_contains, patterns_overlap
from multikernel.bus._policy import Decision, Identity, Policy
from multikernel.bus._rules import BUILTIN_TOML, PolicyError
from multikernel.protocol import InvalidSubjectError, MultikernelError, subject_matches

DOC = Path(__file__).parents[2] / "docs" / "access-control.md"


def ep(instance: int, uid: int = 1000, names: tuple[str, ...] = ()) -> Identity:
    return Identity(
        endpoint_id=100 + instance,
        instance=instance,
        uid=uid,
        pid=4000,
        name="t",
        names=frozenset(names),
    )


ROOT = ep(0, uid=0)
HOST_USER = ep(0)
G2, G3 = ep(2), ep(3)


def policy(text: str) -> Policy:
    return Policy.from_toml(text, source="policy.toml")


# -- defaults ---------------------------------------------------------------------------------


def test_default_allows_any_traffic_within_an_instance() -> None:
    other = ep(2, uid=2000)
    assert Policy.default().may_deliver(G2, other, "app.x", "app.>")
    assert Policy.default().may_connect(G2, other, "db.primary")


def test_default_says_why_same_instance_traffic_is_allowed() -> None:
    decision = Policy.default().may_connect(G2, ep(2), "db")
    assert "same_instance" in decision.reason


def test_default_denies_cross_instance_publish_and_says_why() -> None:
    decision = Policy.default().may_deliver(G2, G3, "app.x", "app.>")
    assert not decision
    assert "cross-instance" in decision.reason
    assert "'app.x'" in decision.reason
    assert "instance 2" in decision.reason


def test_default_denies_cross_instance_calls() -> None:
    assert not Policy.default().may_connect(G2, ROOT, "resource")


def test_default_host_root_may_do_everything() -> None:
    default = Policy.default()
    assert default.may_connect(ROOT, G2, "anything.at.all")
    assert default.may_deliver(ROOT, G3, "mk.instance.3.cmd", "mk.instance.3.>")
    assert default.may_subscribe(ROOT, ">")
    assert default.may_own(ROOT, "resource")
    assert default.may_monitor(ROOT)


def test_default_host_non_root_is_an_ordinary_endpoint() -> None:
    default = Policy.default()
    assert not default.may_monitor(HOST_USER)
    assert not default.may_connect(HOST_USER, G2, "instance.2.agent")
    assert not default.may_own(HOST_USER, "resource")


def test_default_endpoints_own_names_under_their_own_instance_only() -> None:
    default = Policy.default()
    assert default.may_own(G2, "instance.2.agent")
    assert not default.may_own(G2, "instance.3.agent")
    assert not default.may_own(G2, "resource")


def test_default_endpoints_talk_to_the_host_on_their_instance_subtree() -> None:
    default = Policy.default()
    assert default.may_deliver(G2, ROOT, "mk.instance.2.state", "mk.instance.*.state")
    assert default.may_deliver(ROOT, G2, "mk.instance.2.cmd", "mk.instance.2.>")
    assert not default.may_deliver(G2, G3, "mk.instance.2.state", "mk.instance.2.>")


def test_default_denies_monitor_to_guests() -> None:
    decision = Policy.default().may_monitor(G2)
    assert not decision
    assert "monitor" in decision.reason


def test_empty_file_decides_like_the_default() -> None:
    empty, default = policy(""), Policy.default()
    for who, subject in itertools.product([ROOT, HOST_USER, G2], ["mk.instance.2.x", "app.x"]):
        assert empty.may_publish(who, subject).allowed == default.may_publish(who, subject).allowed


# -- defaults switches ------------------------------------------------------------------------


def test_same_instance_deny_denies_traffic_within_an_instance() -> None:
    strict = policy('[defaults]\nsame_instance = "deny"')
    decision = strict.may_deliver(G2, ep(2), "app.x", "app.>")
    assert not decision
    assert 'same_instance = "deny"' in decision.reason


def test_same_instance_deny_still_honours_allow_rules() -> None:
    strict = policy('[defaults]\nsame_instance = "deny"\n[[rule]]\nwho = "*"\ncall = ["db"]')
    assert strict.may_connect(G2, ep(2), "db")
    assert not strict.may_connect(G2, ep(2), "other")


def test_builtin_rules_can_be_switched_off() -> None:
    bare = policy("[defaults]\nbuiltin_rules = false")
    assert not bare.may_monitor(ROOT)
    assert not bare.may_own(G2, "instance.2.agent")
    assert bare.may_connect(G2, ep(2), "db")


# -- allow rules and selectors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "selected", "not_selected"),
    [
        ("*", G3, None),
        ("instance:*", G3, None),
        ("instance:2", G2, G3),
        ("uid:1000", G2, ep(2, uid=1001)),
        ("host", ROOT, HOST_USER),
        ("guest", G3, HOST_USER),
        ("name:db.primary", ep(2, names=("db.primary",)), G2),
        ("name:db.*", ep(2, names=("x", "db.replica")), ep(2, names=("db",))),
        (
            "name:instance.{instance}.agent",
            ep(2, names=("instance.2.agent",)),
            ep(2, names=("instance.3.agent",)),
        ),
        ("instance:2 & uid:1000", G2, ep(2, uid=0)),
    ],
)
def test_allow_rule_applies_to_the_endpoints_its_selector_selects(
    selector: str, selected: Identity, not_selected: Identity | None
) -> None:
    rules = policy(f'[[rule]]\nwho = "{selector}"\ncall = ["resource"]')
    assert rules.may_call(selected, "resource")
    if not_selected is not None:
        assert not rules.may_call(not_selected, "resource")


def test_selector_list_means_any_of() -> None:
    rules = policy('[[rule]]\nwho = ["instance:2", "instance:4"]\ncall = ["resource"]')
    assert rules.may_call(G2, "resource")
    assert rules.may_call(ep(4), "resource")
    assert not rules.may_call(G3, "resource")


def test_allow_reason_names_the_rule_and_the_file() -> None:
    rules = policy('[[rule]]\nwho = "guest"\nmonitor = true\n[[rule]]\nwho = "*"\ncall = "x"')
    decision = rules.may_call(G2, "x")
    assert decision.reason == "[[rule]] #2 in policy.toml (who = \"*\") allows call 'x'"


def test_allow_rules_grant_each_action_separately() -> None:
    rules = policy('[[rule]]\nwho = "guest"\npublish = ["app.>"]')
    assert rules.may_publish(G2, "app.x")
    assert not rules.may_subscribe(G2, "app.>")
    assert not rules.may_call(G2, "app")


def test_delivery_across_instances_needs_both_sides_allowed() -> None:
    only_publish = policy('[[rule]]\nwho = "instance:2"\npublish = ["app.>"]')
    assert not only_publish.may_deliver(G2, G3, "app.x", "app.>")
    both = policy(
        '[[rule]]\nwho = "instance:2"\npublish = ["app.>"]\n'
        '[[rule]]\nwho = "instance:3"\nsubscribe = ["app.*"]'
    )
    assert both.may_deliver(G2, G3, "app.x", "app.*")


def test_connect_depends_on_the_callers_grant_only() -> None:
    rules = policy('[[rule]]\nwho = "instance:2"\ncall = ["instance.3.agent"]')
    assert rules.may_connect(G2, G3, "instance.3.agent")
    assert not rules.may_connect(G3, G2, "instance.3.agent")


def test_monitor_is_granted_by_a_rule() -> None:
    rules = policy('[[rule]]\nwho = "instance:0 & uid:990"\nmonitor = true')
    assert rules.may_monitor(ep(0, uid=990))
    assert not rules.may_monitor(ep(1, uid=990))


# -- deny rules -------------------------------------------------------------------------------


def test_deny_rule_beats_an_allow_rule() -> None:
    rules = policy(
        '[[rule]]\nwho = "guest"\ncall = [">"]\n[[deny]]\nwho = "instance:3"\ncall = ["upgrade"]'
    )
    decision = rules.may_call(G3, "upgrade")
    assert not decision
    assert decision.reason.startswith('[[deny]] #1 in policy.toml (who = "instance:3")')
    assert rules.may_call(G2, "upgrade")
    assert rules.may_call(G3, "resource")


def test_deny_rule_applies_to_the_host_root_too() -> None:
    rules = policy('[[deny]]\nwho = "*"\nmonitor = true')
    assert not rules.may_monitor(ROOT)


def test_deny_rule_applies_within_an_instance() -> None:
    rules = policy('[[deny]]\nwho = "instance:3"\npublish = ["secret.>"]')
    assert not rules.may_deliver(G3, ep(3), "secret.x", "secret.>")
    assert rules.may_deliver(G3, ep(3), "public.x", "public.>")


def test_denied_subscription_refuses_every_overlapping_pattern() -> None:
    rules = policy('[[deny]]\nwho = "guest"\nsubscribe = ["db.events.>"]')
    assert not rules.may_subscribe(G2, ">", within_instance=True)
    assert not rules.may_subscribe(G2, "db.*.x", within_instance=True)
    assert rules.may_subscribe(G2, "db.state.>", within_instance=True)


# -- subscribe containment and {instance} -----------------------------------------------------


def test_subscription_must_be_contained_in_one_allowed_pattern() -> None:
    rules = policy('[[rule]]\nwho = "guest"\nsubscribe = ["mk.instance.>", "mk.*.*.state"]')
    assert rules.may_subscribe(G2, "mk.instance.*.state")
    assert rules.may_subscribe(G2, "mk.instance.2.>")
    assert not rules.may_subscribe(G2, "mk.>")
    assert not rules.may_subscribe(G2, "*.instance.2.state")


def test_instance_placeholder_expands_to_the_askers_instance() -> None:
    rules = policy('[[rule]]\nwho = "*"\npublish = ["app.{instance}.>"]\ncall = ["svc.{instance}"]')
    assert rules.may_publish(G2, "app.2.x")
    assert not rules.may_publish(G2, "app.3.x")
    assert rules.may_call(G3, "svc.3")
    assert not rules.may_call(G3, "svc.2")


def test_instance_placeholder_is_shown_expanded_in_reasons() -> None:
    rules = policy('[[rule]]\nwho = "*"\npublish = ["app.{instance}.>"]')
    assert "'app.2.>'" in rules.may_publish(G2, "app.2.x").reason


# -- decisions and the cache ------------------------------------------------------------------


def test_decision_is_truthy_iff_allowed() -> None:
    assert Decision(True, "yes")
    assert not Decision(False, "no")


def test_decisions_are_cached() -> None:
    default = Policy.default()
    assert default.may_publish(G2, "app.x") is default.may_publish(ep(2), "app.x")


def test_decision_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_policy, "CACHE_LIMIT", 4)
    default = Policy.default()
    for n in range(10):
        default.may_publish(G2, f"app.{n}")
    assert len(default._cache) <= 4


def test_subscribe_decisions_have_a_smaller_cache_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub keeps each subscription's answer itself, so the policy need not keep 64k of
    them: subscribing to many patterns leaves at most SUBSCRIBE_CACHE_LIMIT behind."""
    monkeypatch.setattr(_policy, "SUBSCRIBE_CACHE_LIMIT", 4)
    default = Policy.default()
    for n in range(10):
        default.may_subscribe(G2, f"app.{n}.*")
    assert len(default._subscribe_cache) <= 4
    assert not default._cache
    assert default.may_subscribe(G2, "app.9.*") is default.may_subscribe(G2, "app.9.*")


def test_invalid_subject_raises_and_is_not_cached() -> None:
    default = Policy.default()
    with pytest.raises(InvalidSubjectError):
        default.may_publish(G2, "app.*")
    with pytest.raises(InvalidSubjectError):
        default.may_publish(G2, "app.*")


def test_policies_from_different_text_decide_differently() -> None:
    grant = '[[rule]]\nwho = "guest"\ncall = ["resource"]'
    assert policy(grant).may_call(G2, "resource")
    assert not policy("").may_call(G2, "resource")


def test_load_reads_a_file_and_names_it_in_reasons(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nwho = "guest"\ncall = ["resource"]\n')
    decision = Policy.load(path).may_call(G2, "resource")
    assert decision
    assert str(path) in decision.reason


# -- malformed files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("who = ", "not valid TOML"),
        (
            '[[rule]]\nwho = "*"\npublsh = ["a"]',
            r"\[\[rule\]\] #1: unknown key 'publsh'; did you mean 'publish'",
        ),
        (
            '[[rule]]\nwho = "*"\ncall = ["a"]\n[[rule]]\nwho = "instance:x"\ncall = ["a"]',
            r"\[\[rule\]\] #2: bad selector 'instance:x'",
        ),
        (
            '[[rule]]\nwho = "instance:2 & bogus"\ncall = ["a"]',
            "bad selector 'bogus' in 'instance:2 & bogus'",
        ),
        (
            '[[deny]]\nwho = "*"\nsubscribe = ["a.>.b"]',
            r"\[\[deny\]\] #1: bad pattern in subscribe: .*'>' at position 2",
        ),
        ('[[rule]]\nwho = "*"\nown = ["db..x"]', "bad pattern in own: .*empty token"),
        ('[[rule]]\nwho = "*"\ncall = ["svc.{inst}"]', r"unknown placeholder \{inst\}"),
        ('[[rule]]\ncall = ["a"]', "missing 'who'"),
        ('[[rule]]\nwho = []\ncall = ["a"]', "empty list"),
        ('[[rule]]\nwho = 3\ncall = ["a"]', "who must be a string or a list of strings, not 3"),
        ('[[rule]]\nwho = "*"\ncall = [1]', "call must be a string or a list of strings"),
        ('[[rule]]\nwho = "*"\nmonitor = "yes"', "monitor must be true or false"),
        ('[[rule]]\nwho = "*"', "grants nothing"),
        ('[[deny]]\nwho = "*"\nmonitor = false', "denies nothing"),
        ('[rule]\nwho = "*"', "'rule' must be an array of tables: write \\[\\[rule\\]\\]"),
        ('[defaults]\nsame_instance = "maybe"', 'same_instance must be "allow" or "deny"'),
        ("[defaults]\nbuiltin_rules = 1", "builtin_rules must be true or false"),
        ('[defaults]\nsame = "allow"', r"\[defaults\]: unknown key 'same'"),
        ('[[allow]]\nwho = "*"', "unknown top-level key 'allow'"),
        ("defaults = 1", "'defaults' must be a table"),
    ],
)
def test_malformed_policy_raises_policy_error_saying_where_and_what(
    text: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=f"^policy.toml: .*{message}"):
        policy(text)


def test_policy_error_is_a_multikernel_error_with_details() -> None:
    with pytest.raises(MultikernelError) as caught:
        policy('[[rule]]\nwho = "*"\ncall = ["a"]\n[[rule]]\nwho = "*"\nown = "a.>.b"')
    assert caught.value.details == {"source": "policy.toml", "where": "[[rule]] #2"}


def test_unreadable_policy_file_raises_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        Policy.load(tmp_path / "missing.toml")


# -- pattern algebra against brute force ------------------------------------------------------

# Patterns use tokens a and b; subjects also use c, a token no pattern names, so '*' is never
# mistaken for a literal. Subjects one token longer than any pattern witness every '>'.
PATTERN_TOKENS = st.sampled_from(["a", "b", "*"])
PATTERNS = st.builds(
    lambda tokens, tail: ".".join([*tokens, *tail]),
    st.lists(PATTERN_TOKENS, min_size=0, max_size=3),
    st.sampled_from([[], [">"]]),
).filter(bool)
SUBJECTS = [".".join(tokens) for n in range(1, 6) for tokens in itertools.product("abc", repeat=n)]


@given(PATTERNS, PATTERNS)
def test_containment_agrees_with_brute_force(outer: str, inner: str) -> None:
    expected = all(subject_matches(outer, s) for s in SUBJECTS if subject_matches(inner, s))
    assert pattern_contains(outer, inner) == expected


@given(PATTERNS, PATTERNS)
def test_overlap_agrees_with_brute_force(first: str, second: str) -> None:
    expected = any(subject_matches(first, s) and subject_matches(second, s) for s in SUBJECTS)
    assert patterns_overlap(first, second) == expected


@pytest.mark.parametrize(
    ("outer", "inner", "contained"),
    [
        (">", "a.b", True),
        ("a.>", "a", False),
        ("a.>", "a.*.>", True),
        ("a.*", "a.>", False),
        ("a.b", "a.*", False),
        ("*.b", "a.b", True),
        ("a.*.>", "a.>", False),
    ],
)
def test_containment_examples(outer: str, inner: str, contained: bool) -> None:
    assert pattern_contains(outer, inner) is contained


# -- the document -----------------------------------------------------------------------------


def test_doc_shows_the_builtin_rules_verbatim() -> None:
    assert BUILTIN_TOML in DOC.read_text()


def test_doc_full_example_parses_and_means_what_it_says() -> None:
    example = re.search(r"A full example:\n\n```toml\n(.*?)```", DOC.read_text(), re.S)
    assert example is not None
    rules = Policy.from_toml(example.group(1), source="docs")
    assert rules.may_connect(G2, ROOT, "resource")
    assert not rules.may_connect(G3, ROOT, "upgrade")
    assert rules.may_connect(ep(4), ep(2), "db.primary")
    assert rules.may_monitor(ep(0, uid=990))
    assert not rules.may_subscribe(G3, "db.events.>", within_instance=True)


_SAMPLE_POLICY = """
[host_only]
subscribe = ["ops.secret.>"]
[[deny]]
who = "instance:3"
subscribe = ["app.private.*"]
publish = ["app.{instance}.x"]
[[rule]]
who = "name:svc.*"
subscribe = ["app.>"]
call = ["resource"]
[[rule]]
who = "guest"
publish = ["app.{instance}.>"]
"""
_words = st.sampled_from(["app", "ops", "mk", "instance", "2", "3", "secret", "private", "x"])


@given(
    tokens=st.lists(st.one_of(_words, st.sampled_from(["*", ">"])), min_size=1, max_size=4),
    who=st.sampled_from([ep(0, 0), ep(2), ep(3), ep(3, names=("svc.a",)), ep(0, 1000)]),
    action=st.sampled_from(["subscribe", "publish", "call", "own"]),
    within=st.booleans(),
)
def test_skipping_the_rules_for_an_unrelated_first_token_decides_as_walking_them(
    tokens: list[str], who: Identity, action: str, within: bool
) -> None:
    """The shortcut (no rule pattern starts with the thing's first token) gives the same
    decision and reason as walking the rules."""
    if ">" in tokens[:-1] or (action != "subscribe" and {"*", ">"} & set(tokens)):
        return  # not a valid pattern or subject
    thing = ".".join(tokens)
    fast, slow = Policy.from_toml(_SAMPLE_POLICY), Policy.from_toml(_SAMPLE_POLICY)
    compile_all = slow._compile
    slow._compile = lambda *args: compile_all(*args)._replace(  # type: ignore[method-assign]
        firsts=_policy._EVERY_TOKEN
    )
    ask = {
        "subscribe": lambda p: p.may_subscribe(who, thing, within_instance=within),
        "publish": lambda p: p.may_publish(who, thing, within_instance=within),
        "call": lambda p: p.may_call(who, thing, within_instance=within),
        "own": lambda p: p.may_own(who, thing),
    }[action]
    assert ask(fast) == ask(slow)
    if action == "subscribe":  # the hub's answers alone agree with the decisions
        expected = (
            bool(slow.may_subscribe(who, thing, within_instance=True)),
            bool(slow.may_subscribe(who, thing)),
        )
        assert fast.subscribe_verdicts(who, thing) == expected
    if action == "publish" and (verdicts := fast.publish_verdicts(who, thing)) is not None:
        expected = (
            bool(slow.may_publish(who, thing, within_instance=True)),
            bool(slow.may_publish(who, thing)),
        )
        assert verdicts == expected
