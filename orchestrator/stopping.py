"""How a command learns it should stop: Ctrl-C, SIGTERM (a scheduler's or `kill`'s stop) and
SIGHUP, sent when its terminal or ssh session closes. Each stops it as Ctrl-C does, cleaning
up (a staged output folder removed, child processes ended) and keeping what it recorded true
(a sweep killed by the default action left its runs RUNNING). Where SIGHUP is ignored, as
under `nohup`, which asks a command to outlive its terminal, a hang-up is left ignored. SIGINT
ignored at start (a script's background job) stays so for the plain commands, as Python leaves
it; a sweep and the UI take it all the same (their tests send it to a driver whatever started
the test run)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def stop_signals() -> list[signal.Signals]:
    """The signals that ask this process to stop, to handle all alike."""
    hang_up = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else []
    return [signal.SIGINT, signal.SIGTERM, *hang_up]


def leave_closed_terminal(signum: int) -> None:
    """After a hang-up, the standard streams that were the terminal write to /dev/null: a write
    to a closed terminal fails (EIO), and would fail the stop that records the interrupt. (A
    closed terminal is no longer a tty to `isatty`, but still a character device; a log file or
    pipe is neither and is kept.)"""
    if signum != signal.SIGHUP:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        with contextlib.suppress(OSError):  # a stream that was closed
            if stat.S_ISCHR(os.fstat(stream).st_mode):
                os.dup2(devnull, stream)
    os.close(devnull)


@contextlib.contextmanager
def handling(numbers: Iterable[int], handler: Callable[[int, Any], Any] | int) -> Iterator[None]:
    """Inside, `handler` handles the signals `numbers`; after, the handlers before it again."""
    previous = {number: signal.signal(number, handler) for number in numbers}
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)


@contextlib.contextmanager
def stops_as_ctrl_c() -> Iterator[None]:
    """Inside, SIGTERM and a hang-up raise KeyboardInterrupt, as Ctrl-C does, so that what
    cleans up on it runs (their default action ended the process at once: an `unlearn` stopped
    by a scheduler left its hidden staging folder, a whole model at 7B, and `toy-task` its
    training process running). A sweep and the UI handle them inside, in their own way."""

    def interrupt(signum: int, frame: object) -> None:
        leave_closed_terminal(signum)
        raise KeyboardInterrupt

    with handling([number for number in stop_signals() if number != signal.SIGINT], interrupt):
        yield


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ends_with_this_process() -> Callable[[], None] | None:
    """A `preexec_fn` for a child that must not outlive this process however it ends, also by
    SIGKILL (`kill -9`, the OOM killer), which no handler here sees: on Linux the kernel then
    sends the child SIGTERM (`ui`'s MLflow server, in its own session, kept serving and its port
    taken). None where there is no such request."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def request_sigterm_on_parent_death() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # this process ended before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return request_sigterm_on_parent_death
