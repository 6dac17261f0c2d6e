"""When to retry a request, and how long to wait first: sans-I/O, shared by both clients.

Two kinds of calls (see :class:`Retry`):

- ``SAFE`` calls may reach the server twice without harm: reads, and pushes, which carry an
  ``Idempotency-Key`` so that the server applies a repeated push only once. They are retried on
  every connection-level failure (connect, read, write, protocol errors, timeouts) and on 503:
  the server answers 503 only when it did nothing (problem types ``unavailable``: connections
  or memory exhausted, and ``journal-unavailable``), and a proxy's 503 means the same.
- ``CONNECT`` calls change state and are not idempotent (create, import, PATCH, PUT, DELETE).
  They are retried only when the request certainly never left: the connection could not be made
  or no pooled connection became free.

The wait before retry ``n`` (0-based) is ``backoff * 2**n``, capped at :data:`MAX_BACKOFF`, plus
up to 10% jitter so that many workers do not retry in lockstep; a 503's ``Retry-After`` (in
seconds) lengthens it, up to the same cap.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import httpx

from optserver_client.exceptions import TransportError

__all__ = ["MAX_BACKOFF", "Attempts", "Retry", "RetryPolicy"]

#: Longest wait between two attempts, in seconds.
MAX_BACKOFF = 10.0

# Failures after which the server may or may not have received the request.
_TRANSIENT: tuple[type[httpx.RequestError], ...] = (
    httpx.TimeoutException,  # connect, read, write and pool timeouts
    httpx.NetworkError,  # connect, read, write and close errors
    httpx.RemoteProtocolError,  # e.g. a kept-alive connection closed under the request
)
# Failures that guarantee the server never saw the request.
_NOT_SENT: tuple[type[httpx.RequestError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)


class Retry(enum.Enum):
    """How much retrying a call tolerates."""

    SAFE = "safe"
    CONNECT = "connect"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retries`` extra attempts at most, waiting ``backoff * 2**n`` seconds before retry n."""

    retries: int = 5
    backoff: float = 0.1

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0:
            raise ValueError("retries and backoff must not be negative")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        base = min(MAX_BACKOFF, self.backoff * 2.0**attempt)
        if retry_after is not None:
            base = max(base, min(retry_after, MAX_BACKOFF))
        return base * (1.0 + 0.1 * random.random())

    def start(self, method: str, url: str, retry: Retry) -> Attempts:
        return Attempts(self, method, url, retry)


class Attempts:
    """The retry state of one logical call; the I/O loop asks it what to do after each attempt.

    ``after_error`` returns the delay before the next attempt or raises :class:`TransportError`;
    ``after_status`` returns a delay, or None when the response is final.
    """

    def __init__(self, policy: RetryPolicy, method: str, url: str, retry: Retry) -> None:
        self._policy = policy
        self._method = method
        self._url = url
        self._retry = retry
        self.count = 0  # attempts made so far

    def after_error(self, error: httpx.RequestError) -> float:
        self.count += 1
        retryable = _NOT_SENT if self._retry is Retry.CONNECT else _TRANSIENT
        if isinstance(error, retryable) and self.count <= self._policy.retries:
            return self._policy.delay(self.count - 1)
        plural = "s" if self.count > 1 else ""
        raise TransportError(
            f"{self._method} {self._url} failed after {self.count} attempt{plural}: "
            f"{type(error).__name__}: {error}",
            error=error,
            attempts=self.count,
        ) from error

    def after_status(self, status: int, retry_after: str | None) -> float | None:
        self.count += 1
        if status != 503 or self._retry is not Retry.SAFE or self.count > self._policy.retries:
            return None
        return self._policy.delay(self.count - 1, _seconds(retry_after))


def _seconds(value: str | None) -> float | None:
    # Retry-After may also be an HTTP date; only the delta-seconds form is worth honouring here.
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
