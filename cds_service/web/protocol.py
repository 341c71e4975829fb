"""uvicorn's HTTP protocol (httptools) with the limits uvicorn has no option for: a header read timeout and a
cap on the size of a request's head (request line and headers).

uvicorn closes a keep-alive connection that stays idle, but not one that trickles its request headers, nor a
new connection that sends nothing. Here a request's headers must be complete within the header read timeout,
counted from the connection's opening or from the first byte of a following request; otherwise the
connection is answered 408 and closed. A head over :data:`MAX_HEAD_BYTES` is answered 431 and closed.
``cds-service serve`` passes the timeout to its workers in ``$CDS_SERVICE_HEADER_READ_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import ENV_HEADER_READ_TIMEOUT

DEFAULT_HEADER_READ_TIMEOUT = 10.0
MAX_HEAD_BYTES = 64 * 1024


def _header_read_timeout() -> float:
    try:
        value = float(os.environ.get(ENV_HEADER_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT))
    except ValueError:
        return DEFAULT_HEADER_READ_TIMEOUT
    return value if value > 0 else DEFAULT_HEADER_READ_TIMEOUT


def _refusal(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_read_timeout = _header_read_timeout()
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._header_timer is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(b"431 Request Header Fields Too Large")

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a response is still being sent; the next request's headers may wait for it
            return
        self._refuse(b"408 Request Timeout")

    def _refuse(self, status: bytes) -> None:
        self._disarm()
        self.transport.write(_refusal(status))
        self.transport.close()
