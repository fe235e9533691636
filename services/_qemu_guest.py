"""Inside a `qemu` guest: what `/init` runs, told what to do by the kernel command line.

`mk.mode=` on the command line picks the job (default `hello`):

- `hello`: print one line (`multikernel-guest: hello python 3.11.7 uptime 4.21 started 3.10`:
  seconds since boot now and when the interpreter started) and return,
  which powers the guest off; the image test and the boot benchmark wait for that line.
- `echo`: find the ivshmem device, map its shared memory (BAR 2, `resource2` in sysfs), wait for
  the host to lay out a channel at its start, ring the host's doorbell once (vector 0, through
  BAR 0), say `ring ready <device> peer=<its ivshmem id> native=<bool>` on the console and as
  the first frame on the ring, then send every frame back until the host closes its side. The
  ring itself has no doorbell: both sides poll (`WaitPolicy`); with `mk.ring=1` the guest also
  rings the host after every frame it sends back, so the host may sleep on its eventfd.
- `attach`: the same device and wait, then attach to the host's hub over the session channel
  the host laid there (`connect(channel=...)`, docs/bus.md "Sessions over a region"), publish,
  call `mk.call` if given (`mk.calls` more, timed), and say each step on the console.

The guest's serial console is the host's only view of it before the ring is up, so every line
meant for the host starts with `multikernel-guest: `; anything else on the console is the
kernel's.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

PREFIX: Final = "multikernel-guest: "
IVSHMEM_VENDOR: Final = "0x1af4"
IVSHMEM_DEVICE: Final = "0x1110"
PCI_DEVICES: Final = Path("/sys/bus/pci/devices")
CHANNEL_MAGIC: Final = int.from_bytes(b"MKCHAN\x00\x00", "little")
HOST_PEER: Final = 0


def say(text: str) -> None:
    print(PREFIX + text, flush=True)


def kernel_args(cmdline: str) -> dict[str, str]:
    """The `mk.*` parameters of a kernel command line, without their prefix."""
    args = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key.startswith("mk."):
            args[key[3:]] = value
    return args


def find_ivshmem(devices: Path = PCI_DEVICES) -> Path:
    """The sysfs directory of the first ivshmem device (vendor 0x1af4, device 0x1110)."""
    for device in sorted(devices.iterdir()):
        vendor = (device / "vendor").read_text().strip()
        if vendor == IVSHMEM_VENDOR and (device / "device").read_text().strip() == IVSHMEM_DEVICE:
            return device
    raise FileNotFoundError(f"no ivshmem device ({IVSHMEM_VENDOR}:{IVSHMEM_DEVICE}) in {devices}")


def wait_for_channel(bar: Path, timeout: float = 60.0) -> None:
    """Return once the host has laid out a channel at the start of `bar` (its magic is last)."""
    from multikernel.shm import Region

    deadline = time.monotonic() + timeout
    with Region.open(bar, mmap.PAGESIZE) as region, memoryview(region.mmap) as view:
        magic = view[:8].cast("Q")  # sysfs BARs can be mapped, not read
        try:
            while magic[0] != CHANNEL_MAGIC:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no channel appeared in {bar} within {timeout} s")
                time.sleep(0.001)
        finally:
            magic.release()


@contextlib.contextmanager
def doorbell(device: Path) -> Iterator[tuple[int, Callable[[int, int], None]]]:
    """Our ivshmem id and a function that rings `(peer, vector)`, while BAR 0 is mapped.

    BAR 0 holds the registers: IVPosition (our id, -1 until the server gave one) at 8, the
    doorbell at 12, where writing `(peer << 16) | vector` makes QEMU write that peer's eventfd.
    Both are 32-bit registers: one aligned 4-byte load or store each.
    """
    from multikernel.shm import Region

    with (
        Region.open(device / "resource0", 256) as registers,
        memoryview(registers.mmap) as view,
        view[:16].cast("i") as words,
    ):

        def ring(peer: int, vector: int) -> None:
            words[3] = (peer << 16) | vector

        yield words[2], ring


def echo(args: dict[str, str]) -> None:
    import anyio  # here, not above: `hello` measures the interpreter's start without them

    from multikernel.shm import Channel, WaitPolicy, native_available

    device = find_ivshmem()
    (device / "enable").write_text("1")  # memory decoding on, as a driver's probe would do
    bar = device / "resource2"
    wait_for_channel(bar)
    default = WaitPolicy()
    policy = WaitPolicy(
        spin=float(args.get("spin", default.spin)),
        poll_min=float(args.get("poll_min", default.poll_min)),
        poll_max=float(args.get("poll_max", default.poll_max)),
    )
    ring_each = args.get("ring") == "1"  # ring the host after every frame, not only once
    with Channel.open_path(bar, 1, policy) as channel, doorbell(device) as (peer, ring):
        ring(HOST_PEER, 0)
        hello = f"ring ready {device.name} peer={peer} native={native_available()}"
        say(hello)
        channel.send_blocking(hello.encode())  # the host's launch waits for this frame
        count = 0
        while True:
            try:
                frame = channel.receive_blocking()
            except anyio.EndOfStream:  # the host closed its side
                break
            channel.send_blocking(frame)
            if ring_each:
                ring(HOST_PEER, 0)
            count += 1
        say(f"echoed {count}")


def attach(args: dict[str, str]) -> None:
    """Attach to the host's hub over the session channel the host laid in the ivshmem memory
    (`connect(channel=...)`: no socket crosses into a guest), say so, publish one message on
    `guest.hello`, call `mk.call` (`echo`) if given and say what came back, then `mk.calls`
    more and say their round trips (through the hub's relay), then detach."""
    import anyio

    from multikernel.endpoints import connect
    from multikernel.protocol import MultikernelError
    from multikernel.shm import Channel, WaitPolicy

    device = find_ivshmem()
    (device / "enable").write_text("1")
    bar = device / "resource2"
    wait_for_channel(bar)
    default = WaitPolicy()
    policy = WaitPolicy(
        spin=float(args.get("spin", default.spin)),
        poll_min=float(args.get("poll_min", default.poll_min)),
        poll_max=float(args.get("poll_max", default.poll_max)),
    )

    async def session() -> None:
        async with connect(channel=Channel.open_path(bar, 1, policy), name="guest") as ep:
            uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
            say(f"attached endpoint={ep.id} uptime {uptime:.2f}")
            await ep.publish("guest.hello", f"from {os.uname().release}".encode())
            if target := args.get("call"):
                try:
                    answer = await ep.request(target, "echo", b"ping")
                    say(f"call answered {answer!r}")
                    times = []
                    for _ in range(int(args.get("calls", "0"))):
                        start = time.perf_counter()
                        await ep.request(target, "echo", b"ping")
                        times.append(time.perf_counter() - start)
                    if times:
                        times.sort()
                        p50, p99 = times[len(times) // 2], times[len(times) * 99 // 100]
                        say(f"calls {len(times)} p50 {p50 * 1e6:.0f} us p99 {p99 * 1e6:.0f} us")
                except MultikernelError as exc:
                    say(f"call failed {type(exc).__name__}: {exc}")

    anyio.run(session)
    say("detached")


def started() -> float:
    """When this process was started, in seconds since boot (field 22 of /proc/self/stat)."""
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    try:
        args = kernel_args(Path("/proc/cmdline").read_text())
    except OSError:
        args = {}
    mode = args.get("mode", "hello")
    if mode == "hello":
        uptime = Path("/proc/uptime").read_text().split()[0]
        version = ".".join(map(str, sys.version_info[:3]))
        say(f"hello python {version} uptime {uptime} started {started():.2f}")
    elif mode == "echo":
        echo(args)
    elif mode == "attach":
        attach(args)
    else:
        say(f"unknown mk.mode={mode}")
        os._exit(2)
