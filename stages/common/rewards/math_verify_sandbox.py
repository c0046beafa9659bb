"""math-verify under a timeout that works from any thread (module-level state: one helper process, one
log filter, one warm-up, all guarded here and nowhere else)."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MATH_VERIFY_TIMEOUT_S = 2.0
_WORKER_START_TIMEOUT_S = 120.0
_WORKER_COMMAND = "from stages.common.rewards.math_verify_sandbox import _worker_main; _worker_main()"


# ---------------------------------------------------------------------------------------------------
# math-verify under a timeout
#
# math_verify's own timeouts use signal.alarm, which only works in the main thread (it raises
# ValueError elsewhere). So its timeouts are switched off and we bound it ourselves: in the main
# thread with an interval timer whose exception is a BaseException (so library `except Exception`
# blocks cannot swallow it, and the interval re-fires if something does); in any other thread by
# running it in a helper process that is killed on timeout. Both give up with "no match".

_WORKER_LOCK = threading.Lock()
_worker = None
_log_filter_installed = False
_warmed_up = False


class _MathVerifyTimeout(BaseException):
    pass


class _DropDisabledTimeoutWarning(logging.Filter):
    """math_verify warns once that its timeout is off; here that is intended (we enforce our own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _install_log_filter() -> None:
    global _log_filter_installed
    if not _log_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _log_filter_installed = True


def _as_latex(text: str) -> str:
    return text if ("$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text) else f"${text}$"


def _math_verify_compare(pred: str, gold: str) -> bool:
    """math-verify equivalence with its own timeouts off (the caller bounds the time)."""
    from math_verify import parse, verify

    _install_log_filter()
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def math_verify_equal(pred: str, gold: str, timeout_s: float) -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    if timeout_s is None or timeout_s <= 0:
        timeout_s = MATH_VERIFY_TIMEOUT_S
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):
        return _compare_with_timer(pred, gold, timeout_s)
    return _compare_in_worker(pred, gold, timeout_s)


def _raise_timeout(signum, frame):
    raise _MathVerifyTimeout


def _warm_up() -> None:
    """math-verify imports sympy's LaTeX machinery on first use (seconds on a busy machine): pay that
    outside any timeout, so the first real comparison is not cut short."""
    global _warmed_up
    if not _warmed_up:
        _math_verify_compare("1", "1")
        _warmed_up = True


def _compare_with_timer(pred: str, gold: str, timeout_s: float) -> bool:
    _warm_up()
    previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
            return _math_verify_compare(pred, gold)
        except Exception:
            return False
        finally:
            _disarm_timer()
    except _MathVerifyTimeout:
        return False
    finally:
        _disarm_timer()
        signal.signal(signal.SIGALRM, previous_handler)


def _disarm_timer() -> None:
    while True:  # the alarm may fire while we disarm it: then disarm again
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _MathVerifyTimeout:
            continue


def _compare_in_worker(pred: str, gold: str, timeout_s: float) -> bool:
    global _worker
    with _WORKER_LOCK:
        try:
            if _worker is None:
                _worker = _MathVerifyWorker()
            return _worker.compare(pred, gold, timeout_s)
        except Exception:
            if _worker is not None:
                _worker.close()
            _worker = None
            return False


class _MathVerifyWorker:
    """A helper process that runs math-verify; killed (and later restarted) when a call overruns.

    A plain subprocess speaking JSON lines, not multiprocessing: spawn would re-import the caller's
    __main__ (scripts without a main guard would run again), and fork is unsafe with threads."""

    def __init__(self):
        project_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=project_root)
        self._buffer = b""
        try:
            if self._read_line(_WORKER_START_TIMEOUT_S) != b"ready":
                raise RuntimeError("math-verify worker did not start")
        except BaseException:
            self.close()
            raise

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool:
        self.process.stdin.write(json.dumps([pred, gold]).encode() + b"\n")
        self.process.stdin.flush()
        return self._read_line(timeout_s) == b"1"

    def _read_line(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("math-verify timed out")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        try:
            self.process.kill()
            self.process.wait(5)
            self.process.stdin.close()
            self.process.stdout.close()
        except Exception:
            pass


def _worker_main() -> None:
    """The helper process: one JSON [pred, gold] per stdin line, "1"/"0" per stdout line."""
    import math_verify  # noqa: F401  (imported before "ready" so start-up is not charged to a call)

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the reply stream
    _warm_up()
    replies.write(b"ready\n")
    replies.flush()
    for line in sys.stdin.buffer:
        try:
            pred, gold = json.loads(line)
            result = _math_verify_compare(str(pred), str(gold))
        except Exception:
            result = False
        replies.write(b"1\n" if result else b"0\n")
        replies.flush()
