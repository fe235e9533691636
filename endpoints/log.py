"""Structured logs for every layer above shm: structlog through stdlib logging, JSON off a terminal.

Every module of every package logs with `get_logger("multikernel.<area>")` (a stable name per
area: `multikernel.bus`, `.endpoints`, `.lifecycle`, `.agent`, `.services.local`, never a private
module's path), one event per thing that happened, its facts as keys: `log.info("instance state",
instance="web", old="ready", new="loaded")`. structlog renders each event (JSON when stderr is not
a terminal, readable key=value on one) and hands it to the stdlib logger of that name, so the
application decides what is shown and where, as with any library. Unconfigured, Python shows
warnings and errors on stderr only. Our entry points (the hub, the host, the instance agent, the
demo, mkctl) call `configure()` to show info and above on stderr. No module calls stdlib
`logging` directly (tests/services/test_services_logging.py).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def _renderer() -> Any:
    if sys.stderr.isatty():
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


def get_logger(name: str) -> Any:
    """A structlog logger that writes through `logging.getLogger(name)`."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            _renderer(),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def configure(level: int | str | None = None) -> None:
    """For entry points: our events at `level` and above, one per line on stderr.

    The level defaults to $MULTIKERNEL_LOG_LEVEL, else INFO.
    """
    if level is None:
        level = os.environ.get("MULTIKERNEL_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("multikernel")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
