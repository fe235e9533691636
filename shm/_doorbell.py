"""Doorbells (eventfd), the wait set a sleeping side blocks on, and the memory fence.

A doorbell is an eventfd that one side rings and the other sleeps on; on a real multikernel host
it stands for an inter-processor interrupt. A side never sleeps on the doorbell alone: it sleeps on
a wait set (an epoll fd, itself pollable) holding the doorbell and, when known, a *liveness fd*
that becomes readable when the peer is gone (our end of a socketpair whose other end only the peer
holds, or a pidfd of the peer process). So a dead peer wakes its partner instead of leaving it
asleep forever, with a single fd to wait on, under any event loop.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

import anyio
import anyio.lowlevel

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


class Doorbell:
    """One eventfd. `ring` wakes whoever sleeps on it; `drain` resets it."""

    __slots__ = ("_closed", "fd")

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        self._closed = False

    def ring(self) -> None:
        # A saturated counter (BlockingIOError) means the peer is already woken.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class WaitSet:
    """What one side of a ring sleeps on: its doorbell plus, optionally, the peer's liveness fd."""

    __slots__ = ("_closed", "_epoll", "_liveness_fd", "bell", "fileno")

    def __init__(self, bell: Doorbell, liveness_fd: int | None) -> None:
        self.bell = bell
        self._liveness_fd = liveness_fd
        self._closed = False
        if liveness_fd is None:
            self._epoll = None
            self.fileno = bell.fd
        else:
            self._epoll = select.epoll()
            self._epoll.register(bell.fd, select.EPOLLIN)
            self._epoll.register(liveness_fd, select.EPOLLIN)
            self.fileno = self._epoll.fileno()

    def peer_gone(self) -> bool:
        """True once the liveness fd reports the peer has gone (never true without one)."""
        if self._liveness_fd is None or self._closed:
            return False
        poller = select.poll()
        poller.register(self._liveness_fd, select.POLLIN)
        return bool(poller.poll(0))

    def wait_blocking(self, timeout: float | None) -> bool:
        """Block until the doorbell rings or the peer goes; False on timeout."""
        poller = select.poll()
        poller.register(self.fileno, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    async def wait(self) -> None:
        """Sleep until the doorbell rings or the peer goes, without a thread (any event loop)."""
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
        if self._epoll is not None:
            self._epoll.close()
