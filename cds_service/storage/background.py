"""Calls run on a daemon thread of their own, one at a time, each answered by a Future.

A database call can hang for as long as the database does (a server that stops answering leaves its
connections open). Run on such a thread, it blocks that thread only: the caller waits for the Future
with a timeout of its choosing, and a call that never returns cannot keep the process from exiting.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Background:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to whoever waits for the Future
                future.set_exception(error)

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((future, function, args))
        return future

    def close(self) -> None:
        """Stop after the calls already submitted (without waiting for them)."""
        self._calls.put(None)
