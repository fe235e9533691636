"""An instance's own output: collected by the host, stamped, kept in a rotated file, followed.

The workload's stdout and stderr are one pipe whose read end the lifecycle actor keeps (the
agent hands the write end to the workload and closes its own copy), so an instance's output never
mixes with the host's JSON log, and the host, not the instance, owns the files. Each line is
stored as `<ns since the epoch> <text>`, the time the host received it, in `output.log` in the
instance's state directory; past `max_bytes` the file is rotated (`output.log.1` ... `.<keep>`).
Followers (`mkctl logs -f`) wait on an event and take new lines from a bounded in-memory tail.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from multikernel.protocol import LogLine

#: Lines kept in memory for followers and for the reason a workload failed.
RECENT = 1000
_CHUNK = 65536


class InstanceLog:
    """The output of one instance (across its starts), in `directory`/output.log."""

    def __init__(self, directory: Path, *, max_bytes: int = 1 << 20, keep: int = 3) -> None:
        self.path = directory / "output.log"
        self.max_bytes = max_bytes
        self.keep = keep
        self.recent: deque[tuple[int, LogLine]] = deque(maxlen=RECENT)
        self.seq = 0
        self.collecting = False
        self.changed = anyio.Event()
        self.ended = anyio.Event()  # the current start's output has reached its end
        self.ended.set()

    # -- writing ------------------------------------------------------------------------------

    def append(self, text: str, ts_ns: int | None = None) -> None:
        self.append_all([text], ts_ns)

    def append_all(self, texts: list[str], ts_ns: int | None = None) -> None:
        """Store lines that arrived together (one open, one timestamp), then wake followers."""
        stamp = ts_ns if ts_ns is not None else time.time_ns()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        file = self.path.open("ab")
        try:
            for text in texts:
                record = f"{stamp} {text}\n".encode(errors="replace")
                if size and size + len(record) > self.max_bytes:
                    file.close()
                    self._rotate()
                    file = self.path.open("ab")
                    size = 0
                file.write(record)
                size += len(record)
                self.seq += 1
                self.recent.append((self.seq, LogLine(stamp, text)))
        finally:
            file.close()
        self.changed.set()
        self.changed = anyio.Event()

    def _rotate(self) -> None:
        for index in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if index == self.keep:
                older.unlink(missing_ok=True)
            elif older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.keep:
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def starting(self) -> None:
        """A new start's output begins (its collector is about to run)."""
        self.collecting = True
        self.ended = anyio.Event()

    async def collect(self, fd: int) -> None:
        """Read the pipe `fd` (which this takes over) until its writers are gone."""
        os.set_blocking(fd, False)
        pending = b""
        try:
            while True:
                await anyio.wait_readable(fd)
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > _CHUNK:  # a very long line: keep it in pieces
                    lines.append(pending)
                    pending = b""
                self._append_all(lines)  # small writes to a local file, in order
            if pending:
                self.append(pending.decode(errors="replace"))
        finally:
            os.close(fd)
            self.collecting = False
            self.ended.set()
            self.changed.set()

    def _append_all(self, lines: list[bytes]) -> None:
        if lines:
            self.append_all([raw.decode(errors="replace").rstrip("\r") for raw in lines])

    # -- reading ------------------------------------------------------------------------------

    def last_line(self) -> str:
        """The last non-blank line written (often the exception a failed workload died of)."""
        for _, line in reversed(self.recent):
            if line.text.strip():
                return line.text.strip()
        return ""

    def read(self, since_ns: int = 0, tail: int = 0) -> list[LogLine]:
        """Every stored line at or after `since_ns`, oldest first (the last `tail` if given)."""
        files = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.keep, 0, -1)]
        lines: list[LogLine] = []
        for path in [*files, self.path]:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            for raw in data.decode(errors="replace").splitlines():
                stamp, _, text = raw.partition(" ")
                if stamp.isdigit() and int(stamp) >= since_ns:
                    lines.append(LogLine(int(stamp), text))
        return lines[-tail:] if tail else lines

    async def follow(self, since_ns: int = 0, tail: int = 0) -> AsyncIterator[list[LogLine]]:
        """What is stored, then each batch of new lines until the output ends."""
        seen = self.seq
        yield await anyio.to_thread.run_sync(self.read, since_ns, tail)
        while self.collecting:
            changed = self.changed
            await changed.wait()
            fresh = [line for seq, line in self.recent if seq > seen]
            seen = self.seq
            if fresh:
                yield fresh
