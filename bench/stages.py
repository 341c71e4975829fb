"""Where a request's time goes, in process and without HTTP: parsing the body, and the decision path
(request validation, record gathering, decisions, cards, coverage information), per request size.

Run by bench/run.py after the load phases, so that it has the machine to itself. The heap is frozen
first, as the server's entry point does (cds_service/web/asgi.py).
"""

from __future__ import annotations

import asyncio
import gc
import time

from cds_service.config import Config
from cds_service.hooks.service import CoverageService
from cds_service.jsonutil import loads

SERVICE_ID = "coverage-requirements-order-sign"


def parse_ms(body: bytes, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        loads(body)
    return (time.perf_counter() - started) / count * 1000


async def decide_ms(service: CoverageService, body: bytes, count: int) -> float:
    """Mean time of the decision path; each request freshly parsed, the parsing not timed."""
    total = 0.0
    for _ in range(count):
        request = loads(body)
        started = time.perf_counter()
        await service.handle(SERVICE_ID, request, "http://127.0.0.1/")
        total += time.perf_counter() - started
    return total / count * 1000


def measure(bodies: dict[str, tuple[int, bytes]], seconds_per_size: float = 3.0) -> dict[str, dict[str, float]]:
    service = CoverageService.from_config(Config())
    gc.collect()
    gc.freeze()
    out: dict[str, dict[str, float]] = {}
    for name, (_, body) in bodies.items():
        once = parse_ms(body, 1) + asyncio.run(decide_ms(service, body, 1))
        count = max(5, int(seconds_per_size * 1000 / max(once, 0.01)))
        out[name] = {"parse_ms": round(parse_ms(body, count), 3),
                     "decide_ms": round(asyncio.run(decide_ms(service, body, count)), 3)}
    return out
