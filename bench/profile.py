"""Where a hook call's time goes in process: the whole ASGI app (routing, CORS, body, parsing, the decision
path, cards, audit hand-off; not uvicorn's HTTP parsing), profiled with pyinstrument.

    python bench/profile.py [--size ehr] [--requests 2000] [--html out.html]

Builds the app as ``cds-service serve`` does (cds_service/web/asgi.py, SQLite audit log in a temporary
directory), sends ``--requests`` requests of one size (bench/requests.py) after 200 unprofiled ones, and
prints the mean time per request and pyinstrument's call tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.requests import PATH, build  # noqa: E402

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]


async def call(app: ASGIApp, body: bytes) -> int:
    """One POST through the ASGI app; its status."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:18900"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 18900), "state": {},
    }
    sent = False
    status = 0

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(scope, receive, send)
    return status


async def run(app: ASGIApp, body: bytes, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        status = await call(app, body)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
    return (time.perf_counter() - started) / count * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="ehr")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--html", help="also write pyinstrument's HTML report here")
    parser.add_argument("--no-profile", action="store_true", help="only time the requests")
    parser.add_argument("--first", action="store_true", help="profile the first request after start-up only")
    parser.add_argument("--fhir", help="read the record from this FHIR server (bench/fhir_server.py) instead of the "
                                       "prefetch")
    parser.add_argument("--show-all", action="store_true", help="show library frames too")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds to wait before the first request")
    args = parser.parse_args()
    body = build([args.size])[args.size].data
    if args.fhir:
        from bench.run import FHIR_TOKEN

        request = json.loads(body)
        request.pop("prefetch")
        request["fhirServer"] = args.fhir
        request["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "scope": "patient/*.read"}
        body = json.dumps(request).encode()
    workdir = Path(tempfile.mkdtemp(prefix="cds-profile-"))
    (workdir / "bench.toml").write_text(f'[storage]\nurl = "sqlite:///{workdir}/bench.sqlite3"\n')
    os.environ["CDS_SERVICE_CONFIG"] = str(workdir / "bench.toml")
    from cds_service.web.asgi import app_from_environment

    app = app_from_environment()

    async def session() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(args.settle)
            if args.first:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0001, async_mode="disabled")
                profiler.start()
                first = await run(app, body, 1)
                profiler.stop()
                print(profiler.output_text(unicode=False, color=False, show_all=False))
                print(f"{args.size}: first {first:.3f} ms (profiled)")
                return
            await asyncio.sleep(args.settle)
            first = await run(app, body, 1)
            second = await run(app, body, 1)
            print(f"{args.size}: first {first:.3f} ms, second {second:.3f} ms")
            await run(app, body, 200)
            if args.no_profile:  # batches: on a shared machine the best batch is the least disturbed one
                batches = sorted([await run(app, body, max(1, args.requests // 5)) for _ in range(5)])
                print(f"{args.size}: first {first:.3f} ms, mean per batch of {max(1, args.requests // 5)}: best "
                      f"{batches[0]:.3f} ms, median {batches[2]:.3f} ms")
                return
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0001, async_mode="disabled")
            profiler.start()
            mean = await run(app, body, args.requests)
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=args.show_all))
            if args.html:
                Path(args.html).write_text(profiler.output_html())
            print(f"{args.size}: first {first:.3f} ms, mean {mean:.3f} ms per request (profiled)")

    asyncio.run(session())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
