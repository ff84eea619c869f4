"""How a long-running command (a sweep, the MLflow UI) learns it should stop: Ctrl-C, SIGTERM
(a scheduler's or `kill`'s stop) and SIGHUP, sent when its terminal or ssh session closes.
A hang-up stops it as SIGTERM does, so what it recorded stays true (a sweep killed by the
default action left its runs RUNNING), unless SIGHUP is ignored, as under `nohup`, which asks
for the command to outlive its terminal."""

from __future__ import annotations

import contextlib
import os
import signal
import stat


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
