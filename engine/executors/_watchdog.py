"""The keeper of a local Ray head: every process of the cluster dies with the driver.

``python _watchdog.py [--remove FOLDER] COMMAND...`` runs COMMAND (``ray start --head
--block ...``) as its child and makes itself a child subreaper (Linux's
``PR_SET_CHILD_SUBREAPER``): whatever the cluster's processes become, even after
their parents die, they stay our descendants, so "every process of this cluster" is
exactly the tree under this process, not a guess from names or command lines (Ray's
workers and agents rename themselves ``ray::IDLE``, ``ray::DashboardAgent``, and the
agents drop the environment they were started with).

It stops the cluster when any of these happens:

- its stdin reaches end of file: the driver closed it to stop the cluster, or the
  driver died, however (the kernel closes a dead process's pipes, SIGKILL included);
- its parent changes (the driver died while some other process it forked still
  holds the pipe open);
- SIGTERM or SIGHUP;
- COMMAND exits by itself (the head failed to start, or died).

Stopping sends SIGTERM to the head (which stops Ray's processes in their order),
then to every descendant left, then SIGKILL to those left after the grace periods,
and reaps them all; then it removes FOLDER, if given (the head's temporary
files). It exits only once it has no descendant left, with 0 after a requested stop,
and COMMAND's exit code (1 for 0) when COMMAND ended first. It imports nothing
outside the standard library, so it runs as a plain script (``python -I``).

Why not ``PR_SET_PDEATHSIG`` on ``ray start`` alone: ``ray start --block`` ties
gcs_server and the raylet to itself that way, but the raylet's agents outlive them by
tens of seconds, and PDEATHSIG fires when the *thread* that forked the child exits,
so a driver that enters the cluster from a worker thread would lose it when that
thread is recycled. A pipe and the parent's pid do not depend on threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import ClassVar

GRACE_S = 5.0
POLL_S = 0.25
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def descendants(root: int) -> list[int]:
    """Pids of every process under ``root``, zombies included, from the parent pid
    that /proc gives each process. Blocking; Linux only."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name, in parentheses, may hold spaces and parentheses itself.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class _State:
    stop_requested = False  # set by SIGTERM or SIGHUP
    reaped: ClassVar[dict[int, int]] = {}  # pid -> exit code


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    _State.stop_requested = True


def _reap() -> None:
    """Collect the exit code of every child that has ended, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _State.reaped[pid] = os.waitstatus_to_exitcode(status)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
    """Reap children until ``done()`` or ``timeout_s``; whether ``done()``."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap()
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_tree(head: int | None, grace_s: float = GRACE_S) -> None:
    """Stop every descendant and reap it; returns once none is left.

    First SIGTERM to ``head`` alone (``ray start``, which then stops its processes
    in order: gcs_server must still be up while the raylet drains), then SIGTERM to
    all that is left, each step with up to ``grace_s``, then SIGKILL until none is.
    """
    me = os.getpid()
    if head is not None:
        _signal_all([head], signal.SIGTERM)
        _wait(lambda: head in _State.reaped, grace_s)
    _signal_all(descendants(me), signal.SIGTERM)
    _wait(lambda: not descendants(me), grace_s)
    while left := descendants(me):
        _signal_all(left, signal.SIGKILL)  # again and again: one may fork meanwhile
        _wait(lambda: not descendants(me), 0.2)


def _die_with_us() -> Callable[[], None]:
    """A preexec_fn: the kernel SIGKILLs the child if the watchdog dies.

    The watchdog is single-threaded, so PDEATHSIG's thread rule cannot bite here.
    Should the watchdog itself be SIGKILLed, the head goes too, and Ray's own fate
    sharing takes gcs_server and the raylet with it (its agents linger a while).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # we died before the request took effect
            os._exit(1)

    return preexec


def main(argv: list[str]) -> int:
    """Run ``argv`` until told to stop or the driver dies; see the module's text."""
    remove: str | None = None
    if argv[:1] == ["--remove"] and len(argv) >= 2:
        remove, argv = argv[1], argv[2:]
    if not argv:
        print("usage: python _watchdog.py [--remove FOLDER] COMMAND...", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"watchdog: PR_SET_CHILD_SUBREAPER failed: {os.strerror(ctypes.get_errno())}")
        return 1
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when to stop
    head = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_us())
    while not _State.stop_requested and os.getppid() == parent:
        try:
            readable, _, _ = select.select([0], [], [], POLL_S)
        except InterruptedError:
            continue  # a signal: the loop's condition looks at it
        if readable and not os.read(0, 4096):
            break  # end of file: asked to stop, or the driver is gone
        _reap()
        if head.pid in _State.reaped:
            break
    code = _State.reaped.get(head.pid)  # None: the head still runs
    stop_tree(head.pid if code is None else None)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)
    head.returncode = _State.reaped.get(head.pid, 0)  # reaped here, not by Popen
    if code is None:
        return 0  # stopped as asked
    # The head ended by itself: a failure, whatever its code.
    return code if code > 0 else 128 - code if code < 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
