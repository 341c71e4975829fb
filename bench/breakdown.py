"""Where one hook call's time goes, stage by stage, in process through the whole ASGI app (as bench/profile.py
builds it, warm-up and frozen heap included), without a profiler's overhead: each stage is timed by wrapping the
function that does it.

    python bench/breakdown.py [--size ehr] [--requests 2000]

Stages (exclusive of the stages inside them): parsing the body (orjson and the nesting check), reading the
request (CDS Hooks shape), the orders (as read, in scope of a policy), checking the in-scope orders whole
(fhir.resources), the record (prefetch bundles, filters), the decisions, the cards, the documentation forms
(DTR: the completed forms read, a form pre-filled for a decision that waits on documentation), the coverage
information and 'not assessed' orders (fhir.resources), serialising the response, the audit hand-off, and the
rest (Starlette's routing, CORS, the body's arrival, the response object).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.profile import call  # noqa: E402
from bench.requests import build  # noqa: E402

#: (stage, module, attribute): the functions timed
STAGES = [
    ("parse the body (orjson, nesting check)", "cds_service.web.app", "loads"),
    ("read the CDS Hooks request", "cds_service.hooks.service.CoverageService", "parse"),
    ("orders as read, in scope of a policy", "cds_service.hooks.service.CoverageService", "in_scope"),
    ("check in-scope orders whole (fhir.resources)", "cds_service.hooks.service.CoverageService", "unreadable"),
    ("record: prefetch bundles, filters", "cds_service.hooks.service.CoverageService", "gather"),
    ("decisions (criteria, element checks)", "cds_service.hooks.service.CoverageService", "_decide"),
    ("cards (Jinja, markdown escaping)", "cds_service.hooks.cards.CardRenderer", "cards"),
    ("documentation form pre-filled (DTR: FHIRPath over the record)",
     "cds_service.dtr.documentation.DocumentationForms", "context"),
    ("completed forms read (DTR)", "cds_service.hooks.service.CoverageService", "documented"),
    ("coverage information", "cds_service.hooks.service", "coverage_information"),
    ("'not assessed' orders (fhir.resources)", "cds_service.hooks.service.CoverageService", "_not_assessed"),
    ("serialise the response (orjson)", "cds_service.web.app", "json_response"),
    ("audit hand-off", "cds_service.web.app.CdsApp", "audit"),
]


def _owner(path: str) -> Any:
    """The module or class a dotted path names."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = __import__(".".join(parts[:cut]), fromlist=["_"])
        except ImportError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(path)


@contextmanager
def timed(spent: dict[str, float]) -> Iterator[None]:
    """Wrap each stage's function so that its time (exclusive of the stages it calls) adds up in ``spent``."""
    saved: list[tuple[Any, str, Any]] = []
    stack: list[list[float]] = []

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(function):
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                stack.append([time.perf_counter(), 0.0])
                try:
                    return await function(*args, **kwargs)
                finally:
                    finish(name)
            return async_wrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack.append([time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                finish(name)
        return wrapper

    def finish(name: str) -> None:
        started, inner = stack.pop()
        total = time.perf_counter() - started
        spent[name] = spent.get(name, 0.0) + total - inner
        if stack:
            stack[-1][1] += total

    for name, owner_path, attribute in STAGES:
        owner = _owner(owner_path)
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        saved.append((owner, attribute, original))
        setattr(owner, attribute, wrap(name, original))
    try:
        yield
    finally:
        for owner, attribute, original in saved:
            setattr(owner, attribute, original)


def breakdown(size: str, requests: int) -> dict[str, float]:
    """Milliseconds per request by stage (and ``total``), for one size."""
    body = build([size])[size].data
    workdir = Path(tempfile.mkdtemp(prefix="cds-breakdown-"))
    (workdir / "bench.toml").write_text(f'[storage]\nurl = "sqlite:///{workdir}/bench.sqlite3"\n')
    os.environ["CDS_SERVICE_CONFIG"] = str(workdir / "bench.toml")
    from cds_service.web.asgi import app_from_environment

    app = app_from_environment()
    spent: dict[str, float] = {}

    async def session() -> float:
        async with app.router.lifespan_context(app):
            for _ in range(200):
                await call(app, body)
            with timed(spent):
                started = time.perf_counter()
                for _ in range(requests):
                    await call(app, body)
                return time.perf_counter() - started

    total = asyncio.run(session())
    out = {name: spent.get(name, 0.0) / requests * 1000 for name, _, _ in STAGES}
    out["the rest (Starlette, CORS, body, response object, timing)"] = total / requests * 1000 - sum(out.values())
    out["total"] = total / requests * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="ehr")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    for name, ms in breakdown(args.size, args.requests).items():
        print(f"{ms:8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
