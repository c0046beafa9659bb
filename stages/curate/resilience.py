"""Retries and rate limits for paid teacher APIs.

Teacher clients turn every failure into one of two exceptions: `Transient` (worth retrying: 408, 429,
5xx, timeouts, connection resets) carrying the server's Retry-After when it gave one, or `Fatal`
(retrying cannot help: a bad key, an unknown model). `call_with_retry` retries transients with
exponential backoff and full jitter, never waiting less than Retry-After, and gives up after
`max_retries` with a `RetriesExhausted` naming the last failure. google-genai's own retry loop is left
off: it ignores Retry-After and does not retry connection resets (read in google-genai 3.4's source).
"""

from __future__ import annotations

import email.utils
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class Transient(Exception):
    """A failure worth retrying. `reason` is a short counter key ("http_429", "timeout", "reset")."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class Fatal(Exception):
    """A failure no retry can fix (bad key, unknown model, malformed request for every sample)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RetriesExhausted(Exception):
    def __init__(self, last: Transient, tries: int):
        super().__init__(f"{last} (gave up after {tries} tries)")
        self.last = last
        self.tries = tries


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110 10.2.3); Google also sends '2s'."""
    if value is None:
        return None
    value = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)s?", value)
    if m:
        return float(m.group(1))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def transport_failure(exc: BaseException) -> Transient | None:
    """Timeouts and broken connections from httpx/httpx2/httpcore/the socket layer, by class name so the
    same check covers every HTTP library version a client brings."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"TimeoutException", "TimeoutError", "timeout", "ReadTimeout", "ConnectTimeout", "WriteTimeout",
                "PoolTimeout"}:
        return Transient("timeout", type(exc).__name__)
    if names & {"ConnectionResetError", "BrokenPipeError", "RemoteProtocolError", "ReadError", "WriteError",
                "ConnectionAbortedError", "ServerDisconnectedError", "IncompleteRead"}:
        return Transient("reset", type(exc).__name__)
    if names & {"ConnectError", "ConnectionRefusedError", "NetworkError", "TransportError", "ConnectionError",
                "ProtocolError"}:
        return Transient("connection", type(exc).__name__)
    return None


@dataclass
class RetryPolicy:
    max_retries: int = 8          # retries after the first try
    base: float = 1.0             # first backoff, seconds
    cap: float = 60.0             # longest backoff, seconds
    max_retry_after: float = 600.0  # a server asking for longer than this is treated as an outage
    rng: random.Random | None = None

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^retry)), never below the server's Retry-After."""
        rng = self.rng or random
        backoff = rng.uniform(0.0, min(self.cap, self.base * (2 ** retry)))
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after), backoff)
        return backoff


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, limiter: "RateLimiter | None" = None,
                    on_retry: Callable[[Transient, float], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep,
                    stop: threading.Event | None = None) -> T:
    """fn() with retries on Transient; Fatal and anything else propagate at once."""
    retry = 0
    while True:
        if stop is not None and stop.is_set():
            raise Stopped()
        if limiter is not None:
            limiter.acquire()
        try:
            return fn()
        except Transient as e:
            if retry >= policy.max_retries:
                raise RetriesExhausted(e, retry + 1) from None
            # Retry-After applies to this request; the other workers learn it from their own 429s
            # (pausing the whole pool on each one stalls it when a share of requests is throttled)
            wait = policy.delay(retry, e.retry_after)
            if on_retry is not None:
                on_retry(e, wait)
            retry += 1
            if stop is not None:
                if stop.wait(wait):
                    raise Stopped() from None
            else:
                sleep(wait)


class Stopped(Exception):
    """The run is stopping (another worker hit a fatal error): do not start new calls."""


class RateLimiter:
    """A thread-safe token bucket: `rpm` requests per minute with bursts up to `burst` requests.

    rpm <= 0 disables it. `pause(s)` holds every caller for s seconds (a 429 with Retry-After)."""

    def __init__(self, rpm: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = rpm / 60.0
        self.capacity = max(1.0, burst if burst is not None else self.rate)  # about one second of tokens
        self.tokens = self.capacity
        self.clock = clock
        self.sleep = sleep
        self.updated = clock()
        self.paused_until = 0.0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, self.clock() + seconds)

    def acquire(self) -> None:
        while True:
            with self.lock:
                now = self.clock()
                wait = self.paused_until - now
                if wait <= 0:
                    if not self.enabled:
                        return
                    self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                    self.updated = now
                    if self.tokens >= 1.0:
                        self.tokens -= 1.0
                        return
                    wait = (1.0 - self.tokens) / self.rate
            self.sleep(wait)
