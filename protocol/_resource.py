"""The resource service's contract: its errors, and CPUs as asked (count or ids).

The resource actor owns the host's pool of CPUs, memory blocks and I/O queues; what clients may
ask of it and what it answers grows here. Its errors say what was wrong and what is free.
"""

from __future__ import annotations

import msgspec

from multikernel.protocol._errors import MultikernelError
from multikernel.protocol._fields import U32

# -- errors -----------------------------------------------------------------------------------


class ResourceError(MultikernelError):
    """Root of the resource service's errors; nothing changed when one is raised."""


class InvalidResourceRequestError(ResourceError, ValueError):
    """The request itself is wrong (``--cpus 0``, no memory, an unknown CPU or queue, a size that
    is not a size); the message says what is accepted."""


class ResourceUnavailableError(ResourceError):
    """The pool cannot give what was asked without double allocation or over-commit.

    The message names who holds what was asked and what is free; ``details`` has ``free_cpus``,
    ``free_memory`` and, for a conflict, ``holder``.
    """


class GrantFailedError(ResourceError):
    """The instance refused a transaction, or did not acknowledge it in time; it was rolled back
    on both sides, and the instance keeps what it had (``details``: ``tx``)."""


class UnknownGrantError(ResourceError, LookupError):
    """The instance named has no grant (``allocate`` first), or is unknown to the pool."""


class _ResourceMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """Frozen, defaults left off the wire, unknown fields skipped (evolution rules)."""


class CpuSpec(_ResourceMessage, frozen=True):
    """CPUs asked for: a ``count`` the policy places, or explicit ``ids``; exactly one of them.

    ``parse_cpus`` and ``format_cpus`` are its text form (``2``, ``@0-3,6``).
    """

    count: U32 = 0
    ids: tuple[U32, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.count) == bool(self.ids):
            raise InvalidResourceRequestError(
                "a CPU spec is a count or a list of CPU ids, exactly one of them"
            )
        if list(self.ids) != sorted(set(self.ids)):
            raise InvalidResourceRequestError("the CPU ids of a spec are sorted and distinct")
