"""The JWT replay check without waiting on the database.

A token id (``jti``) is claimed in the shared database, so that a token accepted by one worker or replica is
refused by every other. When the database does not answer within ``timeout`` seconds (down, or hung), the
claim falls back to this process's own memory of the ids it has seen, and the database is left alone for
``retry_after`` seconds (one probe at a time), so a hook call never waits longer than that timeout on it. While
the database is away, a token replayed to this process is still refused; a token replayed to another
process or replica within its lifetime (at most a few minutes) may not be: that is the stated bound, logged.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("cds_service.storage")

Claim = Callable[[str, str, dt.datetime], bool]


class ReplayGuard:
    def __init__(self, claim: Claim, timeout: float = 0.5, retry_after: float = 5.0, remember: int = 100_000) -> None:
        self._claim = claim
        self.timeout = timeout
        self.retry_after = retry_after
        self.remember = remember
        self._seen: dict[tuple[str, str], float] = {}  # (issuer, jti) -> expiry (epoch seconds)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._probe: concurrent.futures.Future[bool] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jti-replay")

    def __call__(self, issuer: str, jti: str, expires_at: dt.datetime) -> bool:
        """True when the token id was not seen before (it is recorded now); False for a replay."""
        key = (issuer, jti)
        now = time.time()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and seen > now:
                return False
            use_database = now >= self._down_until and (self._probe is None or self._probe.done())
            if use_database:
                self._probe = self._executor.submit(self._claim, issuer, jti, expires_at)
                probe = self._probe
        if use_database:
            try:
                fresh = probe.result(timeout=self.timeout)
            except Exception as error:  # down, hung or refusing: fall back, never fail the call
                with self._lock:
                    self._down_until = time.time() + self.retry_after
                log.warning("jti replay store unavailable (%s): checking this process's memory only for %g s",
                            type(error).__name__ if not isinstance(error, TimeoutError) else "no answer",
                            self.retry_after)
            else:
                if not fresh:
                    return False
        return self._remember(key, expires_at.timestamp(), now)

    def _remember(self, key: tuple[str, str], expires: float, now: float) -> bool:
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and seen > now:
                return False
            if len(self._seen) >= self.remember:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                if len(self._seen) >= self.remember:  # still full of live ids: forget the soonest to expire
                    for old in sorted(self._seen, key=self._seen.__getitem__)[: len(self._seen) // 10 or 1]:
                        del self._seen[old]
            self._seen[key] = expires
            return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
