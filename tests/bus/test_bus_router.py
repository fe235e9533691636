"""SubjectRouter: wildcard matching, queue groups, cache exactness, validation, statistics."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.bus._router import RouterStatistics, SubjectRouter, Subscription
from multikernel.protocol import InvalidSubjectError, subject_matches


def _router(*subscriptions: tuple[str, str] | tuple[str, str, str]) -> SubjectRouter[str]:
    router: SubjectRouter[str] = SubjectRouter()
    for key, pattern, *group in subscriptions:
        router.subscribe(key, pattern, *group)
    return router


# --- wildcards -------------------------------------------------------------------------------


def test_literal_pattern_matches_only_its_subject() -> None:
    router = _router(("a", "mk.instance.3.state"))
    assert router.match("mk.instance.3.state") == ["a"]
    assert router.match("mk.instance.4.state") == []
    assert router.match("mk.instance.3") == []
    assert router.match("mk.instance.3.state.x") == []


def test_star_matches_exactly_one_token() -> None:
    router = _router(("a", "mk.*.state"))
    assert router.match("mk.instance.state") == ["a"]
    assert router.match("mk.state") == []
    assert router.match("mk.a.b.state") == []


def test_greater_than_matches_one_or_more_trailing_tokens() -> None:
    router = _router(("a", "mk.>"))
    assert router.match("mk.x") == ["a"]
    assert router.match("mk.x.y.z") == ["a"]
    assert router.match("mk") == []
    assert router.match("other.x") == []


def test_lone_greater_than_matches_every_subject() -> None:
    router = _router(("a", ">"))
    assert router.match("x") == ["a"]
    assert router.match("x.y.z") == ["a"]


def test_overlapping_patterns_each_receive_once() -> None:
    router = _router(
        ("lit", "mk.instance.3.state"),
        ("star", "mk.instance.*.state"),
        ("star2", "mk.*.*.state"),
        ("tail", "mk.>"),
        ("tail2", "mk.instance.>"),
        ("miss", "mk.instance.*"),
    )
    assert sorted(router.match("mk.instance.3.state")) == ["lit", "star", "star2", "tail", "tail2"]


# --- queue groups ----------------------------------------------------------------------------


def test_queue_group_delivers_to_exactly_one_member() -> None:
    router = _router(("plain", "svc.x"), ("w1", "svc.x", "workers"), ("w2", "svc.x", "workers"))
    for _ in range(10):
        found = router.match("svc.x")
        assert "plain" in found
        assert len(found) == 2
        assert len({"w1", "w2"} & set(found)) == 1


def test_queue_group_rotates_evenly_in_subscription_order() -> None:
    router = _router(*((f"w{i}", "svc.x", "workers") for i in range(3)))
    picks = [router.match("svc.x")[0] for _ in range(300)]
    assert picks[:4] == ["w0", "w1", "w2", "w0"]
    assert Counter(picks) == {"w0": 100, "w1": 100, "w2": 100}


def test_queue_group_rotates_without_cache_reuse() -> None:
    router: SubjectRouter[str] = SubjectRouter(cache_size=0)
    for i in range(4):
        router.subscribe(f"w{i}", "svc.*", "workers")
    picks = [router.match(f"svc.r{n}")[0] for n in range(400)]
    assert Counter(picks) == {f"w{i}": 100 for i in range(4)}


def test_queue_group_rotates_evenly_per_subject_when_subjects_interleave() -> None:
    router = _router(("a", "svc.*", "workers"), ("b", "svc.*", "workers"))
    per_subject: dict[str, Counter[str]] = {"svc.x": Counter(), "svc.y": Counter()}
    for _ in range(100):
        for subject, counts in per_subject.items():
            counts.update(router.match(subject))
    assert per_subject["svc.x"] == {"a": 50, "b": 50}
    assert per_subject["svc.y"] == {"a": 50, "b": 50}


def test_queue_group_spans_different_patterns() -> None:
    router = _router(
        ("exact", "svc.x.get", "workers"),
        ("star", "svc.x.*", "workers"),
        ("tail", "svc.>", "workers"),
        ("other", "svc.y.*", "workers"),
    )
    picks = [router.match("svc.x.get") for _ in range(300)]
    assert all(len(found) == 1 for found in picks)
    assert Counter(found[0] for found in picks) == {"exact": 100, "star": 100, "tail": 100}


def test_groups_with_the_same_name_are_one_group_and_different_names_are_independent() -> None:
    router = _router(("a1", "s.*", "a"), ("a2", "s.x", "a"), ("b1", "s.>", "b"))
    found = router.match("s.x")
    assert len(found) == 2
    assert "b1" in found
    assert len({"a1", "a2"} & set(found)) == 1


def test_match_filtered_drops_rejected_plain_keys() -> None:
    router = _router(("keep", "s.x"), ("drop", "s.*"))
    assert router.match_filtered("s.x", lambda key: key != "drop") == ["keep"]


def test_match_filtered_passes_a_rejected_members_turn_to_the_next() -> None:
    router = _router(*((f"w{i}", "s.x", "g") for i in range(3)))
    picks = [router.match_filtered("s.x", lambda key: key != "w1") for _ in range(100)]
    assert all(len(found) == 1 for found in picks)
    assert Counter(found[0] for found in picks) == {"w0": 50, "w2": 50}


def test_match_filtered_turns_continue_in_order_after_the_cache_is_dropped() -> None:
    router = _router(*((f"w{i}", "s.x", "g") for i in range(3)))
    assert router.match_filtered("s.x", lambda key: True) == ["w0"]
    router.subscribe("other", "t.*")  # a wildcard subscription drops every cached match
    assert [router.match_filtered("s.x", lambda key: True) for _ in range(3)] == [
        ["w1"], ["w2"], ["w0"],
    ]  # fmt: skip


def test_match_filtered_skips_a_group_with_no_allowed_member() -> None:
    router = _router(("p", "s.x"), ("w", "s.x", "g"))
    assert router.match_filtered("s.x", lambda key: key == "p") == ["p"]


# --- unsubscribe -----------------------------------------------------------------------------


def test_unsubscribe_stops_delivery_and_reports_whether_key_existed() -> None:
    router = _router(("a", "s.*"), ("b", "s.x"))
    assert router.unsubscribe("a") is True
    assert router.match("s.x") == ["b"]
    assert router.unsubscribe("a") is False
    assert len(router) == 1


def test_unsubscribe_removes_member_from_group_rotation() -> None:
    router = _router(("w1", "s.x", "g"), ("w2", "s.x", "g"))
    router.unsubscribe("w1")
    assert {router.match("s.x")[0] for _ in range(5)} == {"w2"}


def test_unsubscribe_prunes_the_trie_and_forgets_empty_groups() -> None:
    router = _router(("a", "mk.instance.*.state", "g"), ("b", "mk.>"))
    router.unsubscribe("a")
    router.unsubscribe("b")
    stats = router.statistics()
    assert (stats.trie_nodes, stats.queue_groups, stats.subscriptions) == (0, 0, 0)


@pytest.mark.parametrize("token", ["1", "-x", "09", "z"])  # tokens before and after '>'
def test_unsubscribing_a_literal_beside_a_full_wildcard_keeps_the_wildcard(token: str) -> None:
    router = _router(("all", "s.>"), ("one", f"s.{token}"))
    router.unsubscribe("one")
    assert router.match("s.other") == ["all"]
    assert router.match(f"s.{token}") == ["all"]
    assert router.statistics().trie_nodes == 2  # s and its '>'; the literal's node is gone


def test_unsubscribe_keeps_shared_prefix_nodes() -> None:
    router = _router(("a", "mk.*.y"), ("b", "mk.*"))
    router.unsubscribe("a")
    assert router.statistics().trie_nodes == 2
    assert router.match("mk.x") == ["b"]


def test_literal_patterns_live_outside_the_trie_and_leave_with_their_last_subscription() -> None:
    router = _router(("a", "mk.x.y"), ("b", "mk.x"), ("c", "mk.x", "g"))
    stats = router.statistics()
    assert (stats.trie_nodes, stats.literal_subjects) == (0, 2)
    router.unsubscribe("b")
    assert router.statistics().literal_subjects == 2  # c still holds mk.x
    router.unsubscribe("c")
    router.unsubscribe("a")
    assert router.statistics().literal_subjects == 0


# --- the cache -------------------------------------------------------------------------------


def test_repeated_subject_is_served_from_the_cache() -> None:
    router = _router(("a", "s.*"))
    router.match("s.x")
    router.match("s.x")
    stats = router.statistics()
    assert (stats.cache_misses, stats.cache_hits, stats.cache_entries) == (1, 1, 1)


def test_cached_subject_sees_new_wildcard_subscription() -> None:
    router = _router(("a", "s.x"))
    assert router.match("s.x") == ["a"]
    router.subscribe("b", "s.>")
    assert sorted(router.match("s.x")) == ["a", "b"]


def test_cached_subject_sees_new_literal_subscription_and_others_stay_cached() -> None:
    router = _router(("a", "s.*"))
    router.match("s.x")
    router.match("s.y")
    router.subscribe("b", "s.x")
    assert router.statistics().cache_entries == 1
    assert sorted(router.match("s.x")) == ["a", "b"]
    assert router.match("s.y") == ["a"]


def test_cached_subject_forgets_unsubscribed_keys() -> None:
    router = _router(("a", "s.*"), ("b", "s.x"), ("c", "s.x", "g"))
    router.match("s.x")
    router.unsubscribe("b")
    router.unsubscribe("c")
    assert router.match("s.x") == ["a"]
    router.unsubscribe("a")
    assert router.match("s.x") == []


def test_cache_stays_within_its_bound() -> None:
    router: SubjectRouter[str] = SubjectRouter(cache_size=8)
    router.subscribe("a", ">")
    for n in range(100):
        assert router.match(f"s.{n}") == ["a"]
    assert router.statistics().cache_entries == 8


def test_the_default_cache_holds_4096_subjects() -> None:
    """The bound docs/security.md gives for a publisher of endless subjects."""
    router: SubjectRouter[str] = SubjectRouter()
    router.subscribe("a", ">")
    for n in range(4097):
        router.match(f"s.{n}")
    assert router.statistics().cache_entries == 4096


def test_zero_cache_size_disables_the_cache() -> None:
    router: SubjectRouter[str] = SubjectRouter(cache_size=0)
    router.subscribe("a", "s.*")
    router.match("s.x")
    router.match("s.x")
    stats = router.statistics()
    assert (stats.cache_entries, stats.cache_hits, stats.cache_misses) == (0, 0, 2)


def test_literal_subjects_need_no_cache_while_there_is_no_wildcard() -> None:
    router = _router(("a", "s.x"), ("b", "s.x", "g"))
    for n in range(10_000):
        assert router.match(f"s.{n}") == []
    assert router.match("s.x") == ["a", "b"]
    stats = router.statistics()
    assert (stats.cache_entries, stats.cache_hits, stats.cache_misses) == (0, 0, 0)


def test_negative_cache_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        SubjectRouter(cache_size=-1)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "a.b*", "a.>>", ".a", "a b", "é"])
def test_invalid_pattern_raises_and_changes_nothing(pattern: str) -> None:
    router: SubjectRouter[str] = SubjectRouter()
    with pytest.raises(InvalidSubjectError):
        router.subscribe("a", pattern)
    assert len(router) == 0
    assert router.statistics().trie_nodes == 0


@pytest.mark.parametrize("group", ["", "a.b", "*", ">", "a b"])
def test_invalid_queue_group_raises(group: str) -> None:
    router: SubjectRouter[str] = SubjectRouter()
    with pytest.raises(InvalidSubjectError, match="queue group"):
        router.subscribe("a", "s.x", group)


@pytest.mark.parametrize("subject", ["s.*", "s.>", "", "s..x"])
def test_invalid_subject_raises_on_match(subject: str) -> None:
    router = _router(("a", ">"))
    with pytest.raises(InvalidSubjectError):
        router.match(subject)


def test_duplicate_key_raises_and_keeps_the_first_subscription() -> None:
    router = _router(("a", "s.x"))
    with pytest.raises(ValueError, match="already in use"):
        router.subscribe("a", "s.y")
    assert list(router.subscriptions()) == [Subscription("a", "s.x", None)]


def test_key_can_be_reused_after_unsubscribe() -> None:
    router = _router(("a", "s.x"))
    router.unsubscribe("a")
    router.subscribe("a", "s.y")
    assert router.match("s.y") == ["a"]


# --- introspection ---------------------------------------------------------------------------


def test_keys_subscriptions_len_and_contains_list_what_was_subscribed() -> None:
    router: SubjectRouter[tuple[int, int]] = SubjectRouter()
    router.subscribe((1, 1), "s.x")
    router.subscribe((2, 1), "s.*", "g")
    assert len(router) == 2
    assert (2, 1) in router
    assert list(router.keys()) == [(1, 1), (2, 1)]
    assert list(router.subscriptions()) == [((1, 1), "s.x", None), ((2, 1), "s.*", "g")]


def test_statistics_count_subscriptions_groups_and_nodes() -> None:
    router = _router(("a", "mk.instance.*.state"), ("b", "mk.>", "g"), ("c", "mk.x", "g"))
    assert router.statistics() == RouterStatistics(
        subscriptions=3,
        queue_groups=1,
        trie_nodes=5,  # mk, instance, *, state, >; mk.x is a literal subject
        cache_entries=0,
        cache_hits=0,
        cache_misses=0,
        literal_subjects=1,
    )


def test_statistics_are_a_frozen_snapshot() -> None:
    stats = _router(("a", "s.x")).statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.subscriptions = 2  # type: ignore[misc]


# --- property: the router agrees with the reference matcher ----------------------------------

_tokens = st.sampled_from(["a", "b", "c"])
_pattern = st.builds(
    lambda body, tail: ".".join(body + tail),
    st.lists(st.one_of(_tokens, st.just("*")), min_size=0, max_size=3),
    st.sampled_from([[], [], [">"]]),
).filter(bool)
_subject = st.lists(_tokens, min_size=1, max_size=4).map(".".join)
_subscriptions = st.lists(
    st.tuples(_pattern, st.sampled_from([None, None, "g1", "g2"])), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(
    subscriptions=_subscriptions,
    subjects=st.lists(_subject, min_size=1, max_size=6),
    removed=st.sets(st.integers(0, 11), max_size=3),
)
def test_router_agrees_with_brute_force_subject_matches(
    subscriptions: list[tuple[str, str | None]], subjects: list[str], removed: set[int]
) -> None:
    router: SubjectRouter[int] = SubjectRouter(cache_size=4)
    for key, (pattern, group) in enumerate(subscriptions):
        router.subscribe(key, pattern, group)
    for subject in subjects:  # fill the cache before removing, so removal must invalidate it
        router.match(subject)
    live = dict(enumerate(subscriptions))
    for key in removed:
        assert router.unsubscribe(key) is (live.pop(key, None) is not None)
    for subject in subjects * 2:  # twice: misses, then (mostly) cache hits
        found = router.match(subject)
        assert len(found) == len(set(found))
        matching = {key: group for key, (p, group) in live.items() if subject_matches(p, subject)}
        plain = {key for key, group in matching.items() if group is None}
        assert {key for key in found if live[key][1] is None} == plain
        for name in {"g1", "g2"}:
            members = {key for key, group in matching.items() if group == name}
            chosen = [key for key in found if live[key][1] == name]
            assert len(chosen) == (1 if members else 0)
            assert set(chosen) <= members


_literal_pattern = st.lists(_tokens, min_size=1, max_size=3).map(".".join)
_op = st.one_of(
    st.tuples(st.just("subscribe"), st.integers(0, 15), st.one_of(_literal_pattern, _pattern),
              st.sampled_from([None, None, "g1", "g2"])),
    st.tuples(st.just("unsubscribe"), st.integers(0, 15), st.just(""), st.none()),
    st.tuples(st.just("match"), st.integers(0, 0), _subject, st.none()),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_op, max_size=40), cache_size=st.sampled_from([0, 2, 4096]))
def test_router_agrees_with_a_naive_matcher_through_any_interleaving(
    ops: list[tuple[str, int, str, str | None]], cache_size: int
) -> None:
    """Subscribes, unsubscribes and matches in any order, literal-only stretches included (the
    dict path) and wildcard ones (trie and cache): the same plain keys as a loop over every
    subscription, one matching member per group, and an empty router at the end."""
    router: SubjectRouter[int] = SubjectRouter(cache_size=cache_size)
    live: dict[int, tuple[str, str | None]] = {}
    for op, key, text, group in ops:
        if op == "subscribe" and key not in live:
            router.subscribe(key, text, group)
            live[key] = (text, group)
        elif op == "unsubscribe":
            assert router.unsubscribe(key) is (live.pop(key, None) is not None)
        elif op == "match":
            found = router.match(text)
            matching = {k: g for k, (p, g) in live.items() if subject_matches(p, text)}
            assert sorted(k for k in found if live[k][1] is None) == sorted(
                k for k, g in matching.items() if g is None
            )
            for name in ("g1", "g2"):
                chosen = [k for k in found if live[k][1] == name]
                members = {k for k, g in matching.items() if g == name}
                assert len(chosen) == (1 if members else 0)
                assert set(chosen) <= members
    for key in list(live):
        router.unsubscribe(key)
    stats = router.statistics()
    assert (stats.subscriptions, stats.trie_nodes, stats.literal_subjects, stats.queue_groups) == (
        0, 0, 0, 0,
    )  # fmt: skip


# --- memory ----------------------------------------------------------------------------------


def _traced(action: Callable[[], object]) -> int:
    """Bytes allocated by ``action`` and still held after it."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    action()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


@pytest.mark.parametrize("pattern", ["svc.s{}.get", "svc.s{}.*"])
def test_ten_thousand_subscriptions_are_small_and_their_memory_comes_back(pattern: str) -> None:
    count = 10_000
    patterns = [pattern.format(n) for n in range(count)]
    keys = [(1, n) for n in range(count)]
    router: SubjectRouter[tuple[int, int]] = SubjectRouter()
    router.subscribe((0, 0), "x.y")
    router.match("x.y")
    tracemalloc.start()
    try:
        held = _traced(
            lambda: [router.subscribe(k, p) for k, p in zip(keys, patterns, strict=True)]
        )
        kept = _traced(lambda: [router.unsubscribe(k) for k in keys])
    finally:
        tracemalloc.stop()
    per_subscription = held / count
    limit = 200 if "*" not in pattern else 800  # literal: two dict slots and a holder
    assert per_subscription < limit, f"{per_subscription:.0f} bytes per subscription"
    assert held + kept < 32 << 10, f"{held + kept} bytes kept after unsubscribing all"
