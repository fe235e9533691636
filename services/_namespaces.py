"""The instance keeper: the small program that puts an agent into its isolation and execs it.

The local platform does not start the agent directly. It starts this file as a script
(`python -I -S _namespaces.py ...`, stdlib only, so it runs without site-packages) and the script:

1. with namespaces, calls `unshare(CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWNS)` (Python 3.11 has no
   `os.unshare`, so through ctypes), makes every mount private, and forks: the child is PID 1 of the
   new PID namespace. The child asks for SIGKILL when the keeper dies (so the namespace cannot
   outlive it), mounts a fresh /proc and sets its hostname;
2. in the process that will become the agent: joins the instance's cgroups and resctrl group (writes
   its own pid, as its PID namespace numbers it, to each `cgroup.procs` and to the group's `tasks`,
   before anything else runs, so every thread and descendant inherits them), sets its CPU
   affinity, restores the signal dispositions Python changed, and execs the agent's argv;
3. reports over the ready pipe: `pid <host pid of the agent>`, or `err <what failed>` if a step
   failed. The pipe closes on exec, so EOF without `err` means the agent is running;
4. with namespaces, stays as the agent's parent on the host side (the host cannot reap a PID-1
   that is not its child), and exits with the agent's exact status: the same code, or killed by
   the same signal. Without namespaces there is no keeper: the script execs into the agent.

`unshare(1)` would do step 1 in C, but util-linux 2.38 exits 1 instead of dying by SIGKILL when its
child is SIGKILLed (it cannot reset SIGKILL's handler before re-raising), so `wait` could not tell a
killed agent from one that exited 1; it also gives the host no way to learn the agent's pid, and
needs a shell step for the hostname and the cgroups. This keeper costs one Python start (~20 ms)
per launch and ~8 MB on the host side while the instance runs.

`namespace_ids` reads a process's namespace inode numbers for `IsolationReport`.
"""

from __future__ import annotations

import os
import select
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1

#: Exit status of the agent process when a step before exec failed (like env(1)'s 125/127).
SETUP_FAILED = 125
EXEC_FAILED = 127


def namespace_ids(pid: int | str) -> tuple[int, int, int]:
    """(pid, uts, mnt) namespace inode numbers of `pid` ("self" for this process)."""
    return tuple(os.stat(f"/proc/{pid}/ns/{kind}").st_ino for kind in ("pid", "uts", "mnt"))  # type: ignore[return-value]


def keeper_argv(
    *,
    ready_fd: int,
    namespaces: bool,
    hostname: str,
    cpus: frozenset[int] | None,
    cgroup_procs: list[str],
    argv: list[str],
) -> list[str]:
    """The command line that starts the keeper for one instance."""
    cpu_list = ",".join(str(cpu) for cpu in sorted(cpus)) if cpus else ""
    return [
        sys.executable,
        "-I",
        "-S",
        os.path.abspath(__file__),
        str(ready_fd),
        "1" if namespaces else "0",
        hostname,
        cpu_list,
        str(len(cgroup_procs)),
        *cgroup_procs,
        "--",
        *argv,
    ]


def _report(fd: int, line: str) -> None:
    os.write(fd, (line.replace("\n", " ") + "\n").encode())


def _libc_call(libc: object, name: str, *args: object) -> None:
    import ctypes

    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _become_agent(
    ready: int,
    cpus: str,
    cgroup_procs: list[str],
    argv: list[str],
    *,
    namespaces: bool,
    hostname: str,
) -> None:
    """Mount /proc, set the hostname (in new namespaces), join the cgroups, set the affinity and
    exec the agent; report what failed and exit if a step fails."""
    step = "setup"
    try:
        if namespaces:
            step = "mount /proc"
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            _libc_call(libc, "mount", b"proc", b"/proc", b"proc", flags, None)
            step = "sethostname"
            name = hostname.encode()
            _libc_call(libc, "sethostname", name, len(name))
        for path in cgroup_procs:
            step = f"join {os.path.dirname(path)}"
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        if cpus:
            step = f"sched_setaffinity to CPUs {cpus}"
            os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        os.set_inheritable(ready, False)  # closes at exec: EOF tells the host the agent runs
    except OSError as error:
        _report(ready, f"err {step}: {error}")
        os._exit(SETUP_FAILED)
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        _report(ready, f"err exec {argv[0]!r}: {error}")
        os._exit(EXEC_FAILED)


def _exit_like(status: int) -> None:
    """Exit with the same status as a child that ended with wait status `status`."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    signum = -code
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the agent's core is enough
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def main(args: list[str]) -> None:
    ready = int(args[0])
    namespaces = args[1] == "1"
    hostname, cpus = args[2], args[3]
    count = int(args[4])
    cgroup_procs = args[5 : 5 + count]
    argv = args[6 + count :]
    if not namespaces:
        _report(ready, f"pid {os.getpid()}")
        _become_agent(ready, cpus, cgroup_procs, argv, namespaces=False, hostname=hostname)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        _libc_call(libc, "unshare", CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWNS)
        _libc_call(libc, "mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    except OSError as error:
        _report(ready, f"err namespaces: {error}")
        os._exit(SETUP_FAILED)
    alive, alive_w = os.pipe()  # EOF on `alive` once the keeper is gone
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        _libc_call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if select.select([alive], [], [], 0)[0]:  # the keeper died before prctl
            os._exit(SETUP_FAILED)
        os.close(alive)
        _become_agent(ready, cpus, cgroup_procs, argv, namespaces=True, hostname=hostname)
    os.close(alive)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only SIGKILL (or SIGTERM) ends the keeper
    _report(ready, f"pid {pid}")
    os.close(ready)
    _, status = os.waitpid(pid, 0)
    _exit_like(status)


if __name__ == "__main__":
    main(sys.argv[1:])
