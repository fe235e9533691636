"""Doorbells (a pipe each), the wait set a sleeping side blocks on, and the memory fence.

A doorbell wakes a side that sleeps; on a real multikernel host it stands for an inter-processor
interrupt. Here it is a pipe: the side that rings holds only its write end, the side that sleeps
only its read end. Those are two open file descriptions, and the flags that decide whether a call
blocks (O_NONBLOCK) live in the description, so neither side can change the other's. (An eventfd
is one description shared by both sides: a peer could clear O_NONBLOCK, fill the counter, and
make our next ring block forever.) Every outcome of our calls is harmless: a full pipe (EAGAIN)
means the sleeper is already woken; a sleeper gone (EPIPE; SIGPIPE is ignored, Python's default,
and checked) has nobody to wake; an empty pipe has nothing to drain; a ringer that closed its end
(EOF, POLLHUP) is gone, and is reported like a dead peer.

A side never sleeps on the doorbell alone: it sleeps on a wait set (an epoll fd, itself pollable)
holding the doorbell, a *liveness fd* when known (our end of a socketpair whose other end only
the peer holds), and, once this process has asked to wake it early (`wake`), a private eventfd no
peer ever sees. So a dead peer wakes its partner instead of leaving it asleep forever, with a
single fd to wait on, under any event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import stat
import threading
from typing import TYPE_CHECKING, Self

import anyio
import anyio.lowlevel

from multikernel.shm._errors import UnsafeHandleError

if TYPE_CHECKING:
    from collections.abc import Callable

_fence_lock = threading.Lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def fence() -> None:
    """A full memory barrier (StoreLoad included) between two accesses to shared memory.

    x86-64 may let a load pass an earlier store, which would lose a wake-up in the "publish, then
    check whether the peer sleeps" / "announce sleep, then re-check" handshake. A locked
    instruction is a full barrier on x86-64; an uncontended `threading.Lock` acquire and release
    execute two (glibc's sem_wait/sem_post compare-and-swap and fetch-add), at ~0.1 us, which is
    the cheapest way to get one from Python without a C extension.
    """
    _fence_acquire()
    _fence_release()


def doorbell_fds() -> tuple[int, int]:
    """A new doorbell: (the read end, for the side that sleeps; the write end, for the ringer)."""
    return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def check_doorbell_fd(fd: int, *, sleeper: bool) -> None:
    """Refuse (`UnsafeHandleError`) an fd that is not the end of a pipe this side should hold."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise UnsafeHandleError(
            f"the doorbell fd {fd} is not a pipe: a doorbell is a pipe whose ends each side holds "
            "alone (an eventfd would share its flags and counter with the peer)"
        )
    want, end = (os.O_RDONLY, "read") if sleeper else (os.O_WRONLY, "write")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != want:
        raise UnsafeHandleError(f"the doorbell fd {fd} is not the {end} end of its pipe")


class Doorbell:
    """One end of a doorbell pipe: `ring` the write end, `drain` the read end. Both never block."""

    __slots__ = ("_closed", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._closed = False

    @classmethod
    def adopt(cls, fd: int, *, sleeper: bool) -> Self:
        """Take an end a peer's handle carried, after `check_doorbell_fd`; non-blocking then.

        The O_NONBLOCK set here is on our own open file description: nobody else can clear it.
        """
        check_doorbell_fd(fd, sleeper=sleeper)
        if not sleeper and signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
            raise RuntimeError(
                "SIGPIPE is at its default action, so a peer that closes its end of a doorbell "
                "would kill this process the next time we ring it; leave SIGPIPE ignored "
                "(Python's default)"
            )
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        return cls(fd)

    def ring(self) -> None:
        # Full: the sleeper is woken already. No read end left: nobody to wake. (try/except,
        # not contextlib.suppress: this is the doorbell's hot path, and suppress costs more
        # than the write itself saves over an eventfd.)
        try:  # noqa: SIM105
            os.write(self.fd, b"\x01")
        except (BlockingIOError, BrokenPipeError):
            pass

    def drain(self) -> None:
        """Empty the pipe (a short read means it is empty); bounded, whatever the peer wrote.

        What a flooding peer leaves behind only wakes us once more, which is no worse than the
        rings it could send anyway. At end of file (the ringer is gone) this reads nothing.
        """
        try:
            if len(os.read(self.fd, 64)) < 64:
                return
            for _ in range(16):
                if len(os.read(self.fd, 65536)) < 65536:
                    return
        except BlockingIOError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class WaitSet:
    """What one side of a ring sleeps on: its doorbell, the peer's liveness fd, our own wake-ups.

    Three ways to sleep on it. The blocking API polls the doorbell and the liveness fd
    themselves (`sleep_fds`). Trio waits on one epoll fd holding all of them (`fileno`, made on
    first use: a side used only under asyncio never has one). Under an asyncio loop (uvloop
    included) the fds are registered with the loop itself, once, and stay registered: a wait is
    then a future, with no `epoll_ctl` per wait and no epoll fd nested in the loop's (adding an
    epoll fd to another costs the kernel a loop check across every epoll in the process, tens
    of microseconds, and a wake-up through two levels of epoll costs more than through one).
    The loop's callbacks drain the doorbell as it rings, note a peer that goes, and complete
    the waiting future; a ring that comes while nobody waits is drained and forgotten (a side
    looks at its ring after announcing sleep, so nothing it should see can be lost that way).
    """

    __slots__ = (
        "_closed",
        "_epoll",
        "_gone",
        "_liveness",
        "_loop",
        "_loop_fds",
        "_own",
        "_own_rung",
        "_probe",
        "_waiter",
        "bell",
    )

    def __init__(self, bell: Doorbell, liveness_fd: int | None) -> None:
        self.bell = bell
        self._closed = False
        self._liveness = liveness_fd
        self._own: int | None = None  # the private eventfd of `wake`, made on first use
        self._own_rung = False
        self._gone = False  # a loop callback saw the peer go
        self._loop: asyncio.AbstractEventLoop | None = None  # where our fds are registered
        self._loop_fds: list[int] = []  # registered there (the liveness fd as our own dup)
        self._waiter: asyncio.Future[None] | None = None
        self._epoll: select.epoll | None = None  # made on first use: asyncio never needs it
        self._probe = select.poll()  # peer_gone: the ringer hung up, or the liveness fd fired
        self._probe.register(bell.fd, 0)  # POLLHUP is always reported
        if liveness_fd is not None:
            self._probe.register(liveness_fd, select.POLLIN)

    @property
    def fileno(self) -> int:
        """One fd to wait on for all of them: an epoll set holding the doorbell, the liveness fd
        and our own eventfd, made on first use (trio, or a blocking sleep after `wake`)."""
        if self._epoll is None:
            if self._closed:
                raise anyio.ClosedResourceError
            self._epoll = select.epoll()
            self._epoll.register(self.bell.fd, select.EPOLLIN)
            if self._liveness is not None:
                self._epoll.register(self._liveness, select.EPOLLIN)
            if self._own is not None:
                self._epoll.register(self._own, select.EPOLLIN)
        return self._epoll.fileno()

    def peer_gone(self) -> bool:
        """True once the peer has gone: its doorbell end is closed or the liveness fd fired.

        A peer can make this true while it lives (close its end, write to its liveness end):
        that only ends its own channel. While registered with the running asyncio loop, the
        loop's callbacks have seen anything that happened before the last turn of the loop,
        and a wait wakes for anything after: no system call is needed.
        """
        if self._closed:
            return False
        if self._gone:
            return True
        if self._loop is not None and self._loop is running_loop():
            return False
        return bool(self._probe.poll(0))

    def sleep_fds(self) -> tuple[int, int]:
        """What a blocking sleep polls: (-1, the liveness fd or -1) to poll the doorbell and the
        liveness fd themselves, one wake-up with no epoll between; or (the epoll fd, -1) once
        `wake` has made our own eventfd, which only the epoll set holds."""
        if self._own is not None:
            return self.fileno, -1
        return -1, -1 if self._liveness is None else self._liveness

    def wake(self) -> None:
        """Wake whoever sleeps here, from this process: never through the peer's pipe end."""
        if self._closed:
            return
        if self._loop is not None and self._loop is running_loop():
            self._fire()  # the waiter is a future of this very loop
            return
        if self._own is None:
            self._own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if self._epoll is not None:
                self._epoll.register(self._own, select.EPOLLIN)
            if self._loop is not None:
                self._watch(self._own, self._on_own)
        self._own_rung = True
        with contextlib.suppress(BlockingIOError):  # saturated: already woken
            os.eventfd_write(self._own, 1)

    def drain(self) -> None:
        """After waking: reset the doorbell and, if it was used, our own wake-up."""
        self.bell.drain()
        self.drain_own()

    def drain_own(self) -> None:
        """After waking: reset our own wake-up, if it was used (the ring's core drains the bell)."""
        if self._own_rung and self._own is not None:
            self._own_rung = False
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._own)

    async def wait(self) -> None:
        """Sleep until the doorbell rings or the peer goes, under trio or another loop that is
        not asyncio (under asyncio a side sleeps with `sleep`, on the loop's own registration)."""
        await anyio.wait_readable(self.fileno)

    def sleep(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Under the running asyncio `loop`: a future that completes when the doorbell rings,
        the peer goes or `wake` is called (done at once if the peer is known to be gone), and
        fails with ClosedResourceError if the wait set is closed. Only the loop's callbacks
        drain the doorbell then.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        if self._loop is not loop:
            self._register(loop)
        waiter = self._waiter = loop.create_future()
        if self._gone:
            waiter.set_result(None)
        else:
            # Registered already, this costs no system call; it restores a registration that
            # somebody else's remove_reader took away. anyio's wait_readable, cancelled after
            # its socket was closed elsewhere, removes whatever is registered on that fd number
            # by then: ours, if our doorbell got the number. Only a wait in progress can miss
            # a ring that way, as each wait's own registration could before.
            loop.add_reader(self.bell.fd, self._on_bell, self.bell.fd)
        return waiter

    # -- registration with an asyncio loop ----------------------------------------------------

    def _register(self, loop: asyncio.AbstractEventLoop) -> None:
        self._unregister()
        self._loop = loop
        self._watch(self.bell.fd, self._on_bell)
        if self._liveness is not None:
            self._watch(os.dup(self._liveness), self._on_liveness, owned=True)
        if self._own is not None:
            self._watch(self._own, self._on_own)

    def _watch(self, fd: int, callback: Callable[[int], None], *, owned: bool = False) -> None:
        assert self._loop is not None
        try:
            self._loop.add_reader(fd, callback, fd)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        self._loop_fds.append(fd if owned else -fd - 1)  # negative: not ours to close

    def _unwatch(self, fd: int) -> None:
        for i, entry in enumerate(self._loop_fds):
            if entry in (fd, -fd - 1):
                del self._loop_fds[i]
                self._remove(entry)
                return

    def _remove(self, entry: int) -> None:
        fd = entry if entry >= 0 else -entry - 1
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                loop.remove_reader(fd)
        if entry >= 0:
            os.close(fd)

    def _unregister(self) -> None:
        while self._loop_fds:
            self._remove(self._loop_fds.pop())
        self._loop = None

    def _fire(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._closed:
                waiter.set_exception(anyio.ClosedResourceError())
            else:
                waiter.set_result(None)

    def _on_bell(self, fd: int) -> None:
        try:
            rung = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:  # EBADF and the like: treat it as the ringer gone
            rung = b""
        if not rung:  # end of file: the ringer hung up, and the pipe stays readable
            self._gone = True
            self._unwatch(fd)
        elif len(rung) == 64:
            self.bell.drain()
        self._fire()

    def _on_liveness(self, fd: int) -> None:
        self._gone = True  # the peer wrote to its end or closed it: gone either way
        self._unwatch(fd)
        self._fire()

    def _on_own(self, fd: int) -> None:
        self._own_rung = False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        self._fire()

    def close(self) -> None:
        """Wake any task waiting here with ClosedResourceError, then release what is ours.

        The doorbell and the liveness fd belong to the ring and channel; they close them.
        """
        if self._closed:
            return
        self._closed = True
        self._unregister()
        self._fire()
        # Outside an event loop (closed from synchronous code) nobody can be waiting on it, and
        # anyio says so with NoEventLoopError (a RuntimeError).
        if self._epoll is not None:
            with contextlib.suppress(RuntimeError):
                anyio.notify_closing(self._epoll.fileno())
            self._epoll.close()
        if self._own is not None:
            os.close(self._own)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop (uvloop's too), or None under trio or outside any loop."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
