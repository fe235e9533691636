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

import contextlib
import fcntl
import os
import select
import signal
import stat
import threading
from typing import Self

import anyio
import anyio.lowlevel

from multikernel.shm._errors import UnsafeHandleError

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
    """What one side of a ring sleeps on: its doorbell, the peer's liveness fd, our own wake-ups."""

    __slots__ = ("_closed", "_epoll", "_own", "_own_rung", "_probe", "bell", "fileno")

    def __init__(self, bell: Doorbell, liveness_fd: int | None) -> None:
        self.bell = bell
        self._closed = False
        self._own: int | None = None  # the private eventfd of `wake`, made on first use
        self._own_rung = False
        self._epoll = select.epoll()
        self._epoll.register(bell.fd, select.EPOLLIN)
        self._probe = select.poll()  # peer_gone: the ringer hung up, or the liveness fd fired
        self._probe.register(bell.fd, 0)  # POLLHUP is always reported
        if liveness_fd is not None:
            self._epoll.register(liveness_fd, select.EPOLLIN)
            self._probe.register(liveness_fd, select.POLLIN)
        self.fileno = self._epoll.fileno()

    def peer_gone(self) -> bool:
        """True once the peer has gone: its doorbell end is closed or the liveness fd fired.

        A peer can make this true while it lives (close its end, write to its liveness end):
        that only ends its own channel.
        """
        return not self._closed and bool(self._probe.poll(0))

    def wake(self) -> None:
        """Wake whoever sleeps here, from this process: never through the peer's pipe end."""
        if self._closed:
            return
        if self._own is None:
            self._own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._epoll.register(self._own, select.EPOLLIN)
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
        """Sleep until the doorbell rings or the peer goes, without a thread (any event loop).

        (The blocking API sleeps in the ring's core instead: `wait()` there polls `fileno`.)
        """
        await anyio.wait_readable(self.fileno)

    def close(self) -> None:
        """Wake any task waiting here with ClosedResourceError, then release the epoll fd.

        The doorbell and the liveness fd belong to the ring and channel; they close them.
        """
        if self._closed:
            return
        self._closed = True
        # Outside an event loop (closed from synchronous code) nobody can be waiting on it, and
        # anyio says so with NoEventLoopError (a RuntimeError).
        with contextlib.suppress(RuntimeError):
            anyio.notify_closing(self.fileno)
        self._epoll.close()
        if self._own is not None:
            os.close(self._own)
