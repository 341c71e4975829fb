"""A TCP proxy on loopback that a test puts between the service and its database, to take the database
away from that one test without touching the shared server:

- ``cut()``: close every connection, and close each new one at once (a database that is down);
- ``pause()``: keep connections open, accept new ones, forward nothing (a database that hangs);
- ``restore()``: forward again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

UP, DOWN, PAUSED = "up", "down", "paused"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = UP
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._connections: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == DOWN:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.append((client, upstream))
            threading.Thread(target=self._forward, args=(client, upstream), name="tcpproxy-pipe", daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed and self.mode != DOWN:
                if self.mode == PAUSED:
                    select.select([], [], [], 0.05)
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                if (client, upstream) in self._connections:
                    self._connections.remove((client, upstream))

    def cut(self) -> None:
        self.mode = DOWN

    def pause(self) -> None:
        self.mode = PAUSED

    def restore(self) -> None:
        self.mode = UP

    def close(self) -> None:
        self._closed = True
        self.mode = DOWN
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
