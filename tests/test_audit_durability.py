"""The audit log across database faults, with the real service (``cds-service serve``, its default
writer process) and a real PostgreSQL behind a TCP proxy that each test cuts, pauses and restores on
its own (tests/tcpproxy.py); the shared server is never touched. Skipped without CDS_TEST_POSTGRES_URL,
except the tests that need no database at all (one that is not there)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from cds_service.storage.db import engine_for
from cds_service.storage.spool import Spool

from .serverproc import ServerProcess, free_port
from .support import FIXTURES, PG_ENV, cli, load, pg_schema_url, scenario_request
from .tcpproxy import TcpProxy

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")
needs_postgres = pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} is not set")


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg_schema_url(os.environ[PG_ENV])


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = sa.engine.make_url(pg_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as tcp:
        yield tcp


def proxied(pg_url: str, proxy: TcpProxy) -> str:
    return sa.engine.make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def write_config(tmp_path: Path, url: str, **storage: object) -> Path:
    settings = {"url": url, "spool_dir": str(tmp_path / "spool"), "database_timeout_seconds": 1.0, **storage}
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = tmp_path / "cds.toml"
    path.write_text("[storage]\n" + "\n".join(lines) + "\n")
    return path


async def _calls(url: str, n: int, concurrency: int = 8) -> list[tuple[int, float, str]]:
    """n hook calls, ``concurrency`` at a time: (status, seconds, hookInstance) each."""
    limit = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str]:
        body = scenario_request(KETAMINE)
        async with limit:
            started = time.perf_counter()
            response = await client.post(url + SIGN, json=body)
            return response.status_code, time.perf_counter() - started, body["hookInstance"]

    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(one(client) for _ in range(n))))


def calls(url: str, n: int, concurrency: int = 8) -> list[tuple[int, float, str]]:
    return asyncio.run(_calls(url, n, concurrency))


def wait_for_records(url: str, expected: set[str], seconds: float = 20) -> list[str]:
    """The hookInstances of the audit records, once all of ``expected`` are there (or time is up)."""
    engine = engine_for(url)
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                with engine.connect() as connection:
                    stored = [str(h) for h in connection.execute(sa.text("SELECT hook_instance FROM hook_audit"))
                              .scalars()]
            except sa.exc.ProgrammingError:  # not migrated yet: the service started without its database
                stored = []
            if set(stored) >= expected or time.monotonic() > deadline:
                return stored
            time.sleep(0.2)
    finally:
        engine.dispose()


def ready(server: ServerProcess) -> httpx.Response:
    return httpx.get(server.url + "/health/ready", timeout=10)


@needs_postgres
def test_database_down_for_seconds_then_back_loses_no_record(pg_url: str, proxy: TcpProxy, tmp_path: Path) -> None:
    with ServerProcess(write_config(tmp_path, proxied(pg_url, proxy))) as server:
        made = calls(server.url, 10)
        proxy.cut()
        down_since = time.monotonic()
        while time.monotonic() - down_since < 3:  # EHRs keep calling while the database is down
            made += calls(server.url, 6)
            time.sleep(0.3)
        during = ready(server)
        proxy.restore()
        stored = wait_for_records(pg_url, {h for _, _, h in made})
        after = ready(server)
    assert all(status == 200 for status, _, _ in made)
    assert during.status_code == 503 and during.json()["database"]["state"] == "down"
    assert sorted(stored) == sorted(h for _, _, h in made)  # every call once: none lost, none twice
    assert after.status_code == 200 and after.json()["database"]["state"] == "up"


@needs_postgres
def test_sigterm_with_database_down_loses_no_record_after_restart(pg_url: str, proxy: TcpProxy,
                                                                  tmp_path: Path) -> None:
    config = write_config(tmp_path, proxied(pg_url, proxy))
    proxy.cut()
    server = ServerProcess(config)
    made = calls(server.url, 30)
    code = server.stop()
    spooled = json.loads(cli_status(config))
    assert code == 0 and "Traceback" not in server.log.read_text()
    assert spooled["records"] == 30 and spooled["oldest_age_seconds"] >= 0 and not spooled["dropped"]
    with ServerProcess(config) as restarted:  # starts while the database is still down
        assert ready(restarted).json()["audit"]["spool"]["records"] == 30
        proxy.restore()
        stored = wait_for_records(pg_url, {h for _, _, h in made})
    assert all(status == 200 for status, _, _ in made)
    assert sorted(stored) == sorted(h for _, _, h in made)
    assert json.loads(cli_status(config))["records"] == 0


@needs_postgres
def test_hung_database_delays_no_hook_answer(pg_url: str, proxy: TcpProxy, tmp_path: Path) -> None:
    config = write_config(tmp_path, proxied(pg_url, proxy), database_timeout_seconds=2.0)
    server = ServerProcess(config)
    made = calls(server.url, 10)
    assert len(wait_for_records(pg_url, {h for _, _, h in made})) == 10  # the writer is connected
    proxy.pause()  # connections stay open and nothing answers: what a SIGSTOPped server does
    hung = calls(server.url, 120)
    reports: list[tuple[float, httpx.Response]] = []
    while len(reports) < 10:  # the writer gives up on the database after 2 s: the records go to the spool
        started = time.perf_counter()
        response = ready(server)
        reports.append((time.perf_counter() - started, response))
        if response.json()["audit"]["spool"].get("records") == 120:
            break
    stopped = time.perf_counter()
    code = server.stop()  # SIGTERM while the database hangs
    stop_seconds = time.perf_counter() - stopped
    proxy.restore()
    with ServerProcess(config):
        stored = wait_for_records(pg_url, {h for _, _, h in made + hung})
    assert all(status == 200 for status, _, _ in hung)
    # normal latency is tens of milliseconds; waiting on the database would take at least
    # database_timeout_seconds (2 s), or forever
    assert max(seconds for _, seconds, _ in hung) < 1.5
    assert all(seconds < 3 for seconds, _ in reports)  # readiness does not hang with the database
    assert {r.status_code for _, r in reports} == {503}
    # a query that hangs, or a connection attempt that times out
    assert {r.json()["database"]["state"] for _, r in reports} <= {"unresponsive", "down"}
    assert reports[-1][1].json()["audit"]["spool"]["records"] == 120
    assert code == 0 and stop_seconds < 15
    assert "audit database unresponsive" in server.log.read_text()
    assert sorted(stored) == sorted(h for _, _, h in made + hung)


def cli_status(config: Path) -> str:
    result = cli("audit", "status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_full_spool_drops_with_a_counted_logged_reason(tmp_path: Path) -> None:
    """No database at all (nothing listens on its port), and a spool of 64 KiB."""
    absent = f"postgresql://cds@127.0.0.1:{free_port()}/cds"
    config = write_config(tmp_path, absent, spool_max_bytes=65536)
    with ServerProcess(config) as server:
        made = calls(server.url, 40, concurrency=4)
        report = ready(server)
    status = json.loads(cli_status(config))
    logged = [json.loads(line) for line in server.log.read_text().splitlines() if "audit_record_dropped" in line]
    assert all(code == 200 for code, _, _ in made)  # the answer never depends on the audit database
    assert report.status_code == 503 and report.json()["database"]["state"] == "down"
    dropped = status["dropped"]["spool_full"]
    assert 0 < dropped < 40 and status["records"] == 40 - dropped
    assert 0 < status["bytes"] <= 65536
    assert status["oldest_age_seconds"] > 0
    assert len(logged) == dropped
    made_instances = {h for _, _, h in made}
    for line in logged:
        assert line["reason"] == "spool_full" and line["hookInstance"] in made_instances
        assert line["timestamp"].endswith("+00:00") and line["service"] == SIGN.rsplit("/", 1)[1]


def test_processes_of_one_replica_share_its_spool(tmp_path: Path) -> None:
    """Two servers (each with its writer process) spool into one directory at once while the database is
    away; every record comes out once, and a spool moved to a host with a database is replayed there."""
    config = write_config(tmp_path, f"postgresql://cds@127.0.0.1:{free_port()}/cds")
    with ServerProcess(config) as a, ServerProcess(config) as b:

        async def both() -> list[tuple[int, float, str]]:
            first, second = await asyncio.gather(_calls(a.url, 30), _calls(b.url, 30))
            return first + second

        made = asyncio.run(both())
    status = Spool(tmp_path / "spool").status()
    target = tmp_path / "elsewhere"
    target.mkdir()
    elsewhere = write_config(target, f"sqlite:///{target / 'cds.sqlite3'}")
    replayed = cli("audit", "replay", "--spool", str(tmp_path / "spool"), "--config", str(elsewhere))
    stored = wait_for_records(f"sqlite:///{target / 'cds.sqlite3'}", set(), seconds=0)
    assert all(code == 200 for code, _, _ in made)
    assert status.records == 60 and not status.dropped
    assert replayed.returncode == 0, replayed.stderr
    assert sorted(stored) == sorted(h for _, _, h in made)
