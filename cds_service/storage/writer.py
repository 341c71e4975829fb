"""Writing audit records off the request path.

Two writers with one interface (``submit`` / ``close``):

- :class:`ThreadWriter`: a background thread in the serving process (used by tests and the library).
- :class:`ProcessWriter`: a child process with its own interpreter, so the serving event loop and the
  writer never compete for one GIL. Measured with ``bench/run.py``: the thread writer cost the serving
  process about a quarter of its throughput on large requests; see bench/README.md.

Both hold at most ``max_queued`` records; when full, ``submit`` returns False and the caller writes the
record itself (backpressure: memory stays bounded and nothing is dropped). ``close`` flushes everything
queued, which the web app calls on graceful shutdown (uvicorn handles SIGTERM that way).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger("cds_service.storage")
BATCH = 200


class AuditWriter(Protocol):
    def submit(self, record: Any) -> bool: ...

    def close(self) -> None: ...


def _drain(get: Callable[[], Any], first: Any, get_nowait: Callable[[], Any]) -> tuple[list[Any], bool]:
    """``first`` and whatever else is queued (up to a batch); True when the stop marker was seen."""
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


def _offer(records: Any, record: Any) -> bool:
    """Queue ``record`` without waiting; False when the queue is full."""
    try:
        records.put_nowait(record)
    except queue.Full:
        return False
    return True


def write_with_retries(write: Callable[[Sequence[Any]], None], batch: list[Any]) -> None:
    if not batch:
        return
    for attempt in range(3):
        try:
            write(batch)
            return
        except Exception as error:  # a failed write must never kill the writer
            log.error("audit write failed (attempt %d, %d records): %s", attempt + 1, len(batch),
                      type(error).__name__)
    log.critical("audit write failed; %d records could not be stored", len(batch))


class ThreadWriter:
    def __init__(self, write: Callable[[Sequence[Any]], None], max_queued: int = 64) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._loop, name="audit-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = _drain(self._queue.get, self._queue.get(), self._queue.get_nowait)
            write_with_retries(self._write, batch)

    def submit(self, record: Any) -> bool:
        return _offer(self._queue, record)

    def close(self) -> None:
        self._queue.put(None)  # blocks while the queue is full: the writer is draining it
        self._thread.join()


def _child(url: str, records: Any, parent: int) -> None:
    # The parent decides when the writer stops (it sends None after its last record), so that a signal
    # sent to the whole process group cannot stop the writer before the records are flushed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .store import Store

    store = Store(url, writer="none")
    stopping = False
    try:
        while not stopping:
            try:
                first = records.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the parent died without closing us: flush and leave
                    first = None
                else:
                    continue
            batch, stopping = _drain(records.get, first, records.get_nowait)
            write_with_retries(store.write_audit, batch)
    finally:
        store.close()


class ProcessWriter:
    def __init__(self, url: str, max_queued: int = 64) -> None:
        context = multiprocessing.get_context("spawn")
        self._queue: Any = context.Queue(maxsize=max_queued)
        self._process = context.Process(target=_child, args=(url, self._queue, os.getpid()),
                                        name="cds-audit-writer", daemon=False)
        self._process.start()
        self._closed = False

    def submit(self, record: Any) -> bool:
        if self._closed or not self._process.is_alive():
            return False  # the caller writes it itself: nothing is lost if the writer died
        return _offer(self._queue, record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._process.is_alive():
            self._queue.put(None)
        self._queue.close()
        self._queue.join_thread()
        self._process.join(timeout=120)
        if self._process.is_alive():
            log.critical("audit writer process did not finish flushing; terminating it")
            self._process.terminate()
