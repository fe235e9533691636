"""Policies by name: a built-in one, or a plugin named `package.module:attribute`.

The placement policy (`--placement`) and the rebalancer (`--rebalance`) are both chosen this way:
`load_plugin` imports the attribute, calls it when it is a class or a factory, and checks that
what it got satisfies the policy's protocol, with errors that say what was expected.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from multikernel.protocol import InvalidResourceRequestError

P = TypeVar("P")


def load_plugin(
    spec: str, builtins: Mapping[str, Callable[[], P]], kind: type[P], what: str, needs: str
) -> P:
    """The built-in `spec`, or the object `package.module:attribute` names (called if it is a
    class or a factory); `what` names the kind for errors ("placement policy"), `needs` says
    what one must have ("a name and place(request, state)")."""
    if spec in builtins:
        return builtins[spec]()
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        known = ", ".join(builtins)
        raise InvalidResourceRequestError(
            f"unknown {what} {spec!r}: use {known} or package.module:attribute"
        )
    try:
        target: Any = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise InvalidResourceRequestError(f"cannot load {what} {spec!r}: {error}") from error
    plugin = target
    if isinstance(target, type) or (callable(target) and not isinstance(target, kind)):
        plugin = target()  # a class or a factory
    if not isinstance(plugin, kind):
        raise InvalidResourceRequestError(f"{spec!r} is not a {what}: it needs {needs}")
    return plugin
