"""The audit spool's cost on the hook path.

    python bench/spool.py [--requests 1000] [--rounds 3] [--baseline DIR]

Starts ``cds-service serve`` (one worker, SQLite audit log, the default writer process), in turn:

- ``up``: the database is up; records go to it, the spool stays empty (the normal case);
- ``away``: the database is away (a PostgreSQL URL on which nothing listens): the writer sends every
  record to the spool, compressed and fsync'd, while the hook path does what it always does;
- ``baseline`` (with ``--baseline DIR``): the service from another checkout, e.g. the commit before the
  spool, with its database up.

Each is loaded with bench/run.py's small and typical requests (8 keep-alive connections, 200 warm-up
requests, then ``--requests``), ``--rounds`` times, the modes alternating so that the machine's drift
hits them alike; the median round is reported. Then, in process: what appending one record to the spool
costs (compression, write, fsync), the path a request itself takes only when the writer is behind.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.requests import PATH, build  # noqa: E402
from bench.run import Ports, Server  # noqa: E402
from cds_service.storage.records import AuditRecord  # noqa: E402
from cds_service.storage.spool import Spool  # noqa: E402

SIZES = ("small", "typical")


def start(mode: str, workdir: Path, baseline: str | None) -> Server:
    directory = workdir / mode
    directory.mkdir(exist_ok=True)
    url = f"sqlite:///{directory}/bench.sqlite3"
    if mode == "away":
        url = f"postgresql://cds@127.0.0.1:{Ports(None).take()}/cds"
    config = directory / "bench.toml"
    config.write_text(f'[storage]\nurl = "{url}"\n' + (f'spool_dir = "{directory}/spool"\n' if mode == "away" else ""))
    code = baseline if mode == "baseline" and baseline else str(ROOT)
    port = Ports(None).take()
    env = {**os.environ, "PYTHONPATH": code, "PYTHONDONTWRITEBYTECODE": "1"}
    return Server(mode, [sys.executable, "-m", "cds_service", "serve", "--port", str(port), "--config", str(config),
                         "--log-level", "critical"], port, env)


def spool_status(workdir: Path) -> dict[str, Any]:
    spool = Spool(workdir / "away" / "spool")
    try:
        status = spool.status()
    finally:
        spool.close()
    return {"records": status.records, "bytes": status.bytes, "dropped": status.dropped}


def append_ms(body: bytes, count: int) -> float:
    """Mean time to append one record holding ``body`` to a spool (fsync'd), in process."""
    with tempfile.TemporaryDirectory(prefix="cds-spool-bench-") as directory:
        spool = Spool(directory)
        records = [AuditRecord(dt.datetime.now(dt.UTC), "svc", "order-sign", f"h{n}", None, "p1", 200, 1.0, b"[]",
                               b"[]", b'{"cards":[]}', body) for n in range(count)]
        started = time.perf_counter()
        for record in records:
            spool.append([record])
        took = time.perf_counter() - started
        spool.close()
    return took / count * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per size, mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--baseline", help="a checkout of another commit, run the same way with its database up")
    parser.add_argument("--output", default=str(ROOT / "bench/results/spool.json"))
    args = parser.parse_args()

    bodies = build(["small", "typical"])
    modes = ["up", "away"] + (["baseline"] if args.baseline else [])
    workdir = Path(tempfile.mkdtemp(prefix="cds-spool-bench-"))
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {s: [] for s in SIZES} for m in modes}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for round_no in range(args.rounds):
        for mode in modes if round_no % 2 == 0 else reversed(modes):
            server = start(mode, workdir, args.baseline)
            try:
                for size in SIZES:
                    body = bodies[size].data
                    asyncio.run(run_load("127.0.0.1", server.port, PATH, body, 200, args.connections))
                    load = asyncio.run(run_load("127.0.0.1", server.port, PATH, body, args.requests, args.connections))
                    runs[mode][size].append(load.summary())
                    row = load.summary()
                    print(f"round {round_no + 1} {mode:8} {size:8} {row['rps']:7.1f} req/s p50 {row['p50_ms']:7.2f} ms "
                          f"p99 {row['p99_ms']:7.2f} ms errors {row['errors']}", flush=True)
            finally:
                server.stop()
    results: dict[str, Any] = {"commit": commit, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                             "python": platform.python_version()},
                               "settings": vars(args), "modes": {}, "rounds": runs}
    print(f"\nmedian of {args.rounds} rounds, commit {commit}:")
    for mode in modes:
        results["modes"][mode] = {}
        for size in SIZES:
            median = sorted(runs[mode][size], key=lambda r: r["rps"])[len(runs[mode][size]) // 2]
            results["modes"][mode][size] = median
            print(f"{mode:8} {size:8} {median['rps']:7.1f} req/s p50 {median['p50_ms']:7.2f} ms "
                  f"p99 {median['p99_ms']:7.2f} ms")
    results["away_spool"] = spool_status(workdir)
    print(f"spool after the 'away' runs: {results['away_spool']}")
    results["append_ms"] = {size: round(statistics.median(append_ms(bodies[size].data, 100) for _ in range(3)), 3)
                            for size in SIZES}
    for size, ms in results["append_ms"].items():
        print(f"in process: appending one {size} record to the spool (fsync'd) {ms:.3f} ms")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.output}")
    if any(r["errors"] for sizes in runs.values() for rows in sizes.values() for r in rows):
        print("some answers were not 200: these figures do not measure the hook path", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
