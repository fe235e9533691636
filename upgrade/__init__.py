"""Zero-downtime upgrade: the preserved-state (KHO-like) format and, to come, the upgrade actor.

`PreservedState` is what a service hands its next version: a tree of named nodes, each a typed
msgspec payload with its schema's name and version, laid out as one checked image
(docs/upgrade.md) and handed over in a sealed memfd (`preserve`, `restore`). A new version reads
older nodes through `Schema` and its transforms; what it cannot read raises
`IncompatibleStateError`, and the upgrade rolls back.
"""

from multikernel.upgrade._preserved import LAYOUT_VERSION as LAYOUT_VERSION
from multikernel.upgrade._preserved import IncompatibleStateError as IncompatibleStateError
from multikernel.upgrade._preserved import Node as Node
from multikernel.upgrade._preserved import PreservedState as PreservedState
from multikernel.upgrade._preserved import PreservedStateError as PreservedStateError
from multikernel.upgrade._preserved import Schema as Schema
from multikernel.upgrade._preserved import preserve as preserve
from multikernel.upgrade._preserved import restore as restore
from multikernel.upgrade._workload import MovedError as MovedError
from multikernel.upgrade._workload import UpgradeControl as UpgradeControl
