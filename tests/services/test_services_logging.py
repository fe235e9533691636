"""One logging setup: every package logs structured events through `multikernel.endpoints.log`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import anyio
import pytest

from multikernel.bus.testing import MemoryBus
from multikernel.protocol import InstanceStateChanged
from multikernel.services._instances import Instance, StateChanges

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shm", "protocol", "endpoints", "bus", "upgrade", "services")

pytestmark = pytest.mark.anyio


async def test_a_state_change_is_one_structured_event(caplog: pytest.LogCaptureFixture) -> None:
    bus = MemoryBus()
    inst = Instance("web", 3, state="ready")
    async with (
        bus.connect("lifecycle") as actor,
        bus.connect("watcher") as watcher,
        await watcher.subscribe("mk.instance.*.state") as changes,
    ):
        with caplog.at_level("INFO", logger="multikernel"):
            await StateChanges(actor).move(inst, "loaded", "image verified")
        ours = [r for r in caplog.records if r.name.startswith("multikernel.")]
        assert len(ours) == 1
        event = json.loads(ours[0].getMessage())  # JSON: pytest's stderr is not a terminal
        assert event.pop("timestamp")
        assert event == {
            "event": "instance state",
            "level": "info",
            "instance": "web",
            "id": 3,
            "old": "ready",
            "new": "loaded",
            "reason": "image verified",
        }
        with anyio.fail_after(5):
            message = await anext(aiter(changes))
        assert message.subject == "mk.instance.3.state"
        assert message.decode(InstanceStateChanged) == InstanceStateChanged(
            "web", 3, "ready", "loaded", "image verified"
        )


def stdlib_loggers(source: str) -> list[int]:
    """Lines that log through the standard library directly instead of `get_logger`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "logging"
            and node.func.attr in {"getLogger", "info", "warning", "error", "debug", "exception"}
        ):
            lines.append(node.lineno)
    return lines


def test_no_module_logs_around_the_one_setup() -> None:
    setup = ROOT / "endpoints" / "log.py"
    offenders = {
        f"{path.relative_to(ROOT)}": lines
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
        if path != setup and (lines := stdlib_loggers(path.read_text()))
    }
    assert offenders == {}
    assert stdlib_loggers("import logging\nlog = logging.getLogger('x')\n") == [2]
