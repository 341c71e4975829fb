"""Benchmark: cds-service (one worker) against a bare Starlette app, at three request sizes.

    python bench/run.py [--requests 2000] [--connections 8] [--memory-requests 10000]

Starts both servers on loopback, loads each with the same requests (bench/loadgen.py), and prints
req/s, p50 and p99 latency per size, the ratio service/bare, how time grows with record size, and the
service's resident memory before and after --memory-requests typical requests.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.stages import measure  # noqa: E402
from cds_service.config import Config  # noqa: E402
from cds_service.hooks.service import CoverageService  # noqa: E402

PATH = "/cds-services/coverage-requirements-order-sign"


def prefetch_keys() -> dict[str, str]:
    """Resource type -> the prefetch key the service advertises for it (its discovery document's templates,
    ``Type?patient=...``), so that the requests fill every key the service expects."""
    service = CoverageService.from_config(Config())
    sign = next(s for s in service.discovery()["services"] if PATH.endswith(s["id"]))
    keys: dict[str, str] = {}
    for key, template in sign["prefetch"].items():
        keys.setdefault(template.split("?", 1)[0], key)
    return keys


KEYS = prefetch_keys()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"urn:uuid:{r.get('id')}", "resource": r} for r in resources]}


def request_for(orders: list[dict[str, Any]], record: list[dict[str, Any]]) -> dict[str, Any]:
    """A hook request whose prefetch holds ``record``: each advertised key its type, and every other
    resource of the record under one more key, as an EHR sending the whole record would."""
    prefetch: dict[str, Any] = {key: bundle([]) for key in KEYS.values()}
    rest = []
    for resource in record:
        key = KEYS.get(resource["resourceType"])
        if key:
            prefetch[key]["entry"].append({"resource": resource})
        else:
            rest.append(resource)
    prefetch["everything"] = bundle(rest)
    return {"hook": "order-sign", "hookInstance": "bench-0000", "context": {
        "userId": "Practitioner/dr1", "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]}},
        "prefetch": prefetch}


def requests() -> dict[str, tuple[int, bytes]]:
    scenario = json.loads((ROOT / "fixtures/scenarios/mp442-chronic-pain-successful-trial.json").read_text())
    synthea = json.loads((ROOT / "fixtures/records/synthea-bradly-douglas-chronic-pain-migraine.json").read_text())
    typical_record = [e["resource"] for e in synthea["entry"]] + scenario["record"]
    large_record = list(typical_record)
    for copy_no in range(1, 4):
        for resource in typical_record:
            clone = copy.deepcopy(resource)
            clone["id"] = f"{clone.get('id')}-{copy_no}"
            large_record.append(clone)
    out = {}
    for name, record in (("small", scenario["record"]), ("typical", typical_record), ("large", large_record)):
        out[name] = (len(record), json.dumps(request_for(scenario["orders"], record)).encode())
    return out


class Server:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}{PATH}", content=b"{}", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not start")

    def rss_mb(self) -> float:
        # the uvicorn server process itself (one worker, no supervisor)
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per size and server")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--memory-requests", type=int, default=10000)
    parser.add_argument("--output", default=str(ROOT / "bench/results/latest.json"))
    args = parser.parse_args()

    bodies = requests()
    workdir = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    config = workdir / "bench.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{workdir}/bench.sqlite3"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    service_port, bare_port = free_port(), free_port()
    service = Server("cds-service", [sys.executable, "-m", "cds_service", "serve", "--port", str(service_port),
                                     "--config", str(config), "--log-level", "warning"], service_port, env)
    bare = Server("bare", [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(bare_port),
                           "--log-level", "warning", "--no-access-log"], bare_port, env)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version(), "processor": platform.processor()},
                               "settings": vars(args), "sizes": {}}
    try:
        for name, (resources, body) in bodies.items():
            row: dict[str, Any] = {"resources": resources, "body_bytes": len(body)}
            for server in (service, bare):
                asyncio.run(run_load("127.0.0.1", server.port, PATH, body, min(200, args.requests), args.connections))
                load = asyncio.run(run_load("127.0.0.1", server.port, PATH, body, args.requests, args.connections))
                row[server.name] = load.summary()
            row["throughput_ratio"] = round(row["cds-service"]["rps"] / row["bare"]["rps"], 3)
            results["sizes"][name] = row
            print(f"{name:8} {resources:5d} resources {len(body) / 1024:8.0f} KiB | service "
                  f"{row['cds-service']['rps']:7.1f} req/s p50 {row['cds-service']['p50_ms']:7.2f} ms "
                  f"p99 {row['cds-service']['p99_ms']:7.2f} ms | bare {row['bare']['rps']:7.1f} req/s "
                  f"p50 {row['bare']['p50_ms']:7.2f} ms | ratio {row['throughput_ratio']:.2f}", flush=True)
        # memory: steady state after a soak, against the state after --memory-requests more; both read at
        # the end of a load phase, so the bounded audit queue is equally full in both
        typical = bodies["typical"][1]
        asyncio.run(run_load("127.0.0.1", service.port, PATH, typical, 1000, args.connections))
        before = service.rss_mb()
        asyncio.run(run_load("127.0.0.1", service.port, PATH, typical, args.memory_requests, args.connections))
        after = service.rss_mb()
        results["memory_mb"] = {"before": round(before, 1), "after": round(after, 1),
                                "growth": round(after - before, 1), "requests": args.memory_requests}
        sizes = results["sizes"]
        results["growth"] = {
            "typical_vs_small_time": round(sizes["typical"]["cds-service"]["mean_ms"]
                                           / sizes["small"]["cds-service"]["mean_ms"], 2),
            "large_vs_typical_time": round(sizes["large"]["cds-service"]["mean_ms"]
                                           / sizes["typical"]["cds-service"]["mean_ms"], 2),
            "large_vs_typical_resources": round(sizes["large"]["resources"] / sizes["typical"]["resources"], 2),
        }
        print(f"memory: {before:.1f} MiB after a 1000-request soak, {after:.1f} MiB after {args.memory_requests} more "
              f"requests (growth {after - before:+.1f} MiB)")
        print(f"time growth large/typical: {results['growth']['large_vs_typical_time']}x for "
              f"{results['growth']['large_vs_typical_resources']}x the resources")
    finally:
        service.stop()
        bare.stop()
    stages = measure(bodies)
    results["stages_ms"] = stages
    for name, stage in stages.items():
        print(f"in process, no HTTP: {name:8} parse {stage['parse_ms']:7.2f} ms, "
              f"decision path {stage['decide_ms']:7.2f} ms")
    for part in ("parse", "decide"):
        results["growth"][f"large_vs_typical_{part}"] = round(
            stages["large"][f"{part}_ms"] / stages["typical"][f"{part}_ms"], 2)
    print(f"growth large/typical in process: decision path {results['growth']['large_vs_typical_decide']}x, "
          f"parse {results['growth']['large_vs_typical_parse']}x")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
