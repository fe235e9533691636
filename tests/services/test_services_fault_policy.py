"""Restart policies like OTP's: modes, intensity and period, back-off with jitter, groups."""

from __future__ import annotations

import msgspec
import pytest

from multikernel.protocol import RestartPolicy, format_restart, parse_restart
from multikernel.services._fault_policy import Member, decide, group_members, restart_key


def member(name: str, id: int, policy: RestartPolicy | None = None) -> Member:
    return Member(name, id, policy or RestartPolicy())


@pytest.mark.parametrize(
    ("mode", "cause", "restarted"),
    [
        ("permanent", "crashed", True),
        ("permanent", "exited", True),
        ("permanent", "hang", True),
        ("transient", "crashed", True),
        ("transient", "hang", True),
        ("transient", "garbage", True),
        ("transient", "lost", True),
        ("transient", "exited", False),
        ("temporary", "crashed", False),
        ("temporary", "hang", False),
        ("permanent", "requested", False),
    ],
)
def test_the_mode_says_which_ends_are_restarted(mode: str, cause: str, restarted: bool) -> None:
    me = member("a", 1, RestartPolicy(mode))  # type: ignore[arg-type]
    decision = decide(me, cause, recent=0, others=[me], jitter=1.0)
    assert (decision.action == "restart") is restarted


def test_past_the_intensity_it_gives_up() -> None:
    me = member("a", 1, RestartPolicy("permanent", intensity=3, period=10.0))
    assert decide(me, "crashed", recent=2, others=[me], jitter=1.0).action == "restart"
    decision = decide(me, "crashed", recent=3, others=[me], jitter=1.0)
    assert decision.action == "give-up"
    assert "3 restarts of a in the last 10 s (intensity 3)" in decision.reason


def test_intensity_zero_never_restarts_but_reports() -> None:
    me = member("a", 1, RestartPolicy("permanent", intensity=0))
    assert decide(me, "crashed", recent=0, others=[me], jitter=1.0).action == "give-up"


def test_the_first_restart_is_immediate_then_the_delay_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy("permanent", intensity=100, backoff=0.1, backoff_max=1.0)
    me = member("a", 1, policy)
    delays = [decide(me, "crashed", recent=n, others=[me], jitter=1.0).delay for n in range(7)]
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_jitter_keeps_a_delay_between_half_and_all_of_it(jitter: float) -> None:
    me = member("a", 1, RestartPolicy("permanent", backoff=0.4, backoff_max=10.0))
    delay = decide(me, "crashed", recent=1, others=[me], jitter=jitter).delay
    assert 0.2 <= delay <= 0.4


def test_restarts_are_counted_per_group() -> None:
    policy = RestartPolicy("permanent", group="web")
    assert restart_key("a", policy) == "group:web"
    assert restart_key("a", RestartPolicy()) == "a"


GROUP = [
    member("db", 1, RestartPolicy("permanent", group="g", strategy="rest-for-one")),
    member("cache", 2, RestartPolicy("permanent", group="g", strategy="rest-for-one")),
    member("web", 3, RestartPolicy("permanent", group="g", strategy="rest-for-one")),
    member("other", 4, RestartPolicy("permanent")),
]


def with_strategy(m: Member, strategy: str) -> Member:
    return Member(m.name, m.id, msgspec.structs.replace(m.policy, strategy=strategy))


def test_one_for_one_restarts_the_failed_member_alone() -> None:
    assert group_members(with_strategy(GROUP[1], "one-for-one"), GROUP) == ()


def test_one_for_all_restarts_every_other_member_in_start_order() -> None:
    assert group_members(with_strategy(GROUP[2], "one-for-all"), GROUP) == ("db", "cache")


def test_rest_for_one_restarts_the_members_started_after_it() -> None:
    assert group_members(GROUP[0], GROUP) == ("cache", "web")
    assert group_members(GROUP[1], GROUP) == ("web",)
    assert group_members(GROUP[2], GROUP) == ()


def test_giving_up_on_a_group_member_names_the_members_it_takes_along() -> None:
    policy = RestartPolicy("permanent", intensity=1, group="g", strategy="one-for-all")
    failed = Member("db", 1, policy)
    decision = decide(failed, "crashed", recent=1, others=GROUP, jitter=1.0)
    assert (decision.action, decision.members, decision.key) == (
        "give-up", ("cache", "web"), "group:g",
    )  # fmt: skip


# -- the policy's text form (mkctl create --restart=...) -------------------------------------


def test_the_text_form_round_trips() -> None:
    text = "permanent,intensity=3,period=30,backoff=0.5,group=web,strategy=one-for-all,standby"
    policy = parse_restart(text)
    assert policy == RestartPolicy(
        "permanent", 3, 30.0, 0.5, group="web", strategy="one-for-all", standby=True
    )
    assert format_restart(policy) == text
    assert format_restart(RestartPolicy()) == "transient"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "start with one of permanent, transient, temporary"),
        ("always", "start with one of"),
        ("permanent,intensity=many", "intensity needs a number"),
        ("permanent,speed=3", "'speed=3' is not KEY=VALUE"),
        ("permanent,backoff=5,backoff_max=1", "backoff_max (1.0) is below backoff (5.0)"),
        ("permanent,strategy=all-for-one", "Invalid enum value 'all-for-one'"),
        ("permanent,group=Bad_Group", "group"),
        ("permanent,period=0", "period"),
        ("permanent,period=inf", "period must be finite"),
    ],
)
def test_a_bad_policy_text_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_restart(text)


def test_a_policy_from_an_older_peer_gets_the_defaults() -> None:
    """Schema evolution: a CreateInstance without `restart` decodes with the default policy."""
    from multikernel.protocol import CreateInstance

    old = msgspec.msgpack.encode({"name": "web", "memory": 1 << 27})
    assert msgspec.msgpack.decode(old, type=CreateInstance).restart == RestartPolicy()
    new = msgspec.msgpack.encode(CreateInstance("web", restart=RestartPolicy("permanent")))
    assert msgspec.msgpack.decode(new, type=dict)["restart"] == {"mode": "permanent"}
