"""The JWT replay check never makes a hook call wait on the database (issue 19): a database that refuses or
hangs is left alone for a while, and the process's own memory of token ids keeps refusing replays to it."""

from __future__ import annotations

import datetime as dt
import threading
import time

from cds_service.storage.replay import ReplayGuard

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)


class Database:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.calls = 0
        self.mode = "up"
        self.release = threading.Event()

    def claim(self, issuer: str, jti: str, expires: dt.datetime) -> bool:
        self.calls += 1
        if self.mode == "down":
            raise ConnectionError("database down")
        if self.mode == "hung":
            self.release.wait(10)
        fresh = (issuer, jti) not in self.seen
        self.seen.add((issuer, jti))
        return fresh


def test_the_database_decides_while_it_answers() -> None:
    db = Database()
    guard = ReplayGuard(db.claim)
    assert guard("iss", "a", LATER) is True
    db.seen.add(("iss", "b"))  # claimed by another replica
    assert guard("iss", "b", LATER) is False
    assert guard("iss", "a", LATER) is False


def test_a_hung_database_costs_a_call_at_most_the_timeout_then_is_left_alone() -> None:
    db = Database()
    guard = ReplayGuard(db.claim, timeout=0.2, retry_after=60)
    db.mode = "hung"
    started = time.perf_counter()
    assert guard("iss", "a", LATER) is True
    assert time.perf_counter() - started < 0.5
    started = time.perf_counter()
    for n in range(50):
        assert guard("iss", f"x{n}", LATER) is True
    assert time.perf_counter() - started < 0.2  # no further waits: the database is left alone
    assert db.calls == 1
    assert guard("iss", "x3", LATER) is False  # a replay to this process is still refused
    db.release.set()
    guard.close()


def test_a_database_that_refuses_falls_back_and_is_tried_again_later() -> None:
    db = Database()
    guard = ReplayGuard(db.claim, timeout=0.5, retry_after=0.05)
    db.mode = "down"
    assert guard("iss", "a", LATER) is True and guard("iss", "a", LATER) is False
    db.mode = "up"
    time.sleep(0.06)
    assert guard("iss", "b", LATER) is True
    assert ("iss", "b") in db.seen  # back to the shared store


def test_memory_of_token_ids_is_bounded() -> None:
    db = Database()
    db.mode = "down"
    guard = ReplayGuard(db.claim, retry_after=60, remember=1000)
    for n in range(5000):
        guard("iss", f"j{n}", LATER)
    assert len(guard._seen) <= 1000
