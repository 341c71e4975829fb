"""Moving audit and feedback records from the request path to the database, through the spool when the
database cannot take them. The request path never waits for the database.

The request path hands a record over with ``submit``, which never blocks (a bounded queue; when it is
full the caller puts the record in the spool itself). The writer (:class:`Pump`) does the rest:

- New records are kept in memory and written in batches, one database call at a time, on a thread of
  their own (background.py). A call that fails, or that takes longer than ``database_timeout`` (a
  database that hangs instead of refusing), sends every record in memory to the spool, in order; so
  does a backlog of more than ``HELD_MAX`` records.
- While the spool holds records, new records go behind them, and one writer per spool (the one holding
  its replay lock) replays it in order, idempotently (the record key), with exponential backoff and
  jitter between failed attempts. A writer that starts with a spool replays it first.
- On stop (the serving process closes the store on SIGTERM), the writer lets the database take what is
  in memory if it answers within ``database_timeout``, and spools the rest before the process exits.

Two writers with one interface (``submit`` / ``revive`` / ``state`` / ``close``):

- :class:`ThreadWriter`: a thread in the serving process.
- :class:`ProcessWriter`: a child process with its own interpreter, so the serving event loop and the
  writer never compete for one GIL (measured with ``bench/run.py``; see bench/README.md).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_future
from dataclasses import dataclass
from typing import Any, Protocol

from ..observability.logs import configure_from_environment
from ..observability.metrics import AUDIT_WRITTEN
from .audit_db import AuditDatabase
from .background import Background
from .records import Record
from .spool import Position, Spool

log = logging.getLogger("cds_service.storage")

BATCH = 100  # records per database transaction
HELD_MAX = 256  # records kept in memory for a slow database before they go to the spool
RETRY_FIRST = 0.1  # seconds before the first retry; doubled per failure, up to RETRY_CAP
RETRY_CAP = 2.0
POLL_BUSY = 0.02  # how often the writer looks at a database call in progress
POLL_IDLE = 1.0
WRITER_ERROR = "writer_error"


class AuditWriter(Protocol):
    def submit(self, record: Record) -> bool: ...

    def revive(self) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


Write = Callable[[Sequence[Record]], list[Record]]


@dataclass
class _Flight:
    """A database call in progress: records from memory (``end`` None) or a chunk of the spool."""

    future: Future[list[Record]]
    started: float
    records: list[Record]
    end: Position | None


class Pump:
    """Moves records to the database, through the spool when it cannot take them. ``write`` stores
    records idempotently and returns those the database refused one by one; it raises when the
    database is unavailable."""

    def __init__(self, write: Write, spool: Spool, database_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._spool = spool
        self._timeout = database_timeout
        self._clock = clock
        self._held: deque[Record] = deque()
        self._flight: _Flight | None = None
        self._hung = False
        self._failures = 0
        self._retry_at = 0.0
        self._database = Background("cds-audit-database")
        self.database_state = "unknown"

    @property
    def busy(self) -> bool:
        return self._flight is not None or bool(self._held) or self._spool.has_backlog()

    def accept(self, records: Sequence[Record]) -> None:
        """New records: kept for the database while it keeps up, else behind the spool's."""
        if self._hung or self._spool.has_backlog():
            self._spool.append(records)
            return
        self._held.extend(records)
        if len(self._held) > HELD_MAX:
            log.warning("audit database behind by %d records: they go to the spool", len(self._held))
            self._spill()

    def _spill(self) -> None:
        """Every record in memory to the spool, in order (a call in progress may still store some of
        them: their replay is then a no-op)."""
        records = list(self._held)
        self._held.clear()
        self._spool.append(records)

    def step(self) -> None:
        """Collect a finished database call, watch a running one, start the next."""
        now = self._clock()
        flight = self._flight
        if flight is not None:
            if flight.future.done():
                self._land(flight, now)
            elif not self._hung and now - flight.started > self._timeout:
                self._hung = True
                self._set_state("unresponsive", f"no answer within {self._timeout:g} s")
                self._spill()
        if self._flight is None and now >= self._retry_at:
            self._launch(now)

    def _launch(self, now: float) -> None:
        if self._spool.has_backlog():
            if self._held:  # another process started the backlog: ours goes behind it
                self._spill()
            if not self._spool.acquire_replay():
                return  # another process of this replica replays the spool
            chunk = self._spool.read(BATCH)
            if chunk is not None:
                self._flight = _Flight(self._database.submit(self._write, chunk.records), now, chunk.records,
                                       chunk.end)
        elif self._held:
            records = list(itertools.islice(self._held, BATCH))
            self._flight = _Flight(self._database.submit(self._write, records), now, records, None)

    def _land(self, flight: _Flight, now: float) -> None:
        self._flight = None
        self._hung = False
        try:
            rejected = flight.future.result()
        except Exception as error:  # the database is unavailable: retry later, keep everything
            self._failures += 1
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (self._failures - 1))
            self._retry_at = now + delay * (0.5 + 0.5 * random.random())
            self._set_state("down", type(error).__name__)
            if flight.end is None:
                self._spill()
            return
        self._failures = 0
        self._set_state("up")
        AUDIT_WRITTEN.inc(len(flight.records) - len(rejected))
        self._spool.reject(rejected)
        if flight.end is not None:
            self._spool.advance(flight.end)
        elif self._held and self._held[0] is flight.records[0]:
            for _ in flight.records:
                self._held.popleft()

    def _set_state(self, state: str, why: str = "") -> None:
        if state == self.database_state:
            return
        previous, self.database_state = self.database_state, state
        if state == "up":
            if previous != "unknown":
                log.warning("audit database available again; the spool is replayed into it")
        else:
            log.error("audit database %s (%s): records go to the spool %s", state, why, self._spool.directory)

    def finish(self) -> None:
        """Stop: let the database take what is in memory if it answers within ``database_timeout``;
        spool the rest. Does not wait for a database call that hangs."""
        deadline = self._clock() + self._timeout
        while (left := deadline - self._clock()) > 0:
            flight = self._flight
            if flight is not None:
                if not flight.future.done():
                    if self._hung:
                        break  # already given up on: its records are in the spool
                    wait_for_future([flight.future], timeout=left)
                    if not flight.future.done():
                        break
                self._land(flight, self._clock())
            elif self._held and not self._hung and self._failures == 0 and not self._spool.has_backlog():
                self._launch(self._clock())
            else:
                break
        self._spill()
        self._spool.release_replay()
        self._database.close()


def _drain(first: Any, get_nowait: Callable[[], Any]) -> tuple[list[Any], bool]:
    """``first`` (unless it is the stop marker None) and whatever else is queued, up to a batch; True
    when the stop marker was seen."""
    batch: list[Any] = []
    stopping = first is None
    if first is not None:
        batch.append(first)
    while len(batch) < BATCH:
        try:
            item = get_nowait()
        except queue.Empty:
            break
        if item is None:
            stopping = True
            continue
        batch.append(item)
    return batch, stopping


def run_pump(pump: Pump, spool: Spool, get: Callable[[bool, float], Any], get_nowait: Callable[[], Any],
             orphaned: Callable[[], bool] = lambda: False) -> None:
    """Feed ``pump`` from a queue until the stop marker (None), or until ``orphaned()``; then finish.
    Nothing raised here stops the writer: a record it cannot handle is counted and logged as dropped."""
    stopping = False
    while not stopping:
        batch: list[Any] = []
        try:
            first = get(True, POLL_BUSY if pump.busy else POLL_IDLE)
        except queue.Empty:
            if orphaned():
                break
        else:
            batch, stopping = _drain(first, get_nowait)
        if batch:
            try:
                pump.accept(batch)
            except Exception:
                log.exception("audit writer: records not accepted")
                spool.count_drops(WRITER_ERROR, batch)
        try:
            pump.step()
        except Exception:  # the records stay where they are (memory or spool); the next step retries
            log.exception("audit writer error")
    pump.finish()


def _offer(records: Any, record: Record) -> bool:
    """Queue ``record`` without waiting; False when the queue is full."""
    try:
        records.put_nowait(record)
    except queue.Full:
        return False
    return True


def _stop_timeout(database_timeout: float) -> float:
    return 3 * database_timeout + 30


class ThreadWriter:
    def __init__(self, write: Write, spool: Spool, max_queued: int = 64, database_timeout: float = 5.0) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self._timeout = database_timeout
        pump = Pump(write, spool, database_timeout)
        self._thread = threading.Thread(target=run_pump, args=(pump, spool, self._queue.get, self._queue.get_nowait),
                                        name="cds-audit-writer", daemon=True)
        self._thread.start()

    def submit(self, record: Record) -> bool:
        return self._thread.is_alive() and _offer(self._queue, record)

    def revive(self) -> None:
        """Nothing to do: the thread survives every error of the database and the spool."""

    def state(self) -> dict[str, Any]:
        return {"writer": "thread", "running": self._thread.is_alive(), "queued": self._queue.qsize()}

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)  # the writer takes records without waiting for the database
            self._thread.join(timeout=_stop_timeout(self._timeout))


@dataclass(frozen=True)
class WriterSettings:
    """What the writer process needs (picklable: the process is spawned): where the database and the spool are."""

    url: str
    spool_dir: str
    spool_max_bytes: int
    database_timeout: float

    def open_database(self) -> AuditDatabase:
        """The database, as the writer process opens it (the schema is migrated before the first write)."""
        return AuditDatabase(self.url, self.database_timeout)


def _child(settings: WriterSettings, records: Any, parent: int) -> None:
    # The parent decides when the writer stops (it sends None after its last record), so that a signal
    # sent to the whole process group cannot stop the writer before the records are spooled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_from_environment()
    database = settings.open_database()
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    try:
        run_pump(Pump(database.write_records, spool, settings.database_timeout), spool, records.get,
                 records.get_nowait, orphaned=lambda: os.getppid() != parent)
    finally:
        spool.close()
        database.close()


class ProcessWriter:
    """The writer in a child process. If the child dies, the records it had not taken are moved to the
    spool and a new child is started (``revive``, at most every ``REVIVE_SECONDS``)."""

    REVIVE_SECONDS = 5.0

    def __init__(self, settings: WriterSettings, spool: Spool, max_queued: int = 64) -> None:
        self._settings = settings
        self._spool = spool
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._closed = False
        self._revived = 0.0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._queue: Any = context.Queue(maxsize=self._max_queued)
        self._process = context.Process(target=_child, args=(self._settings, self._queue, os.getpid()),
                                        name="cds-audit-writer", daemon=False)
        self._process.start()

    def submit(self, record: Record) -> bool:
        with self._lock:
            if self._closed or not self._process.is_alive():
                return False  # the caller spools it, then calls revive()
            return _offer(self._queue, record)

    def _leftovers(self) -> list[Record]:
        """What a dead child's queue still holds."""
        left: list[Record] = []
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except (queue.Empty, OSError, EOFError):
                break
            if item is not None:
                left.append(item)
        self._queue.cancel_join_thread()
        self._queue.close()
        return left

    def revive(self) -> None:
        with self._lock:
            if self._closed or self._process.is_alive() or time.monotonic() - self._revived < self.REVIVE_SECONDS:
                return
            self._revived = time.monotonic()
            log.critical("audit writer process exited (code %s); starting a new one", self._process.exitcode)
            self._spool.append(self._leftovers())
            self._start()

    def state(self) -> dict[str, Any]:
        try:
            queued = self._queue.qsize()
        except (NotImplementedError, OSError):
            queued = -1
        return {"writer": "process", "running": self._process.is_alive(), "queued": queued}

    def close(self) -> None:
        """Stop the child after it has taken every queued record; what a dead (or stuck, then terminated)
        child did not take goes to the spool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        timeout = _stop_timeout(self._settings.database_timeout)
        if self._process.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.critical("audit writer process does not take records")
            self._process.join(timeout=timeout)
        if self._process.is_alive():
            log.critical("audit writer process did not finish spooling; terminating it")
            self._process.terminate()
            self._process.join(timeout=5)
        self._spool.append(self._leftovers())
