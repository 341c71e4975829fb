"""A FHIR server for the benchmark's FHIR path, on loopback: answers the service's patient-scoped searches
with what the Synthea record of the ``ehr`` size holds (bench/requests.py), after ``--delay-ms`` milliseconds per
search. A search without ``Authorization: Bearer <--token>`` gets 401, so that a client that loses or mixes up the
token shows as errors. HTTP/1.1 keep-alive on asyncio streams (uvloop when installed), with the answers built at
start: the server's own cost per search is tens of microseconds, so the benchmark measures the service.

    python bench/fhir_server.py --port PORT [--delay-ms 50] [--token T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.requests import PUMP_RECORD, _service, ehr_prefetch, searchset  # noqa: E402


def pages() -> dict[str, bytes]:
    """Search results by resource type, as the service's templates select them from the record."""
    record = [e["resource"] for e in json.loads((ROOT / "fixtures/records" / PUMP_RECORD).read_text())["entry"]]
    prefetch = ehr_prefetch(_service(), record)
    out: dict[str, bytes] = {}
    for value in prefetch.values():
        entries = value.get("entry", []) if isinstance(value, Mapping) else []
        by_type: dict[str, list[Any]] = {}
        for entry in entries:
            by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
        for rtype, resources in by_type.items():
            out[rtype] = json.dumps(searchset(resources)).encode()
    return out


def response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


class FhirServer:
    def __init__(self, delay_ms: float, token: str) -> None:
        self.delay = delay_ms / 1000
        self.authorization = f"authorization: bearer {token}".encode()
        self.pages = {rtype.encode(): response("200 OK", body) for rtype, body in pages().items()}
        self.empty = response("200 OK", json.dumps(searchset([])).encode())
        self.refused = response("401 Unauthorized", b"")

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                authorized = any(line.lower() == self.authorization for line in head.split(b"\r\n"))
                if self.delay:
                    await asyncio.sleep(self.delay)
                rtype = path.split(b"?", 1)[0].rsplit(b"/", 1)[-1]
                writer.write(self.pages.get(rtype, self.empty) if authorized else self.refused)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


async def serve(port: int, delay_ms: float, token: str) -> None:
    server = FhirServer(delay_ms, token)
    listener = await asyncio.start_server(server.connection, "127.0.0.1", port)
    async with listener:
        await listener.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--token", default="bench-token")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.delay_ms, args.token))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
