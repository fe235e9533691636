"""Elastic grants: what an instance may ask for itself, and how far the host lets it go.

An application asks its agent (`instance.<id>.agent`, method `elastic`) for more or fewer CPUs
or memory; the agent forwards the `ElasticRequest` to `resource.elastic` as its instance. The
resource actor takes the instance from the caller's identity, which the hub bound when the
agent attached (`current_caller().instance`), never from the message, so an instance can change
only its own grant. `resolve` turns the request into the `GrantRequest` of an ordinary update,
within bounds, and the change runs as any transaction does (acknowledged by the agent, rolled
back if refused, in the history as kind `elastic`).

The bounds (`ElasticBounds`, from the host config):

- growing stops at `max_cpus` CPUs and `max_memory` bytes (whole blocks), or at what the
  operator granted (`allocate`/`update`: the instance's **base**) if that is more. With the
  defaults (0), an instance may give back and take back up to its base, never beyond;
- shrinking stops at one CPU and one memory block (the agent refuses to give back memory in
  use, as for any update);
- the pool must have it free: the refusal names what is.

`AGENT_RULE` is the policy rule the host adds so that agents reach `resource` at all; the actor
answers every method but `elastic` to the host alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from multikernel.protocol import (
    CpuSpec,
    ElasticRequest,
    GrantRequest,
    InvalidResourceRequestError,
    ResourceUnavailableError,
    format_cpu_list,
    format_size,
)
from multikernel.services._ledger import Account
from multikernel.services._placement import PoolState

#: The host's policy rule for elastic grants: each agent (the owner of its instance's agent
#: name) may call the resource actor, which serves it `elastic` for its own instance only.
AGENT_RULE: Final = """
[[rule]]  # an instance's agent may call the resource actor (elastic only, for itself)
who = "name:instance.{instance}.agent"
call = ["resource"]
"""


@dataclass(frozen=True)
class ElasticBounds:
    """How far an instance may grow by asking (0: up to its base, what the operator granted)."""

    max_cpus: int = 0
    max_memory: int = 0

    def cpu_cap(self, base: int) -> int:
        return max(self.max_cpus, base)

    def block_cap(self, base: int, block_size: int) -> int:
        return max(self.max_memory // block_size, base)


def _others_free(state: PoolState, name: str) -> str:
    """CPUs and memory nobody holds (the instance's own left out): "CPUs 2-7 and 3.9 GiB"."""
    cpus = [c.id for c in state.free_cpus(name) if name not in state.cpu_holders.get(c.id, ())]
    blocks = [b for b in state.free_blocks(name) if b not in state.block_holders]
    size = format_size(len(blocks) * state.pool.block_size)
    return f"free: CPUs {format_cpu_list(cpus) or 'none'} and {size}"


def resolve(
    request: ElasticRequest, account: Account, state: PoolState, bounds: ElasticBounds
) -> GrantRequest | None:
    """The update `request` means for `account`, within `bounds`; None if it changes nothing.

    Raises `InvalidResourceRequestError` below the floor, `ResourceUnavailableError` beyond the
    host's bound (naming the bound, the flag that sets it and what is free).
    """
    name, block = account.name, state.pool.block_size
    held_cpus, held_blocks = len(account.held.cpus), len(account.held.blocks)
    cpus = request.cpus or (held_cpus + request.cpu_change if request.cpu_change else held_cpus)
    if cpus < 1:
        raise InvalidResourceRequestError(
            f"{name!r} holds {held_cpus} CPU{'s' if held_cpus != 1 else ''} and cannot go "
            f"below 1 (asked for {cpus})"
        )
    cap = bounds.cpu_cap(account.base_cpus)
    if cpus > held_cpus and cpus > cap:
        raise ResourceUnavailableError(
            f"{name!r} may hold at most {cap} CPU{'s' if cap != 1 else ''} by asking, not {cpus} "
            f"(it holds {held_cpus}; the host lets an instance grow to {bounds.max_cpus} "
            f"(--elastic-max-cpus) or to what its operator granted, {account.base_cpus}); "
            f"{_others_free(state, name)}; for more, the host's operator runs mkctl update",
            details={"limit_cpus": cap},
        )
    held_memory = held_blocks * block
    memory = request.memory or held_memory + request.memory_change
    if memory < 1:
        raise InvalidResourceRequestError(
            f"{name!r} holds {format_size(held_memory)} of memory and cannot go below one "
            f"block ({format_size(block)})"
        )
    blocks = -(-memory // block)
    block_cap = bounds.block_cap(account.base_blocks, block)
    if blocks > held_blocks and blocks > block_cap:
        raise ResourceUnavailableError(
            f"{name!r} may hold at most {format_size(block_cap * block)} of memory by asking, "
            f"not {format_size(blocks * block)} (it holds {format_size(held_memory)}; the host "
            f"lets an instance grow to {format_size(bounds.max_memory)} (--elastic-max-memory) "
            f"or to what its operator granted, {format_size(account.base_blocks * block)}); "
            f"{_others_free(state, name)}; for more, the host's operator runs mkctl update",
            details={"limit_memory": block_cap * block},
        )
    if cpus == held_cpus and blocks == held_blocks:
        return None
    return GrantRequest(
        name,
        account.id,
        cpus=CpuSpec(count=cpus) if cpus != held_cpus else None,
        memory=blocks * block if blocks != held_blocks else 0,
    )
