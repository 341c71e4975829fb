"""Reloading the policy files without downtime: a reload that succeeds and one that is refused, under
concurrent requests, in process and with ``cds-service serve --workers 2`` and ``cds-service policy reload``."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from cds_service.hooks.generations import RunDirectory, listener_dir
from cds_service.paths import data_dir
from cds_service.web.app import create_app

from .serverproc import ServerProcess
from .support import FIXTURES, hook_request, load, make_config, samples

SIGN = "/cds-services/coverage-requirements-order-sign"
VERSION = re.compile(r"MP-44[26]\|[0-9-]+\|[0-9a-f]{16}")
PUMP = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


def both_policies() -> dict[str, Any]:
    """One request with an order under each policy: its answer names both policies' versions."""
    return hook_request([*PUMP["orders"], *KETAMINE["orders"]], [*PUMP["record"], *KETAMINE["record"]])


def versions(answer: dict[str, Any]) -> frozenset[str]:
    found = frozenset(VERSION.findall(json.dumps(answer)))
    assert {v.split("|")[0] for v in found} == {"MP-442", "MP-446"}, answer
    return found


def copy_policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(data_dir("policies"), target)
    return target


def change_shared_file(policies: Path) -> None:
    """A change to a file both policies share: both versions change."""
    path = policies / "text-matching.yaml"
    path.write_text(path.read_text() + f"\n# reviewed {time.time_ns()}\n")


def break_policy(policies: Path) -> None:
    (policies / "mp-442.yaml").write_text((policies / "mp-442.yaml").read_text() + "\nrules: [\n")


class Load:
    """Requests from ``threads`` threads until stopped; each answer's policy versions, in order."""

    def __init__(self, post: Callable[[], dict[str, Any]], threads: int = 4) -> None:
        self.post = post
        self.seen: list[frozenset[str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(versions(self.post()))
            except BaseException as error:  # reported by stop()
                self.errors.append(error)
                return

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not self.errors, self.errors[0]

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.seen) >= count


def test_reload_in_process_under_concurrent_requests(tmp_path: Path, sqlite_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    policies, cards = copy_policies(tmp_path), data_dir("cards")
    run = RunDirectory(tmp_path / "run")
    first = run.start(os.getpid(), policies, cards)
    old = frozenset(first.versions.values())
    caplog.set_level(logging.INFO, logger="cds_service.reload")
    with TestClient(create_app(make_config(sqlite_url), run_dir=run.path)) as client:
        cds = client.app.state.cds  # type: ignore[attr-defined]
        with Load(lambda: client.post(SIGN, json=both_policies()).json()) as load:
            load.wait_for(8)
            change_shared_file(policies)
            published = run.publish(policies, cards)
            assert published.result == "loaded" and published.versions is not None
            new = frozenset(published.versions.values())
            assert new.isdisjoint(old)
            deadline = time.monotonic() + 10
            while {p.version for p in cds.service.policies.policies} != new and time.monotonic() < deadline:
                time.sleep(0.02)
            switched = len(load.seen)
            load.wait_for(switched + 8)
            break_policy(policies)
            refused = run.publish(policies, cards)
            assert refused.result == "refused" and "mp-442.yaml" in (refused.error or "")
            load.wait_for(len(load.seen) + 8)
        # every answer came from one generation, never half of each; after the swap, only the new one
        assert set(load.seen) == {old, new}
        assert all(seen == new for seen in load.seen[switched + 4:])  # 4 threads: at most one call each in flight
        assert run.current().number == 2  # type: ignore[union-attr]
        assert [w.generation for w in run.workers()] == [2]
    assert any("policy reload refused: mp-442.yaml" in r.getMessage() for r in caplog.records)


def write_config(tmp_path: Path, policies: Path) -> Path:
    path = tmp_path / "cds.toml"
    path.write_text(f'[service]\npolicies_dir = "{policies}"\n[storage]\nurl = "sqlite:///{tmp_path / "cds.sqlite3"}"\n'
                    '[logging]\nformat = "json"\n')
    return path


def reload(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cds_service", "policy", "reload", "--config", str(config)],
                          capture_output=True, text=True, timeout=90)


def test_reload_reaches_every_worker_of_a_running_service(tmp_path: Path) -> None:
    policies = copy_policies(tmp_path)
    config = write_config(tmp_path, policies)
    with ServerProcess(config, workers=2, port=18861, log_level="info") as server:

        def post() -> dict[str, Any]:  # a new connection each time: the calls spread over both workers
            answer: dict[str, Any] = httpx.post(server.url + SIGN, json=both_policies(), timeout=30).json()
            return answer

        old = versions(post())
        with Load(post) as load:
            load.wait_for(6)
            change_shared_file(policies)
            done = reload(config)
            after = len(load.seen)
            assert done.returncode == 0, done.stdout + done.stderr
            new = frozenset(done.stdout.splitlines()[-1].split(": ", 1)[1].split(", "))
            assert new.isdisjoint(old) and len(new) == 2
            workers = [line for line in done.stdout.splitlines() if line.startswith("worker ")]
            assert len(workers) == 2 and all("serves generation 2" in line for line in workers)
            load.wait_for(after + 8)
            break_policy(policies)
            refused = reload(config)
            assert refused.returncode == 1
            assert refused.stdout.startswith("refused: mp-442.yaml") and "keeps generation 2" in refused.stdout
            load.wait_for(len(load.seen) + 8)
        assert set(load.seen) <= {old, new}
        assert all(seen == new for seen in load.seen[after + 4:])
        assert all(versions(post()) == new for _ in range(6))
        metrics = samples(httpx.get(server.url + "/metrics", timeout=10).text)
        served = sum(v for (name, labels), v in metrics.items()
                     if name == "cds_hook_calls_total" and ("status", "200") in labels)
        assert served == len(load.seen) + 1 + 6  # every worker's calls, added up
        assert metrics[("cds_policy_reloads_total", (("result", "loaded"),))] == 2  # once per worker
        for version in new:
            assert metrics[("cds_policy_version_info", (("policy", version.split("|")[0]), ("version", version)))] == 1
        for version in old:
            assert metrics[("cds_policy_version_info", (("policy", version.split("|")[0]), ("version", version)))] == 0
    # every log line is JSON (a line a child process of the runtime prints at exit, such as multiprocessing's
    # resource tracker, is not the service's)
    log = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("message", "").startswith("policy reload refused: mp-442.yaml") for line in log)
    assert sum(line.get("event") == "hook_call" for line in log) == served
    run = listener_dir(tmp_path / "cds-run", "127.0.0.1", 18861)  # beside the SQLite file, per address
    assert (run / "generation.json").exists() and not (run / "serve.pid").exists()  # stopped


def test_sighup_reloads_a_service_with_one_worker(tmp_path: Path) -> None:
    """One process serves (the default, and the container's): SIGHUP reaches it, the next calls are
    decided under the new files."""
    policies = copy_policies(tmp_path)
    config = write_config(tmp_path, policies)
    with ServerProcess(config, workers=1) as server:
        old = versions(httpx.post(server.url + SIGN, json=both_policies(), timeout=30).json())
        change_shared_file(policies)
        done = reload(config)  # SIGHUP to the pid in the run directory: the serving process itself
        assert done.returncode == 0, done.stdout + done.stderr
        new = versions(httpx.post(server.url + SIGN, json=both_policies(), timeout=30).json())
    assert new.isdisjoint(old) and len(new) == 2


def test_reload_without_a_running_service_says_so(tmp_path: Path) -> None:
    result = reload(write_config(tmp_path, copy_policies(tmp_path)))
    assert result.returncode == 1 and "no running service" in result.stderr


def test_a_second_service_cannot_take_a_running_service_s_run_directory(tmp_path: Path) -> None:
    policies, cards = copy_policies(tmp_path), data_dir("cards")
    run = RunDirectory(tmp_path / "run")
    run.start(os.getpid(), policies, cards)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(Exception, match="another service"):
            run.start(other.pid, policies, cards)
    finally:
        other.kill()
        other.wait()
