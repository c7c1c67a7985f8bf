"""Preemption and time limits: finish the optimizer step, save a checkpoint, then leave.

Slurm warns a job before its time limit with a signal (USR2 under submitit, which then requeues the job)
and preempts with TERM. While a task trains, such a signal is held until the end of the current step;
the run saves a checkpoint there and hands the signal to the handler that was installed before ours:
submitit's requeues the job and exits, and without one the process exits with 128 + the signal number.
Outside training there is nothing to save beyond the finished stages, so the signal acts at once. A
requeued job re-runs the same command line, which resumes from that checkpoint. Ctrl-C (INT) is held the
same way and exits with 130; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# submitit's preemption signal (its SUBMITIT_PREEMPT_SIGNAL), the other user signal, TERM and Ctrl-C
_NAMES = ("USR2", "USR1", "TERM", "INT")
# The exit status of a rank that stops because another rank of its job was signalled.
PEER_EXIT = 143
_pending: int | None = None
_previous: dict[int, object] = {}


def _signals() -> list[int]:
    names = {os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), *_NAMES}
    return sorted({int(getattr(signal, f"SIG{n}")) for n in names if hasattr(signal, f"SIG{n}")})


def _hold(signum: int, frame: object) -> None:
    global _pending
    if signum == signal.SIGINT and _pending == signal.SIGINT:
        _pending = None
        raise KeyboardInterrupt  # a second Ctrl-C: stop now (writes are atomic; the last checkpoint stays)
    _pending = signum
    name = signal.Signals(signum).name
    print(f"[sdft] {name}: saving a checkpoint at the end of this optimizer step", flush=True)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold the preemption signals while a task trains (main thread only; elsewhere a no-op)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a signal the process was started ignoring (INT under nohup or `cmd &`) stays ignored
    previous = {s: h for s in _signals() if (h := signal.getsignal(s)) != signal.SIG_IGN}
    _previous.update(previous)
    for s in previous:
        signal.signal(s, _hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        _previous.clear()
        held, _pending = _pending, None
        if held is not None:  # arrived after the last step: act on it now
            _act(held, previous)


def requested() -> bool:
    """A held signal is waiting for the end of the step."""
    return _pending is not None


def act() -> None:
    """Hand the held signal to the handler it interrupted (after the caller saved a checkpoint)."""
    global _pending
    held, _pending = _pending, None
    if held is not None:
        _act(held, _previous)


def _act(signum: int, handlers: dict[int, object]) -> None:
    handler = handlers.get(signum, signal.SIG_DFL)
    if handler is signal.default_int_handler:  # Ctrl-C without a handler of the caller's: exit 130
        raise SystemExit(128 + signum)
    if callable(handler):
        handler(signum, None)  # submitit: requeue and exit; a handler that returns lets training go on
        return
    raise SystemExit(128 + signum)
