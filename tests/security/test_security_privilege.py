"""Local users and privilege: what the host actors keep for the host ([host_only])."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from multikernel.bus import Identity, Policy, PolicyError
from multikernel.bus._rules import BUILTIN_HOST_ONLY_TOML
from multikernel.services._host import host_rule

PEER = Path(__file__).with_name("unprivileged.py")
DOC = Path(__file__).parents[2] / "docs" / "access-control.md"
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="running a client as another user (nobody) needs root to setuid"
)
HOST_SERVICES = ("lifecycle", "resource", "fault", "upgrade")


def who(uid: int, instance: int = 0) -> Identity:
    return Identity(endpoint_id=1, instance=instance, uid=uid, pid=1, name="t")


def denial(uid: int, verb: str, thing: str, held: str, key: str) -> str:
    return (
        f"permission denied: instance 0 (uid {uid}) may not {verb} {thing!r}: [host_only] keeps "
        f"{held!r} for the host's own user and root (grant it in the policy with [[rule]] "
        f'who = "instance:0 & uid:{uid}" {key} = ["{thing}"])'
    )


# -- the policy: what [host_only] holds back from the same-instance default --------------------


@pytest.mark.parametrize("service", HOST_SERVICES)
def test_a_local_user_may_not_call_the_host_actors(service: str) -> None:
    decision = Policy.default().may_call(who(1000), service, within_instance=True)
    assert not decision
    assert decision.reason == denial(1000, "call", service, service, "call")


@pytest.mark.parametrize("service", HOST_SERVICES)
def test_root_and_the_hosts_own_user_may_call_the_host_actors(service: str) -> None:
    assert Policy.default().may_call(who(0), service, within_instance=True)
    hosts = Policy.from_toml(host_rule(1000))  # what a host run by uid 1000 appends
    assert hosts.may_call(who(1000), service, within_instance=True)
    assert not hosts.may_call(who(1001), service, within_instance=True)


def test_the_denial_names_the_rule_that_would_grant_it_and_that_rule_does() -> None:
    reason = Policy.default().may_call(who(1000), "lifecycle", within_instance=True).reason
    rule = reason.split("(grant it in the policy with ")[1].removesuffix(")")
    granted = Policy.from_toml(rule.replace("[[rule]] ", "[[rule]]\n").replace('" call', '"\ncall'))
    assert granted.may_call(who(1000), "lifecycle", within_instance=True)
    assert not granted.may_call(who(1001), "lifecycle", within_instance=True)


def test_other_services_on_the_instance_stay_open_to_its_users() -> None:
    assert Policy.default().may_call(who(1000), "db", within_instance=True)


def test_a_local_user_may_not_speak_for_an_instance() -> None:
    """Hellos and state changes on mk.instance.<n>.* are what the lifecycle actor believes."""
    policy = Policy.default()
    decision = policy.may_publish(who(1000), "mk.instance.3.hello", within_instance=True)
    assert decision.reason == denial(
        1000, "publish", "mk.instance.3.hello", "mk.instance.>", "publish"
    )
    assert policy.may_publish(who(1000), "mk.instance.0.note", within_instance=True)  # its own
    assert policy.may_publish(who(0, instance=3), "mk.instance.3.hello")  # a guest, its own
    assert policy.may_subscribe(who(1000), "mk.instance.*.state", within_instance=True)


def test_a_file_adds_to_host_only_and_cannot_take_the_builtin_away() -> None:
    policy = Policy.from_toml('[host_only]\ncall = ["billing"]\nsubscribe = ["audit.>"]\n')
    assert not policy.may_call(who(1000), "billing", within_instance=True)
    assert not policy.may_call(who(1000), "lifecycle", within_instance=True)
    assert not policy.may_subscribe(who(1000), ">", within_instance=True)  # overlaps audit.>
    assert policy.may_subscribe(who(1000), "app.>", within_instance=True)
    bare = Policy.from_toml("[defaults]\nbuiltin_rules = false\n")
    assert not bare.may_call(who(1000), "lifecycle", within_instance=True)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[host_only]\nown = ["x"]', "[host_only]: unknown key 'own'"),
        ('host_only = ["x"]', "'host_only' must be a table"),
        ('[host_only]\ncall = ["a.>.b"]', "[host_only]: bad pattern in call"),
    ],
)
def test_a_bad_host_only_table_is_refused_at_load(text: str, error: str) -> None:
    with pytest.raises(PolicyError, match=error.replace("[", r"\[").replace(".", r"\.")):
        Policy.from_toml(text, source="policy.toml")


def test_the_doc_shows_the_builtin_host_only_table_verbatim() -> None:
    assert BUILTIN_HOST_ONLY_TOML in DOC.read_text()
