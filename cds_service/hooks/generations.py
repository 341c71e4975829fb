"""Policy generations: the checked copy of the policy files and card templates that every worker of a running
service serves, and how a reload reaches the workers.

A running service (``cds-service serve``) keeps a run directory, one per listening address under
``[server] run_dir`` (``<host>-<port>``):

    serve.pid           the process a reload is asked of (SIGHUP): the serving process, or with --workers N
                        the supervisor
    generation.json     the generation in force: {"generation", "snapshot", "versions", "published_at"}
    attempt.json        the last reload attempt: {"attempt", "result": "loaded" | "refused", "error", ...}
    snapshots/<n>/      generation n: policies/ and cards/, copied from the configured directories
    workers/<pid>.json  what each worker serves: {"pid", "generation", "versions", "result", "error"}
    publish.lock        held while a generation is published

Publishing (at start, and on each reload) copies the configured directories, then loads the copy strictly
(policies, card templates, the service built from them): only a copy that loads becomes the next
generation, so every worker serves exactly the files that were checked, whatever happens to the configured
directories afterwards; one that does not load is refused, logged, and changes nothing. Each worker looks
at ``generation.json`` a few times a second, builds the new service off the event loop, and swaps it in
whole: a request is answered by one generation from start to end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from ..config import ServerSettings, StorageSettings
from ..engine.policy import PolicyError, PolicySet, load_policies
from .cards import CardRenderer

log = logging.getLogger("cds_service.reload")

KEEP_SNAPSHOTS = 3
_IGNORED = shutil.ignore_patterns(".*", "__pycache__", "*.pyc")


def default_run_dir(database_url: str, spool_dir: str | None = None) -> Path:
    """Beside the SQLite file (``<name>-run``), else beside the configured audit spool, else
    ``cds-service-run`` in the working directory."""
    url = sa.engine.make_url(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).absolute()
        return database.with_name(database.stem + "-run")
    if spool_dir:
        return Path(spool_dir).absolute().parent / "cds-service-run"
    return Path.cwd() / "cds-service-run"


@dataclass(frozen=True)
class Generation:
    """A published copy of the policy files and card templates, numbered, with the versions of its policies."""

    number: int
    snapshot: Path
    versions: Mapping[str, str]

    @property
    def policies_dir(self) -> Path:
        return self.snapshot / "policies"

    @property
    def cards_dir(self) -> Path:
        return self.snapshot / "cards"


@dataclass(frozen=True)
class Attempt:
    """The outcome of the latest reload: the generation it published (or would have), loaded or refused, why."""

    number: int
    result: str  # "loaded" | "refused"
    error: str | None = None
    generation: int | None = None
    versions: Mapping[str, str] | None = None


@dataclass(frozen=True)
class WorkerState:
    """What a worker serves (``generation``, ``versions``) and how its last attempt (at generation
    ``attempted``) went: ``loaded`` or ``refused`` (``error`` says why)."""

    pid: int
    generation: int
    versions: Mapping[str, str]
    attempted: int
    result: str
    error: str | None = None


def check(policies_dir: Path, cards_dir: Path) -> PolicySet:
    """Load the policy files and card templates strictly (PolicyError, or the template's error, when not)."""
    policies = load_policies(policies_dir)
    CardRenderer(cards_dir)
    return policies


def run_dir_of(server: ServerSettings, storage: StorageSettings) -> Path:
    """Where the services of this configuration keep their state: one directory per listening address
    in it (:func:`listener_dir`)."""
    return Path(server.run_dir) if server.run_dir else default_run_dir(storage.url, storage.spool_dir)


def listener_dir(base: Path, host: str, port: int) -> Path:
    """The run directory of the service listening on ``host``:``port`` (two services started from one
    configuration never share one)."""
    return base / f"{host.replace(':', '_').replace('/', '_')}-{port}"


def running_services(base: Path) -> list[RunDirectory]:
    """The run directories under ``base`` whose service runs."""
    found = [RunDirectory(d) for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
    return [run for run in found if run.serving_pid() is not None]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(path: Path, value: Any) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new content, never a part)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(value))
    os.replace(temporary, path)


def _read(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RunDirectory:
    """The running service's state on disk (``[server] run_dir``, one per listening address): the serving
    process's pid, the policy generations, the latest reload attempt and each worker's state. ``serve`` and
    ``policy reload`` write and read it; workers follow it (web/reloading.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # --- the serving process ------------------------------------------------------------------

    def start(self, pid: int, policies_dir: Path, cards_dir: Path) -> Generation:
        """A new run: the state of an earlier one removed, ``pid`` the process a reload is asked of, the
        first generation published (raises when the files do not load)."""
        self.path.mkdir(parents=True, exist_ok=True)
        other = self.serving_pid()
        if other is not None and other != pid:
            raise PolicyError(f"another service (pid {other}) runs with the run directory {self.path}")
        with self._lock():
            for name in ("snapshots", "workers"):
                shutil.rmtree(self.path / name, ignore_errors=True)
            for name in ("generation.json", "attempt.json"):
                (self.path / name).unlink(missing_ok=True)
        (self.path / "workers").mkdir()
        attempt = self.publish(policies_dir, cards_dir)
        if attempt.result != "loaded":
            raise PolicyError(attempt.error or "the policy files do not load")
        _write(self.path / "serve.pid", pid)
        generation = self.current()
        assert generation is not None
        return generation

    def stop(self, pid: int) -> None:
        if _read(self.path / "serve.pid") == pid:
            (self.path / "serve.pid").unlink(missing_ok=True)

    def publish(self, policies_dir: Path, cards_dir: Path) -> Attempt:
        """Copy and check the files; when they load, they become the next generation. Never raises for the
        files' content: a refusal is logged and returned."""
        with self._lock():
            last = self.attempt()
            number = (last.number if last else 0) + 1
            current = self.current()
            next_generation = (current.number if current else 0) + 1
            snapshots = self.path / "snapshots"
            snapshots.mkdir(exist_ok=True)
            staging = snapshots / f".staging-{next_generation}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                shutil.copytree(policies_dir, staging / "policies", ignore=_IGNORED)
                shutil.copytree(cards_dir, staging / "cards", ignore=_IGNORED)
                policies = check(staging / "policies", staging / "cards")
            except Exception as error:  # whatever keeps the files from loading refuses them; the service goes on
                shutil.rmtree(staging, ignore_errors=True)
                reason = str(error) or type(error).__name__
                if isinstance(error, OSError) and error.strerror:
                    reason = f"{error.strerror}: {error.filename}"
                elif not isinstance(error, PolicyError):
                    reason = f"{type(error).__name__}: {reason}"
                log.error("policy reload refused: %s (still serving generation %s: %s)", reason,
                          current.number if current else "-",
                          ", ".join(current.versions.values()) if current else "none")
                refused = Attempt(number, "refused", reason, current.number if current else None,
                                  dict(current.versions) if current else None)
                self._record(refused)
                return refused
            target = snapshots / f"{next_generation:06d}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            versions = {p.id: p.version for p in policies.policies}
            _write(self.path / "generation.json", {"generation": next_generation, "snapshot": target.name,
                                                   "versions": versions, "published_at": _now(),
                                                   "source": str(policies_dir)})
            loaded = Attempt(number, "loaded", None, next_generation, versions)
            self._record(loaded)
            self._prune(next_generation)
        log.info("policy generation %d published from %s: %s", next_generation, policies_dir,
                    ", ".join(versions.values()))
        return loaded

    def _record(self, attempt: Attempt) -> None:
        _write(self.path / "attempt.json", {"attempt": attempt.number, "result": attempt.result, "error": attempt.error,
                                            "generation": attempt.generation, "versions": attempt.versions,
                                            "at": _now()})

    def _prune(self, newest: int) -> None:
        for old in (self.path / "snapshots").iterdir():
            if old.name.isdigit() and int(old.name) <= newest - KEEP_SNAPSHOTS:
                shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "publish.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- reading ------------------------------------------------------------------------------

    def current(self) -> Generation | None:
        data = _read(self.path / "generation.json")
        if not isinstance(data, dict):
            return None
        return Generation(int(data["generation"]), self.path / "snapshots" / str(data["snapshot"]),
                          dict(data["versions"]))

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever ``generation.json`` is replaced (cheap: one stat)."""
        try:
            stat = (self.path / "generation.json").stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def attempt(self) -> Attempt | None:
        data = _read(self.path / "attempt.json")
        if not isinstance(data, dict):
            return None
        return Attempt(int(data["attempt"]), str(data["result"]), data.get("error"), data.get("generation"),
                       data.get("versions"))

    def serving_pid(self) -> int | None:
        """The pid of the running service that reloads are asked of, when it runs."""
        pid = _read(self.path / "serve.pid")
        return pid if isinstance(pid, int) and _pid_alive(pid) else None

    # --- workers ------------------------------------------------------------------------------

    def report(self, state: WorkerState) -> None:
        _write(self.path / "workers" / f"{state.pid}.json", state.__dict__)

    def leave(self, pid: int) -> None:
        (self.path / "workers" / f"{pid}.json").unlink(missing_ok=True)

    def workers(self) -> list[WorkerState]:
        """The live workers' states (those of workers that have exited are removed)."""
        states = []
        for path in sorted((self.path / "workers").glob("*.json")):
            data = _read(path)
            if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not _pid_alive(data["pid"]):
                path.unlink(missing_ok=True)
                continue
            states.append(WorkerState(int(data["pid"]), int(data["generation"]), dict(data["versions"]),
                                      int(data["attempted"]), str(data["result"]), data.get("error")))
        return states

