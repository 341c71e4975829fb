"""The command line: configuration, the refusal to run unauthenticated off loopback, offline evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service.config import ConfigError, load_config, parse_config

from .serverproc import ServerProcess
from .support import FIXTURES, load, scenario_request, write_config


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cds_service", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_defaults_work_without_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDS_SERVICE_CONFIG", raising=False)
    config = load_config()
    assert config.service.payer_name == "Example Health Plan"
    assert config.auth.mode == "off" and config.storage.url.startswith("sqlite:///")
    assert config.fhir.timeout_seconds == 3.0


@pytest.mark.parametrize(("data", "message"), [
    ({"service": {"payer_nme": "X"}}, "unknown key service.payer_nme"),
    ({"servce": {}}, "unknown section [servce]"),
    ({"auth": {"mode": "jwt"}}, "needs at least one [[auth.issuers]]"),
    ({"auth": {"mode": "basic"}}, 'auth.mode must be "jwt" or "off"'),
    ({"auth": {"issuers": [{"iss": "x", "jwks_uri": "https://x"}]}}, "unknown key auth.issuers.jwks_uri"),
    ({"fhir": {"timeout_seconds": "3"}}, "fhir.timeout_seconds has the wrong type"),
    ({"storage": {"url": "mysql://x"}}, "storage.url must be"),
])
def test_config_mistakes_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, "test.toml")
    assert message in str(error.value)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[service]\npayer_name = "Acme Health"\n[fhir]\ntimeout_seconds = 2\n')
    monkeypatch.setenv("CDS_SERVICE_CONFIG", str(path))
    config = load_config()
    assert config.service.payer_name == "Acme Health" and config.fhir.timeout_seconds == 2


def test_serve_refuses_unauthenticated_on_a_public_address(tmp_path: Path) -> None:
    result = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 2
    assert "authentication is off" in result.stderr and "Traceback" not in result.stderr


def test_serve_reports_a_bad_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[service]\nport = 1\n")
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2 and "unknown key service.port" in result.stderr


def test_serve_reports_a_run_directory_it_cannot_write(tmp_path: Path) -> None:
    """A data directory the service's user cannot write (a host directory mounted into the container without
    its owner changed) is one clear line, not a traceback."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    url = f"sqlite:///{tmp_path / 'cds.sqlite3'}"
    config = write_config(tmp_path, url, f'[server]\nrun_dir = "{blocker / "run"}"\n')
    result = cli("serve", "--config", str(config), "--port", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write the run directory" in result.stderr


def test_evaluate_prints_one_response_per_file_and_explains(tmp_path: Path) -> None:
    files = []
    for name in ("mp446-ketamine-iv-chronic-pain", "mp442-chronic-pain-no-trial"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(scenario_request(load(FIXTURES / f"scenarios/{name}.json"))))
        files.append(str(path))
    plain = cli("evaluate", *files)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["cards"][0]["summary"].startswith("Not covered: IV ketamine for chronic pain")
    explained = cli("evaluate", "--explain", files[1])
    assert "MP-442 -> conditional (rule chronic-intractable-pain)" in explained.stdout
    assert "clause: Severe, chronic, intractable pain" in explained.stdout
    assert "missing: a documented temporary trial" in explained.stdout
    assert "evidence: ServiceRequest/pump" in explained.stdout


def test_evaluate_reports_bad_requests_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = cli("evaluate", str(bad), str(FIXTURES / "hooks/16_crd-ri_medication-prescribe_LEGACY-hook.json"))
    assert result.returncode == 1
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["resourceType"] for o in outcomes] == ["OperationOutcome", "OperationOutcome"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_ends_serve_cleanly_and_it_cleans_up(tmp_path: Path, workers: int) -> None:
    """A container's stop: exit status 0, and the run directory no longer names a serving process."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'cds.sqlite3'}", f'[server]\nrun_dir = "{run_dir}"\n')
    server = ServerProcess(config, workers=workers)
    pid_files = list(run_dir.glob("*/serve.pid"))
    code = server.stop()
    assert pid_files and code == 0, server.log.read_text()
    assert not list(run_dir.glob("*/serve.pid")) and "Traceback" not in server.log.read_text()
