"""An instance's output log: stamped lines, rotated by size, read back by time and tail."""

from __future__ import annotations

from pathlib import Path

from multikernel.services._output import InstanceLog


def test_the_log_rotates_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    log = InstanceLog(tmp_path, max_bytes=200, keep=2)
    for i in range(50):
        log.append(f"line {i}", ts_ns=1_000 + i)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "output.log", "output.log.1", "output.log.2",
    ]  # fmt: skip
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    lines = log.read()
    assert [line.text for line in lines] == [f"line {i}" for i in range(50 - len(lines), 50)]
    assert [line.text for line in log.read(tail=2)] == ["line 48", "line 49"]
    assert [line.text for line in log.read(since_ns=1_048)] == ["line 48", "line 49"]
    assert log.last_line() == "line 49"
