"""How people write CPUs and sizes, parsed and printed the same way by every client and actor.

**CPUs** have one syntax, and it is never ambiguous. A bare number is a *count*: ``2`` asks for two
CPUs that the host's placement policy picks. A list of CPU ids starts with ``@`` and uses the
kernel's list format (``cpuset.cpus``, ``/sys/devices/system/cpu/online``): ``@1`` is CPU 1,
``@0-3,6`` CPUs 0, 1, 2, 3 and 6. The ``@`` may be left out when the list has a ``,`` or a ``-``
(``0-3,6``), since that cannot be read as a count; a single id always needs it. ``0`` is refused:
it asks for no CPU (pin CPU 0 with ``@0``). ``format_cpus`` writes the canonical form back
(``2``, ``@0-3,6``), and ``parse_cpus(format_cpus(spec)) == spec`` for every spec.

**Sizes** are bytes, or a number with a binary unit: ``4096``, ``256M``, ``1.5G``, ``128MiB``,
``2 GiB`` (K, M, G, T, P are powers of 1024, an ``i`` and a ``B`` may follow). ``format_size``
prints them for people: ``128 MiB``, ``1.5 GiB``, ``41.5 GiB``, never a raw byte count above 1 KiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from multikernel.protocol._resource import CpuSpec, InvalidResourceRequestError

#: CPU ids and counts above this are refused: Linux's NR_CPUS tops out at 8192.
MAX_CPU_ID: Final = 65535
_UNITS: Final = "BKMGTP"
_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)", re.IGNORECASE)
_CPU_ITEM: Final = re.compile(r"(\d+)(?:-(\d+))?")


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU ids from the kernel's list format (``0-3,6``).

    InvalidResourceRequestError says what is wrong.
    """
    if not text:
        raise InvalidResourceRequestError("an empty CPU list names no CPU")
    cpus: set[int] = set()
    for item in text.split(","):
        if not item:
            raise InvalidResourceRequestError(f"{text!r} has an empty item between commas")
        match = _CPU_ITEM.fullmatch(item)
        if match is None:
            raise InvalidResourceRequestError(
                f"{item!r} in {text!r} is not a CPU id or range (write 6, or 0-3 for 0 to 3)"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InvalidResourceRequestError(
                f"range {item!r} in {text!r} runs backwards: write {last}-{first}"
            )
        if last > MAX_CPU_ID:
            raise InvalidResourceRequestError(f"CPU id {last} in {text!r} is above {MAX_CPU_ID}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's list format, shortest form: ``0-3,6`` (consecutive ids become a range)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpus(text: str) -> CpuSpec:
    """``2`` → two CPUs the policy picks; ``@1``, ``@0-3,6`` or ``0-3,6`` → those CPUs.

    Raises InvalidResourceRequestError (a ValueError) with a message that shows both forms.
    """
    raw = text.strip()
    usage = "a count is a number (2); a list of CPU ids starts with @ (@1, @0-3,6)"
    if raw.isdigit():
        count = int(raw)
        if count == 0:
            raise InvalidResourceRequestError(
                f"--cpus 0 asks for no CPU: {usage}; CPU 0 alone is @0"
            )
        if count > MAX_CPU_ID + 1:
            raise InvalidResourceRequestError(f"{count} CPUs is more than any machine has: {usage}")
        return CpuSpec(count=count)
    listed = raw[1:] if raw.startswith("@") else raw
    if not raw.startswith("@") and not ("," in raw or "-" in raw):
        raise InvalidResourceRequestError(f"{text!r} is neither a count nor a CPU list: {usage}")
    try:
        ids = parse_cpu_list(listed)
    except InvalidResourceRequestError as error:
        raise InvalidResourceRequestError(f"{error}; {usage}") from None
    return CpuSpec(ids=tuple(sorted(ids)))


def format_cpus(spec: CpuSpec) -> str:
    """The canonical text of a spec: ``2`` or ``@0-3,6``."""
    return str(spec.count) if spec.count else "@" + format_cpu_list(spec.ids)


def parse_size(text: str, *, minimum: int = 0) -> int:
    """``4096``, ``256M``, ``1.5G``, ``2 GiB`` → bytes (binary units).

    InvalidResourceRequestError if it is not a size.

    ``minimum`` refuses smaller results (``minimum=1`` refuses ``0``), with the reason.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InvalidResourceRequestError(
            f"not a size: {text!r} (use e.g. 256M, 1.5G, 2GiB or 4096 bytes)"
        )
    number, unit = match.group(1), match.group(2).upper() or "B"
    if match.group(3) and unit == "B":
        raise InvalidResourceRequestError(
            f"not a size: {text!r} ('i' needs a unit before it, as in 256Mi)"
        )
    scale: int = 1024 ** _UNITS.index(unit)
    whole, _, fraction = number.partition(".")
    value = int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)
    if value < minimum:
        shown = format_size(value) if value else "0 bytes"
        raise InvalidResourceRequestError(
            f"{text!r} is {shown}, below the least allowed, {format_size(minimum)}"
        )
    return value


def format_size(size: int) -> str:
    """Bytes for people: ``512 B``, ``128 MiB``, ``1.5 GiB``, ``23.6 GiB`` (at most one decimal,
    two when that is exact, so ``1.25 GiB`` stays exact)."""
    if size < 1024:
        return f"{size} B"
    power = min(len(_UNITS) - 1, (size.bit_length() - 1) // 10)
    scale = 1024**power
    unit = f"{_UNITS[power]}iB"
    if size % scale == 0:
        return f"{size // scale} {unit}"
    if size * 100 % scale == 0:
        return f"{size / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{size / scale:.1f} {unit}"
