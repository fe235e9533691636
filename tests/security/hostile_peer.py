"""A hostile channel peer for the security tests: `python hostile_peer.py ATTACK ARGUMENT`.

ARGUMENT is a channel handle (`ChannelHandle.to_argument`, its fds inherited), or for `hub` the
hub's socket path. Each attack does its worst, prints one JSON line saying what it did, then
waits for its stdin to close and exits without closing anything, as a crashing process would.

  resize      try to shrink, grow, re-seal and re-open the channel region; report each errno,
              then echo frames until end of stream
  doorbells   fill our side's ring, then: shrink the pipes we sleep on to one page, clear
              O_NONBLOCK on every doorbell end we hold, fill the pipes we ring, set both our
              sleeping flags, and never read or drain again
  hangup      close our doorbell ends, and stay alive
  liveness    write into our liveness end, and stay alive
  hub         attach to a hub as an endpoint, subscribe to "attack.>", try to truncate the
              session region, then the `doorbells` attack on the session channel
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable

from multikernel.endpoints.wire import receive_handle
from multikernel.protocol import (
    CONTROL_DECODER,
    PROTOCOL_VERSION,
    Hello,
    Kind,
    Subscribe,
    decode_body,
    decode_header,
    encode,
)
from multikernel.shm import Channel, ChannelHandle

_F_SEAL_FUTURE_WRITE = 0x10
RINGER = (0, 1, 1, 0)  # who rings each doorbell, in handle order (shm's `RINGER`)
PAGE = os.sysconf("SC_PAGE_SIZE")


def outcome(attempt: Callable[[], object]) -> str:
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "done"


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def wait_then_exit() -> None:
    """Wait for the test to close our stdin, then die holding everything."""
    sys.stdin.buffer.read()
    os._exit(0)


def resize(fds: list[int]) -> dict[str, str]:
    region = fds[0]
    size = os.fstat(region).st_size
    reopened = os.open(f"/proc/self/fd/{region}", os.O_RDWR)  # a new open file description
    return {
        "shrink": outcome(lambda: os.ftruncate(region, 0)),
        "grow": outcome(lambda: os.ftruncate(region, 2 * size)),
        "fallocate past the end": outcome(lambda: os.posix_fallocate(region, size, PAGE)),
        "shrink a reopened fd": outcome(lambda: os.ftruncate(reopened, 0)),
        "seal writes": outcome(lambda: fcntl.fcntl(region, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)),
        "seal future writes": outcome(
            lambda: fcntl.fcntl(region, fcntl.F_ADD_SEALS, _F_SEAL_FUTURE_WRITE)
        ),
        "size after": str(os.fstat(region).st_size),
    }


def jam_doorbells(channel: Channel, side: int, fds: list[int]) -> dict[str, int]:
    """The eventfd attack, done to whatever our doorbell ends are, then "asleep" for good."""
    flooded = 0
    for slot in range(4):
        fd = fds[1 + slot]
        if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":  # shared with the peer
            os.eventfd_write(fd, 2**64 - 2)  # the counter is full: the next write would block
        elif RINGER[slot] != side:  # the peer rings it: make it fill up after a page of rings
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PAGE)
        else:  # the peer sleeps on it: flood it
            try:
                while True:
                    flooded += os.write(fd, b"x" * 65536)
            except BlockingIOError:
                pass
    for fd in fds[1:5]:  # an eventfd's flags are the peer's too; a pipe end's are ours alone
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    # Asleep on both rings, for good: the peer rings at every publish and every consume.
    with memoryview(channel.region.mmap) as whole, whole.cast("Q") as q:
        ring_a, ring_b = q[2] // 8, q[3] // 8
        reads, writes = (ring_a, ring_b) if side == 1 else (ring_b, ring_a)
        q[reads + 24] |= 1  # consumer_flags: asleep on the data doorbell
        q[writes + 25] |= 1  # producer_flags: asleep on the space doorbell
    return {"pipe_size": PAGE, "flooded": flooded}


def channel_attack(attack: str, argument: str) -> None:
    handle = ChannelHandle.from_argument(argument)
    side, fds = handle.side, list(handle.fds)
    channel = Channel.attach(handle)  # owns the fds now; we keep using their numbers
    if attack == "resize":
        report(**resize(fds))
        while True:
            try:
                channel.send_blocking(channel.receive_blocking())
            except Exception:  # end of stream: done
                break
    elif attack == "doorbells":
        sent = 0
        while channel.try_send(b""):
            sent += 1
        report(sent=sent, **jam_doorbells(channel, side, fds))
    elif attack == "hangup":
        for fd in fds[1:5]:
            os.close(fd)
        report(closed=4)
    elif attack == "liveness":
        os.write(fds[5], b"I am dead")
        report(wrote=True)
    else:
        raise SystemExit(f"unknown attack {attack}")
    wait_then_exit()


def hub_attack(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    import anyio

    _frame, fds = anyio.run(receive_handle, sock)
    session = Channel.attach(ChannelHandle(1, list(fds)))
    hello = Hello(PROTOCOL_VERSION, PROTOCOL_VERSION, name="hostile")
    session.send_blocking(encode(Kind.CONTROL, hello))
    frame = session.receive_blocking(5)
    welcome = decode_body(decode_header(frame), frame, CONTROL_DECODER)
    session.send_blocking(encode(Kind.CONTROL, Subscribe("attack.>", None, 1), correlation=1))
    session.receive_blocking(5)  # the subscription is in place
    fields = {"welcome": type(welcome).__name__, **resize(fds), **jam_doorbells(session, 1, fds)}
    report(**fields)
    wait_then_exit()


if __name__ == "__main__":
    if sys.argv[1] == "hub":
        hub_attack(sys.argv[2])
    else:
        channel_attack(sys.argv[1], sys.argv[2])
