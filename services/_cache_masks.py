"""Cache-way masks: the arithmetic of exclusive, contiguous cache partitions (pure, no I/O).

A cache that resctrl partitions is a row of *ways*; a group may fill the ways whose bits are set
in its capacity bitmask (CBM). Intel requires the set bits to be contiguous, and every mask to
have at least `min_cbm_bits` of them, so everything here deals in runs of bits. The rule
(docs/resources.md, "Cache and memory bandwidth: resctrl"):

- The lowest `max(min_cbm_bits, 1)` ways are `reserved`: never given to an instance, they are
  the default group's floor (every other process of the machine keeps at least them) and the
  *placeholder* mask of an instance in a domain where it has no CPU (every group needs a mask in
  every domain; one whose tasks never run there fills nothing, so sharing it harms nobody).
- `share`: in a domain where it has CPUs, an instance gets ways in proportion to them:
  `budget * n // N`, `N` the CPUs sharing that cache, `n` the instance's among them, `budget`
  the ways that are neither reserved nor `shareable_bits` (which the hardware shares with I/O);
  at least one way, and at least `min_cbm_bits`.
- `choose` places them where no other group holds a way (placeholders aside), contiguously,
  keeping what the instance already holds where it can, else in the smallest free run that fits
  (so big runs stay for big instances), at its high end. If its share does not fit, the most
  that does (down to `at_least`) is taken; None if not even that.
- `default_mask`: the default group gets the run of ways nobody holds that starts at way 0 (so
  the reserved ways are always in it).
"""

from __future__ import annotations


def ways(mask: int) -> int:
    """How many ways (set bits) `mask` has."""
    return mask.bit_count()


def run_mask(start: int, length: int) -> int:
    """`length` contiguous bits from bit `start` up."""
    return ((1 << length) - 1) << start


def runs(mask: int) -> list[tuple[int, int]]:
    """The runs of set bits of `mask`, as (first bit, length), lowest first."""
    found: list[tuple[int, int]] = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            length = 0
            while mask >> (bit + length) & 1:
                length += 1
            found.append((bit, length))
            bit += length
        else:
            bit += 1
    return found


def is_contiguous(mask: int) -> bool:
    """True for 0 and for masks whose set bits form one run."""
    return len(runs(mask)) <= 1


def reserved(min_bits: int) -> int:
    """The ways no instance is given: the default group's floor, and the placeholder mask."""
    return run_mask(0, max(min_bits, 1))


def share(budget: int, min_bits: int, cpus_here: int, cpus_in_domain: int) -> int:
    """The ways an instance with `cpus_here` of a domain's `cpus_in_domain` CPUs is due there
    (0: it has no CPU there, and gets the placeholder)."""
    if cpus_here <= 0 or cpus_in_domain <= 0:
        return 0
    return max(min_bits, 1, budget * cpus_here // cpus_in_domain)


def default_mask(cbm_mask: int, held: int) -> int:
    """The default group's mask: the run of `cbm_mask` nobody holds that has way 0 (the longest
    run, if someone else's group holds way 0)."""
    free = cbm_mask & ~held
    for start, length in runs(free):
        if start == 0:
            return run_mask(0, length)
    best = max(runs(free), key=lambda run: (run[1], -run[0]), default=(0, 0))
    return run_mask(*best)


def choose(
    count: int,
    *,
    cbm_mask: int,
    min_bits: int,
    shareable: int = 0,
    held: int = 0,
    current: int = 0,
    at_least: int | None = None,
) -> int | None:
    """A mask of `count` contiguous ways for one group (fewer, down to `at_least`, if that many
    do not fit), or None if there is no room.

    `held`: the ways other groups hold (their placeholders left out); `current`: what this group
    holds now, which it may keep. The mask avoids `held`, `shareable` and the reserved ways,
    stays within `cbm_mask`, and leaves the default group `max(min_bits, 1)` ways while the group
    still holds `current` too (a group that moves holds both for a moment).
    """
    floor = max(min_bits, 1)
    free = cbm_mask & ~shareable & ~reserved(min_bits) & ~held
    free_runs = runs(free)
    for size in range(count, (count if at_least is None else at_least) - 1, -1):
        best: tuple[tuple[int, int, int], int] | None = None
        for start, length in free_runs:
            for first in range(start, start + length - size + 1):
                mask = run_mask(first, size)
                if ways(default_mask(cbm_mask, held | mask | current)) < floor:
                    continue
                key = (ways(mask & current), -length, first)
                if best is None or key > best[0]:
                    best = (key, mask)
        if best is not None:
            return best[1]
    return None
