"""Benchmark: cds-service (one worker) against a bare Starlette app and a HealthChain peer.

    python bench/run.py [--ports 18900-18949] [--requests 2000] [--connections 8] [--rounds 3]
                        [--memory-requests 10000] [--sizes ehr,ehr-mdd,small,typical,large]
                        [--peer-python bench/.peer/bin/python] [--latency-requests 300] [--skip ...]
                        [--service-root DIR --service-python PYTHON]

Starts the servers on loopback (ports from ``--ports``, else free ports the system picks) and reports:

- ``load``: req/s, p50 and p99 per request size (bench/requests.py; ``ehr`` is the headline: the prefetch an
  EHR fills from a Synthea record following the service's discovery templates) for the service, the bare
  app (bench/bare_app.py) and the HealthChain peer (bench/healthchain_peer.py, when its environment exists),
  and the service's ratio to each: ``--rounds`` rounds, sizes and servers alternating, each figure the median
  round's;
- ``memory``: the service's resident memory after a soak and after ``--memory-requests`` more ``ehr`` requests;
- ``latency``: one request at a time on one keep-alive connection, against freshly started services
  (``--starts`` of them per case, medians reported): the first call and the p50 after it, with the ``ehr``
  prefetch, and with no prefetch and a FHIR server on loopback (bench/fhir_server.py) that takes D = 0 and
  50 ms per search;
- ``stages``: in process without HTTP, the time spent parsing and on the decision path per size.

Results go to ``bench/results/latest.json`` (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.requests import PATH, SERVICE_ID, Body, build  # noqa: E402
from bench.stages import measure  # noqa: E402

PEER_PATH = f"/cds/cds-services/{SERVICE_ID}"
FHIR_TOKEN = "bench-fhir-token"
DEFAULT_PEER = ROOT / "bench/.peer/bin/python"


class Ports:
    """Loopback ports for the servers: from a range given (``A-B``), else ones the system picks."""

    def __init__(self, spec: str | None) -> None:
        self._range: Iterator[int] | None = None
        if spec:
            low, _, high = spec.partition("-")
            self._range = iter(range(int(low), int(high or low) + 1))

    def take(self) -> int:
        if self._range is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])
        for port in self._range:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("no free port left in --ports")


class Server:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str], path: str = PATH,
                 cwd: Path = ROOT) -> None:
        self.name, self.port, self.path = name, port, path
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                error = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"{name} exited: {error}")
            try:  # uvicorn listens once its start-up (and the app's) is complete; no request is sent
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
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
            self.proc.wait()


def uvicorn(app: str, port: int) -> list[str]:
    return ["-m", "uvicorn", app, "--port", str(port), "--log-level", "warning", "--no-access-log"]


#: where the service's code is taken from, and its interpreter (``--service-root``, ``--service-python``: another
#: checkout and its environment, to compare)
SERVICE_ROOT = [ROOT]
SERVICE_PYTHON = [sys.executable]


def start_service(ports: Ports, workdir: Path, env: dict[str, str], name: str = "cds-service") -> Server:
    config = workdir / f"{name}.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{workdir}/{name}.sqlite3"\n')
    port = ports.take()
    root = SERVICE_ROOT[0]
    return Server(name, [SERVICE_PYTHON[0], "-m", "cds_service", "serve", "--port", str(port), "--config", str(config),
                         "--log-level", "warning"], port, {**env, "PYTHONPATH": str(root)}, cwd=root)


def load(server: Server, body: bytes, requests: int, connections: int) -> dict[str, float]:
    asyncio.run(run_load("127.0.0.1", server.port, server.path, body, min(200, requests), connections))
    result = asyncio.run(run_load("127.0.0.1", server.port, server.path, body, requests, connections))
    return result.summary()


def fhir_request(body: Body, fhir_port: int) -> bytes:
    """The ``ehr`` request with no prefetch: the service reads everything from the FHIR server."""
    request = json.loads(body.data)
    request.pop("prefetch")
    request["fhirServer"] = f"http://127.0.0.1:{fhir_port}/fhir"
    request["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                    "scope": "patient/*.read", "subject": "cds-service"}
    return json.dumps(request).encode()


def first_and_p50(server: Server, body: bytes, count: int) -> dict[str, float]:
    """One request at a time on one connection: the first call after start, and p50/p99 of the rest."""
    result = asyncio.run(run_load("127.0.0.1", server.port, server.path, body, count + 1, 1))
    if result.errors:
        raise RuntimeError(f"{server.name}: {result.errors} requests failed")
    first, rest = result.latencies_ms[0], sorted(result.latencies_ms[1:])
    p50 = statistics.median(rest)
    return {"first_ms": round(first, 2), "p50_ms": round(p50, 2),
            "p99_ms": round(rest[min(len(rest) - 1, round(0.99 * (len(rest) - 1)))], 2),
            "first_over_p50": round(first / p50, 2), "requests": count}


def server_side(database: Path) -> dict[str, float]:
    """The first call and the p50 as the service itself timed them (its audit log's ``latency_ms``, from the
    request's arrival in the app to the answer, before the audit hand-off): without the connection's set-up and
    the load generator's own time."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        times = [float(r[0]) for r in connection.execute("SELECT latency_ms FROM hook_audit ORDER BY rowid")]
    if len(times) < 2:
        return {"server_first_ms": 0.0, "server_p50_ms": 0.0, "server_first_over_p50": 0.0}
    p50 = statistics.median(times[1:])
    return {"server_first_ms": round(times[0], 2), "server_p50_ms": round(p50, 2),
            "server_first_over_p50": round(times[0] / p50, 2)}


def phase_load(args: argparse.Namespace, bodies: dict[str, Body], ports: Ports, workdir: Path,
               env: dict[str, str], results: dict[str, Any]) -> None:
    service = start_service(ports, workdir, env)
    servers = [service]
    try:
        port = ports.take()
        servers.append(Server("bare", [sys.executable, *uvicorn("bench.bare_app:app", port)], port, env))
        peer_python = Path(args.peer_python)
        if peer_python.exists():
            port = ports.take()
            peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            servers.append(Server("healthchain", [str(peer_python), *uvicorn("healthchain_peer:app", port)], port,
                                  peer_env, PEER_PATH, cwd=ROOT / "bench"))
        else:
            print(f"no HealthChain peer: {peer_python} not found (see bench/peer-requirements.txt)", flush=True)
        # rounds: sizes and servers alternate, and each figure is the median round's, so that a burst of other
        # work on the machine (2 cores, shared) does not decide a ratio
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_no in range(1, args.rounds + 1):
            for name, body in bodies.items():
                for server in servers:
                    got = load(server, body.data, args.requests, args.connections)
                    if got["errors"]:
                        raise RuntimeError(f"{server.name}: {got['errors']} requests failed ({name})")
                    runs.setdefault((name, server.name), []).append(got)
                print(f"round {round_no} {name:8} " + " | ".join(
                    f"{server.name} {runs[(name, server.name)][-1]['rps']:7.1f} req/s" for server in servers),
                    flush=True)
        for name, body in bodies.items():
            row: dict[str, Any] = {"resources": body.resources, "body_bytes": len(body.data)}
            for server in servers:
                ordered = sorted(runs[(name, server.name)], key=lambda r: r["rps"])
                row[server.name] = ordered[len(ordered) // 2]
                row[f"{server.name}_rounds_rps"] = [r["rps"] for r in runs[(name, server.name)]]
            for other in servers[1:]:
                row[f"ratio_{other.name}"] = round(row["cds-service"]["rps"] / row[other.name]["rps"], 3)
            results["sizes"][name] = row
            line = f"{name:8} {body.resources:5d} resources {len(body.data) / 1024:6.0f} KiB |"
            for server in servers:
                got = row[server.name]
                line += f" {server.name} {got['rps']:7.1f} req/s p50 {got['p50_ms']:6.2f} ms |"
            line += " ratios " + " ".join(f"{o.name} {row[f'ratio_{o.name}']:.2f}" for o in servers[1:])
            print(line, flush=True)
        if "memory" not in args.skip:
            # steady state after a soak, against the state after --memory-requests more; both read at the end
            # of a load phase, so the bounded audit queue is equally full in both
            soak = bodies["ehr"].data
            asyncio.run(run_load("127.0.0.1", service.port, PATH, soak, 1000, args.connections))
            before = service.rss_mb()
            asyncio.run(run_load("127.0.0.1", service.port, PATH, soak, args.memory_requests, args.connections))
            after = service.rss_mb()
            results["memory_mb"] = {"before": round(before, 1), "after": round(after, 1),
                                    "growth": round(after - before, 1), "requests": args.memory_requests,
                                    "size": "ehr"}
            print(f"memory: {before:.1f} MiB after a 1000-request soak, {after:.1f} MiB after "
                  f"{args.memory_requests} more ehr requests (growth {after - before:+.1f} MiB)", flush=True)
    finally:
        for server in servers:
            server.stop()


def phase_latency(args: argparse.Namespace, body: Body, ports: Ports, workdir: Path, env: dict[str, str],
                  results: dict[str, Any]) -> None:
    """First call and p50, each against a freshly started service: with the prefetch, and from a FHIR
    server that takes D ms per search."""
    out: dict[str, Any] = {}
    cases: list[tuple[str, float | None]] = [("prefetch", None), ("fhir D=0", 0.0), ("fhir D=50", 50.0)]
    # the load generator's own first request is slow too (its code is cold): warm it on the bare app first
    port = ports.take()
    bare = Server("bare", [sys.executable, *uvicorn("bench.bare_app:app", port)], port, env)
    try:
        asyncio.run(run_load("127.0.0.1", bare.port, PATH, body.data, 50, 1))
    finally:
        bare.stop()
    for name, delay in cases:
        fhir: Server | None = None
        try:
            data = body.data
            if delay is not None:
                port = ports.take()
                fhir = Server("fhir", [sys.executable, str(ROOT / "bench/fhir_server.py"), "--port", str(port),
                                       "--delay-ms", str(delay), "--token", FHIR_TOKEN], port, env)
                data = fhir_request(body, port)
            starts = []
            for start in range(args.starts):  # each a fresh process: its first call is one sample
                service = start_service(ports, workdir, env, name=f"latency-{len(out)}-{start}")
                try:
                    if args.settle:
                        time.sleep(args.settle)
                    starts.append(first_and_p50(service, data, args.latency_requests))
                finally:
                    service.stop()
                starts[-1].update(server_side(workdir / f"latency-{len(out)}-{start}.sqlite3"))
            row: dict[str, Any] = {key: round(statistics.median(s[key] for s in starts), 2)
                                   for key in ("first_ms", "p50_ms", "p99_ms", "first_over_p50", "server_first_ms",
                                               "server_p50_ms", "server_first_over_p50")}
            row["starts"] = args.starts
            row["first_ms_each"] = [s["first_ms"] for s in starts]
            if delay is not None:
                row["p50_minus_D_ms"] = round(row["p50_ms"] - delay, 2)
            out[name] = row
            print(f"latency {name:10} first {row['first_ms']:7.2f} ms, p50 {row['p50_ms']:6.2f} ms, "
                  f"p99 {row['p99_ms']:6.2f} ms, first/p50 {row['first_over_p50']:.2f} (medians of {args.starts} "
                  f"starts; first calls {', '.join(f'{f:.1f}' for f in row['first_ms_each'])} ms); in the "
                  f"service: first {row['server_first_ms']:.2f} ms, p50 {row['server_p50_ms']:.2f} ms, first/p50 "
                  f"{row['server_first_over_p50']:.2f}", flush=True)
        finally:
            if fhir is not None:
                fhir.stop()
    results["latency"] = out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", help="loopback port range for the servers, e.g. 18900-18949")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per size and server")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="load rounds; each figure is the median round's")
    parser.add_argument("--memory-requests", type=int, default=10000)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--starts", type=int, default=5, help="fresh starts per latency case (medians reported)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after a service starts listening before its first call")
    parser.add_argument("--sizes", default="ehr,ehr-mdd,small,typical,large")
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER), help="python of the HealthChain environment")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: load, memory, latency, stages")
    parser.add_argument("--service-root", help="run the service from this checkout instead (e.g. the code before a "
                                               "change); the stages phase always measures this one")
    parser.add_argument("--service-python", help="the interpreter (environment) of --service-root")
    parser.add_argument("--output", default=str(ROOT / "bench/results/latest.json"))
    args = parser.parse_args()
    if args.service_root:
        SERVICE_ROOT[0] = Path(args.service_root).resolve()
    if args.service_python:
        SERVICE_PYTHON[0] = args.service_python
    args.skip = set(filter(None, args.skip.split(",")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers it started (finally blocks)

    names = [n for n in args.sizes.split(",") if n]
    bodies = build(sorted(set(names) | {"ehr"}))
    bodies = {n: bodies[n] for n in names} | {"ehr": bodies["ehr"]}
    workdir = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ports = Ports(args.ports)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    service_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SERVICE_ROOT[0], capture_output=True,
                                    text=True).stdout.strip() or str(SERVICE_ROOT[0])
    results: dict[str, Any] = {"commit": commit, "service": service_commit,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version(), "processor": platform.processor()},
                               "settings": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
                               "sizes": {}}
    if "load" not in args.skip:
        phase_load(args, {n: bodies[n] for n in names}, ports, workdir, env, results)
    if "latency" not in args.skip:
        phase_latency(args, bodies["ehr"], ports, workdir, env, results)
    if "stages" not in args.skip:
        stages = measure({n: (b.resources, b.data) for n, b in bodies.items()})
        results["stages_ms"] = stages
        for name, stage in stages.items():
            print(f"in process, no HTTP: {name:8} parse {stage['parse_ms']:7.3f} ms, "
                  f"decision path {stage['decide_ms']:7.3f} ms")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.output} (commit {commit})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
