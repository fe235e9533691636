"""The hub: sessions, routing, well-known names, access control and the monitor.

A `Hub` listens on a Unix control socket. Each endpoint that attaches gets a session channel in
shared memory and an identity the hub binds (instance, uid, pid; never what the endpoint says).
The hub routes publications to subscribers (`SubjectRouter`: a token trie with `*`/`>` and queue
groups, plus a match cache), owns well-known names with D-Bus's ordered hand-off (`NameRegistry`),
checks every subscription and call against a TOML `Policy` (deny by default across instances),
and sets up direct channels between callers and services so requests and replies never pass
through it. Run it with `python -m multikernel.bus` (or `mkctl host up`); docs/bus.md.
"""

from multikernel.bus._hub import Hub as Hub
from multikernel.bus._names import NameRegistry as NameRegistry
from multikernel.bus._names import NamesStatistics as NamesStatistics
from multikernel.bus._policy import Decision as Decision
from multikernel.bus._policy import Identity as Identity
from multikernel.bus._policy import Policy as Policy
from multikernel.bus._router import RouterStatistics as RouterStatistics
from multikernel.bus._router import SubjectRouter as SubjectRouter
from multikernel.bus._rules import PolicyError as PolicyError
from multikernel.bus._session import Limits as Limits
from multikernel.bus._socket_access import SocketAccess as SocketAccess
