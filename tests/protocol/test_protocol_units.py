"""CPUs and sizes have one text syntax: parsed and printed the same way everywhere."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multikernel.protocol import (
    MAX_CPU_ID,
    CpuSpec,
    InvalidResourceRequestError,
    format_cpu_list,
    format_cpus,
    format_size,
    parse_cpu_list,
    parse_cpus,
    parse_size,
)

cpu_ids = st.frozensets(st.integers(0, 300), min_size=1, max_size=40)
specs = st.one_of(
    st.integers(1, MAX_CPU_ID + 1).map(lambda n: CpuSpec(count=n)),
    cpu_ids.map(lambda ids: CpuSpec(ids=tuple(sorted(ids)))),
)


@given(specs)
def test_every_cpu_spec_round_trips_through_its_text(spec: CpuSpec) -> None:
    assert parse_cpus(format_cpus(spec)) == spec


@given(cpu_ids)
def test_cpu_lists_round_trip_in_the_kernels_format(ids: frozenset[int]) -> None:
    text = format_cpu_list(ids)
    assert parse_cpu_list(text) == ids
    assert parse_cpus("@" + text) == CpuSpec(ids=tuple(sorted(ids)))


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("1", CpuSpec(count=1)),
        ("2", CpuSpec(count=2)),
        ("@1", CpuSpec(ids=(1,))),
        ("@0", CpuSpec(ids=(0,))),
        ("@0-3,6", CpuSpec(ids=(0, 1, 2, 3, 6))),
        ("0-3,6", CpuSpec(ids=(0, 1, 2, 3, 6))),
        ("1-1", CpuSpec(ids=(1,))),
        ("2,0", CpuSpec(ids=(0, 2))),
    ],
)
def test_a_bare_number_is_a_count_and_a_list_is_ids(text: str, spec: CpuSpec) -> None:
    assert parse_cpus(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "--cpus 0 asks for no CPU: a count is a number (2); a list of CPU ids starts with "
              "@ (@1, @0-3,6); CPU 0 alone is @0"),
        ("two", "'two' is neither a count nor a CPU list"),
        ("", "'' is neither a count nor a CPU list"),
        ("@", "an empty CPU list names no CPU"),
        ("3-1", "range '3-1' in '3-1' runs backwards: write 1-3"),
        ("1,,2", "'1,,2' has an empty item between commas"),
        ("@1-x", "'1-x' in '1-x' is not a CPU id or range"),
        ("@70000", "CPU id 70000 in '70000' is above 65535"),
        ("99999", "99999 CPUs is more than any machine has"),
    ],
)  # fmt: skip
def test_bad_cpu_text_says_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(InvalidResourceRequestError) as refused:
        parse_cpus(text)
    assert str(refused.value).startswith(message)
    assert isinstance(refused.value, ValueError)


def test_a_cpu_spec_is_a_count_or_ids_never_both() -> None:
    with pytest.raises(InvalidResourceRequestError):
        CpuSpec()
    with pytest.raises(InvalidResourceRequestError):
        CpuSpec(count=1, ids=(1,))
    with pytest.raises(InvalidResourceRequestError):
        CpuSpec(ids=(2, 1))


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("256M", 256 << 20),
        ("256m", 256 << 20),
        ("1.5G", 3 << 29),
        ("128MiB", 128 << 20),
        ("2 GiB", 2 << 30),
        ("1K", 1024),
        ("1T", 1 << 40),
    ],
)
def test_sizes_are_bytes_or_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "1.2.3G", "-1G", "G", "12Q", "5iB"])
def test_what_is_not_a_size_is_refused(text: str) -> None:
    with pytest.raises(InvalidResourceRequestError, match="not a size"):
        parse_size(text)


def test_a_size_below_the_minimum_is_refused_with_both_sizes() -> None:
    with pytest.raises(InvalidResourceRequestError) as refused:
        parse_size("0", minimum=1)
    assert str(refused.value) == "'0' is 0 bytes, below the least allowed, 1 B"
    with pytest.raises(InvalidResourceRequestError, match="'8M' is 8 MiB, below the least"):
        parse_size("8M", minimum=16 << 20)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512, "512 B"),
        (1024, "1 KiB"),
        (128 << 20, "128 MiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 28, "1.25 GiB"),
        (int(41.5 * 2**30), "41.5 GiB"),
        (24731708 * 1024, "23.6 GiB"),
        (1 << 40, "1 TiB"),
    ],
)
def test_sizes_print_for_people(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(1, 1023), st.integers(0, 5))
def test_whole_sizes_round_trip(count: int, power: int) -> None:
    size = count << (10 * power)
    assert parse_size(format_size(size).replace(" ", "")) == size


@given(st.integers(0, 1 << 50))
def test_every_size_prints_within_a_twentieth_of_itself(size: int) -> None:
    assert abs(parse_size(format_size(size).replace(" ", "")) - size) <= size / 20
