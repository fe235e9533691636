"""Cache partitioning through resctrl: detection, the share rule, groups, against a fake resctrl.

This machine has no resctrl, so everything but the "absent" path runs against `FakeResctrl`,
which refuses what the kernel refuses: a write order the kernel would reject fails here too.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multikernel.services._cache_masks import is_contiguous, reserved, ways
from multikernel.services._resctrl import (
    NO_RESCTRL,
    ResctrlFs,
    ResctrlInfo,
    parse_schemata,
    probe_resctrl,
)
from multikernel.services._resctrl_groups import ResctrlError, ResctrlGroups
from multikernel.services.testing import FakeResctrl

HOST = "multikernel/host-1a2b3c4d"
OTHER_HOST = "multikernel/host-5e6f7a8b"


def info_of(fake: FakeResctrl) -> ResctrlInfo:
    info = probe_resctrl(fake)
    assert isinstance(info, ResctrlInfo), info
    return info


def groups_of(fake: FakeResctrl, group: str = HOST, **kw: int) -> ResctrlGroups:
    return ResctrlGroups(info_of(fake), fake, group, **kw)


def one_socket(root: Path, **kw: int) -> FakeResctrl:
    """8 CPUs sharing one L3 of 11 ways (an Intel Xeon's 0x7ff)."""
    return FakeResctrl(root).cache("L3", domains={0: range(8)}, **kw)


def dir_of(name: str, group: str = HOST) -> str:
    return f"{group.replace('/', '.')}.{name}"


# --- detection --------------------------------------------------------------------------------


@pytest.mark.skipif(Path("/sys/fs/resctrl").exists(), reason="this machine has resctrl")
def test_this_machine_has_no_resctrl_and_says_so() -> None:
    assert probe_resctrl(ResctrlFs()) == NO_RESCTRL
    assert NO_RESCTRL == "no resctrl on this machine: cache and memory bandwidth are shared"


def test_resctrl_not_mounted_says_how_to_mount_it(tmp_path: Path) -> None:
    found = probe_resctrl(FakeResctrl(tmp_path, mounted=False))
    assert found == (
        "resctrl is not mounted (mount -t resctrl resctrl /sys/fs/resctrl): cache and memory "
        "bandwidth are shared"
    )


def test_monitoring_only_resctrl_has_nothing_to_partition(tmp_path: Path) -> None:
    found = probe_resctrl(FakeResctrl(tmp_path))
    assert found == (
        "resctrl here has no cache allocation (monitoring only): cache and memory bandwidth are "
        "shared"
    )


def test_capabilities_are_read_per_cache_domain(tmp_path: Path) -> None:
    fake = (
        FakeResctrl(tmp_path)
        .cache(
            "L3",
            cbm_mask=0xFFFFF,
            min_cbm_bits=2,
            num_closids=16,
            shareable_bits=0xC0000,
            domains={0: range(0, 4), 1: range(4, 8)},
        )
        .cache(
            "L2", cbm_mask=0xFF, num_closids=8, domains={i: (2 * i, 2 * i + 1) for i in range(4)}
        )
        .bandwidth(min_bandwidth=10, granularity=10, num_closids=8)
    )
    info = info_of(fake)
    l3 = info.caches["L3"]
    assert (l3.cbm_mask, l3.min_cbm_bits, l3.shareable_bits) == (0xFFFFF, 2, 0xC0000)
    assert l3.domains == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
    assert l3.budget == 20 - 2 - 2  # the shareable ways and the default group's floor
    assert info.caches["L2"].domains[3] == {6, 7}
    assert info.bandwidth is not None
    assert (info.bandwidth.min_bandwidth, info.bandwidth.granularity) == (10, 10)
    assert info.bandwidth.domains == (0, 1)
    assert info.num_closids == 8  # the smallest of any resource
    assert info.describe().endswith(
        "L2 8 ways (min 1) in 4 domain(s), L3 20 ways (min 2) in 2 domain(s), "
        "MB 10-100% in steps of 10, 8 CLOSIDs"
    )


def test_schemata_are_parsed_as_the_kernel_prints_them() -> None:
    amd = "    MB:0=2048;1=  16\n    L3:0=ffff;1=ffff\n"
    assert parse_schemata(amd) == {"MB": {0: "2048", 1: "16"}, "L3": {0: "ffff", 1: "ffff"}}
    assert parse_schemata("L3DATA:0=fffff;1=fffff\nL3CODE:0=3c0\n")["L3CODE"] == {0: "3c0"}


# --- the share and where it goes -------------------------------------------------------------


def test_an_instance_gets_its_cpu_share_exclusively(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    cache = groups_of(fake)
    share = cache.create("web", frozenset({0, 1, 2, 3}))
    # 4 of 8 CPUs: half of the 10 ways that may be given (11, less the default group's one),
    # at the top; the default group (everything else on the machine) keeps the rest.
    assert share.masks == {"L3": {0: 0x7C0}}
    assert share.ways() == {0: 5}
    assert share.describe() == "L3 0=0x7c0 (5 ways)"
    assert fake.masks(dir_of("web")) == {0: 0x7C0}
    assert fake.masks() == {0: 0x03F}
    assert fake.mode(dir_of("web")) == "exclusive"  # the kernel keeps every other group out
    db = cache.create("db", frozenset({4}))
    assert db.masks["L3"] == {0: 0x020}  # 1 of 8 CPUs: 10 // 8 ways, just below web's
    assert fake.masks() == {0: 0x01F}


def test_reclaim_gives_the_ways_back(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    cache = groups_of(fake)
    cache.create("web", frozenset({0, 1}))
    cache.create("db", frozenset({2, 3}))
    cache.remove("web")
    assert fake.groups() == [dir_of("db")]
    assert fake.masks() == {0: 0x07F}  # the default group: every way from 0 up to db's
    cache.remove("db")
    cache.remove("db")  # idempotent
    assert fake.groups() == []
    assert fake.masks() == {0: 0x7FF}


def test_a_domain_without_the_instances_cpus_gets_the_shared_placeholder(tmp_path: Path) -> None:
    fake = FakeResctrl(tmp_path).cache("L3", domains={0: range(4), 1: range(4, 8)})
    cache = groups_of(fake)
    web = cache.create("web", frozenset({0, 1, 2, 3}))
    db = cache.create("db", frozenset({4, 5, 6, 7}))
    # Each gets the whole budget of its own socket, and the reserved way on the other (a group
    # needs a mask everywhere; its tasks never fill a cache they do not run beside).
    assert web.masks["L3"] == {0: 0x7FE, 1: 0x001}
    assert db.masks["L3"] == {0: 0x001, 1: 0x7FE}
    assert fake.masks() == {0: 0x001, 1: 0x001}
    assert fake.mode(dir_of("web")) == "shareable"  # the placeholder is shared


def test_shareable_ways_are_never_given(tmp_path: Path) -> None:
    fake = one_socket(tmp_path, shareable_bits=0x600)
    share = groups_of(fake).create("web", frozenset(range(8)))
    assert share.masks["L3"] == {0: 0x1FE}  # all 8 ways between the floor and the I/O ways
    assert fake.masks() == {0: 0x001}


def test_resize_grows_and_shrinks_in_place(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    cache = groups_of(fake)
    assert cache.create("web", frozenset({0, 1})).masks["L3"] == {0: 0x600}
    grown = cache.resize("web", frozenset({0, 1, 2, 3}))
    assert grown is not None
    assert grown.masks["L3"] == {0: 0x7C0}  # around what it had
    shrunk = cache.resize("web", frozenset({0}))
    assert shrunk is not None
    assert shrunk.masks["L3"] == {0: 0x400}  # the top of what it had
    assert fake.masks() == {0: 0x3FF}
    assert cache.resize("nobody", frozenset({0})) is None  # no group: not running


def test_resize_moves_when_it_cannot_grow_in_place(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    cache = groups_of(fake)
    cache.create("web", frozenset({0, 1}))  # 0x600
    cache.create("db", frozenset({2}))  # 0x100, just below
    grown = cache.resize("web", frozenset({0, 1, 4, 5}))
    assert grown is not None
    assert grown.masks["L3"] == {0: 0x0F8}  # 5 ways below db's (the kernel saw no overlap)
    assert fake.masks() == {0: 0x007}


def test_memory_bandwidth_is_rounded_up_to_a_step(tmp_path: Path) -> None:
    fake = FakeResctrl(tmp_path).cache("L3", domains={0: range(4), 1: range(4, 8)}).bandwidth()
    share = groups_of(fake, bandwidth=35).create("web", frozenset({0}))
    assert share.bandwidth == {0: 40, 1: 40}
    assert fake.bandwidths() == {0: 100, 1: 100}  # the default group is not throttled


def test_memory_bandwidth_in_other_units_is_left_alone(tmp_path: Path) -> None:
    fake = one_socket(tmp_path).bandwidth(percent=False)  # AMD: eighths of GB/s, up to 2048
    share = groups_of(fake, bandwidth=50).create("web", frozenset({0}))
    assert share.bandwidth == {0: 2048}


# --- what cannot be done ----------------------------------------------------------------------


def test_out_of_closids_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    fake = one_socket(tmp_path, num_closids=3)
    cache = groups_of(fake)
    cache.create("web", frozenset({0}))
    cache.create("db", frozenset({1}))
    before = fake.masks()
    with pytest.raises(ResctrlError) as caught:
        cache.create("cache", frozenset({2}))
    assert str(caught.value) == (
        "no cache partition for 'cache': this machine has 3 resctrl CLOSIDs and all are in use "
        f"(the default group, 'db', 'web'): stop an instance, or remove groups under "
        f"{fake.mount} that nothing uses"
    )
    assert fake.groups() == [dir_of("db"), dir_of("web")]
    assert fake.masks() == before


def test_the_kernel_running_out_of_closids_is_said_too(tmp_path: Path) -> None:
    class OutOfRmids(FakeResctrl):
        def mkdir(self, path: Path) -> None:
            (self.mount / "info" / "last_cmd_status").write_text("Out of RMIDs\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    fake = OutOfRmids(tmp_path).cache("L3", domains={0: range(8)})
    with pytest.raises(ResctrlError) as caught:
        groups_of(fake).create("web", frozenset({0}))
    assert str(caught.value) == (
        f"cannot make {fake.mount / dir_of('web')}: the kernel is out of CLOSIDs or RMIDs (Out "
        f"of RMIDs): stop an instance, or remove groups under {fake.mount} that nothing uses"
    )
    assert fake.groups() == []
    assert fake.masks() == {0: 0x7FF}  # narrowed for it, and widened again


def test_no_free_way_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    fake = FakeResctrl(tmp_path).cache("L3", cbm_mask=0xF, domains={0: range(3)})
    cache = groups_of(fake)
    for name, cpu in [("a", 0), ("b", 1), ("c", 2)]:
        assert cache.create(name, frozenset({cpu})).ways() == {0: 1}
    with pytest.raises(ResctrlError) as caught:
        cache.create("d", frozenset({2}))  # a CPU shared with 'c' (--cpu-share 2)
    assert str(caught.value) == (
        "no room in the L3 cache for 'd': domain 0 has 0 of its 3 ways free, none in a run of 1 "
        "(held: 'a' 0x8, 'b' 0x4, 'c' 0x2): stop an instance or give this one fewer CPUs"
    )
    assert dir_of("d") not in fake.groups()
    assert fake.masks() == {0: 0x1}


def test_a_running_instance_of_the_same_name_is_refused(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    cache = groups_of(fake)
    cache.create("web", frozenset({0}))
    fake.write(cache.tasks_file("web"), "4242")
    with pytest.raises(ResctrlError, match="an instance named 'web' is already running"):
        cache.create("web", frozenset({1}))
    assert fake.tasks(dir_of("web")) == [4242]


# --- other hosts and programs ------------------------------------------------------------------


def test_ways_of_other_hosts_and_programs_are_never_taken(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    theirs = groups_of(fake, OTHER_HOST)
    theirs.create("web", frozenset({0, 1, 2, 3}))  # another host's 'web': 0x7c0
    fake.mkdir(fake.mount / "batch")  # a program's own group, shareable
    fake.write(fake.mount / "batch" / "schemata", "L3:0=30\n")
    ours = groups_of(fake).create("web", frozenset({4, 5}))
    assert ours.masks["L3"] == {0: 0x00C}  # 2 ways, below both
    assert fake.masks(dir_of("web", OTHER_HOST)) == {0: 0x7C0}
    assert fake.masks() == {0: 0x003}


def test_stale_groups_of_this_host_only_are_removed(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    ours, theirs = groups_of(fake), groups_of(fake, OTHER_HOST)
    theirs.create("gone", frozenset({2}))  # another host's, without tasks: not ours to remove
    ours.create("alive", frozenset({1}))  # its host crashed, its instance still runs
    fake.write(ours.tasks_file("alive"), "4242")
    ours.create("gone", frozenset({0}))  # its host crashed, its instance ended
    assert fake.masks() == {0: 0x0FF}
    assert ours.remove_stale() == ["gone"]
    assert fake.groups() == [dir_of("alive"), dir_of("gone", OTHER_HOST)]
    assert fake.masks() == {0: 0x1FF}  # its way went back to the default group
    assert ours.names() == ["alive"]
    assert ours.remove_stale() == []


# --- the fake refuses what the kernel refuses --------------------------------------------------


@pytest.mark.parametrize(
    ("schemata", "status"),
    [
        ("L3:0=5", "The mask 5 has non-consecutive 1-bits"),
        ("L3:0=fff", "Mask out of range: 0xfff in L3"),
        ("L3:0=0", "Need at least 1 bits in the mask"),
        ("L3:7=1", "Unknown domain 7"),
        ("L9:0=1", "Unknown or unsupported resource name 'L9'"),
    ],
)
def test_the_fake_refuses_bad_masks(tmp_path: Path, schemata: str, status: str) -> None:
    fake = one_socket(tmp_path)
    with pytest.raises(OSError, match="Invalid argument"):
        fake.write(fake.mount / "schemata", schemata)
    assert (fake.mount / "info" / "last_cmd_status").read_text().strip() == status
    assert fake.masks() == {0: 0x7FF}


def test_the_fake_keeps_exclusive_groups_exclusive(tmp_path: Path) -> None:
    fake = one_socket(tmp_path)
    group = fake.mount / "p0"
    fake.mkdir(group)
    assert fake.masks("p0") == {0: 0x7FF}  # a new group gets what no exclusive group holds
    assert sorted(p.name for p in group.iterdir()) == [
        "cpus", "cpus_list", "mode", "mon_data", "mon_groups", "schemata", "tasks",
    ]  # fmt: skip
    fake.write(group / "schemata", "L3:0=0x3")
    with pytest.raises(OSError):
        fake.write(group / "mode", "exclusive")  # the default group overlaps it
    fake.write(fake.mount / "schemata", "L3:0=7fc")
    fake.write(group / "mode", "exclusive")
    with pytest.raises(OSError):
        fake.write(fake.mount / "schemata", "L3:0=7fe")
    assert (fake.mount / "info/last_cmd_status").read_text().strip() == (
        "Overlaps with exclusive group"
    )
    fake.mkdir(fake.mount / "p1")
    assert fake.masks("p1") == {0: 0x7FC}


# --- the rule holds whatever happens -----------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e", "f"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["create", "resize", "remove"]),
        st.sampled_from(NAMES),
        st.frozensets(st.integers(0, 7), min_size=1, max_size=8),
    ),
    max_size=25,
)
MACHINES = st.tuples(
    st.sampled_from([0xF, 0xFF, 0x7FF, 0xFFFFF]),  # cbm_mask
    st.sampled_from([1, 2]),  # min_cbm_bits
    st.booleans(),  # the top two ways shared with I/O
    st.sampled_from([{0: range(8)}, {0: range(4), 1: range(4, 8)}]),
)


@settings(max_examples=150, deadline=None)
@given(machine=MACHINES, ops=OPS)
def test_masks_of_live_instances_never_overlap(
    machine: tuple[int, int, bool, dict[int, range]], ops: list[tuple[str, str, frozenset[int]]]
) -> None:
    """Whatever instances come, grow, shrink and go: each holds contiguous ways of its own
    (within cbm_mask, at least min_cbm_bits, never shareable), the default group keeps its floor,
    and what goes gives its ways back; what fails says so and leaves nothing."""
    cbm, min_bits, io, domains = machine
    shareable = (cbm ^ (cbm >> 2)) if io else 0
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeResctrl(Path(tmp)).cache(
            "L3", cbm_mask=cbm, min_cbm_bits=min_bits, shareable_bits=shareable, num_closids=5,
            domains=domains,
        )  # fmt: skip
        cache = groups_of(fake)
        live: dict[str, frozenset[int]] = {}
        for op, name, cpus in ops:
            try:
                if op == "create" and name not in live:
                    cache.create(name, cpus)
                    live[name] = cpus
                elif op == "resize" and name in live:
                    cache.resize(name, cpus)
                    live[name] = cpus
                elif op == "remove":
                    cache.remove(name)
                    live.pop(name, None)
            except ResctrlError as error:
                failure = str(error)
            else:
                failure = ""
            # out of ways or CLOSIDs, never a write the kernel refuses
            assert not failure or failure.startswith(("no room in the L3", "no cache partition"))
            _check(fake, cache, live, min_bits, shareable)
        for name in list(live):
            cache.remove(name)
        assert fake.groups() == []
        assert fake.masks() == dict.fromkeys(domains, cbm)  # every way given back


def _check(
    fake: FakeResctrl,
    cache: ResctrlGroups,
    live: dict[str, frozenset[int]],
    min_bits: int,
    shareable: int,
) -> None:
    assert cache.names() == sorted(live)
    floor = reserved(min_bits)
    l3 = cache.info.caches["L3"]
    for domain, cpus_here in l3.domains.items():
        default = fake.masks()[domain]
        assert is_contiguous(default)
        assert default & floor == floor
        held = 0
        for name, cpus in live.items():
            mask = fake.masks(dir_of(name))[domain]
            if not cpus & cpus_here:
                assert mask == floor  # the placeholder
                continue
            assert is_contiguous(mask)
            assert mask & ~l3.cbm_mask == 0
            assert ways(mask) >= max(min_bits, 1)
            assert mask & (shareable | floor | default) == 0
            assert mask & held == 0, f"{name} overlaps another instance in domain {domain}"
            held |= mask
    for name in live:
        placeholders = any(
            fake.masks(dir_of(name))[d] == floor and not live[name] & l3.domains[d]
            for d in l3.domains
        )
        assert fake.mode(dir_of(name)) == ("shareable" if placeholders else "exclusive")
