"""The ``cds-service`` command: serve, evaluate requests offline, export and prune the stores."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ENV_CONFIG, ENV_HEADER_READ_TIMEOUT, ENV_RUN_DIR, Config, load_config, metrics_token
from .errors import ServiceError, SetupError, operation_outcome
from .hooks.service import SERVICES, CoverageService
from .jsonutil import JSONDecodeError, dumps, loads
from .observability.logs import ENV_LOG_FORMAT
from .observability.logs import configure as configure_logging
from .observability.logs import resolve as resolve_log_format
from .observability.metrics_dir import prepare_metrics_dir
from .paths import data_dir
from .urls import is_loopback

if TYPE_CHECKING:
    from .storage.spool import Spool
    from .storage.store import Store


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _print_json(value: Any) -> None:
    sys.stdout.write(dumps(value).decode() + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    fmt = resolve_log_format(args.log_format or config.logging.format)
    os.environ[ENV_LOG_FORMAT] = fmt
    log_config = configure_logging(fmt, args.log_level)
    if config.auth.mode == "off" and not is_loopback(args.host):
        print(f"refusing to start: authentication is off, so the service may only listen on a loopback "
              f"address, not {args.host}. Configure [auth] mode = \"jwt\" with [[auth.issuers]], "
              "or use --host 127.0.0.1.", file=sys.stderr)
        return 2
    if config.auth.mode == "jwt" and not (config.service.public_base_url or config.auth.audiences) \
            and not is_loopback(args.host):
        print("refusing to start: auth.mode = \"jwt\" needs service.public_base_url (the URL EHRs call, which "
              "tokens must name as their audience) or auth.audiences, unless the service listens on a loopback "
              f"address (not {args.host}).", file=sys.stderr)
        return 2
    metrics_token(config.metrics)  # fail fast on an unreadable token file
    # every process of this run (workers, audit writers) keeps its metrics in one directory: set before
    # prometheus_client is first imported (the storage layer imports it)
    _, remove_metrics_dir = prepare_metrics_dir()
    from .hooks.generations import RunDirectory, listener_dir, run_dir_of
    from .storage.store import Store

    policies_dir = data_dir("policies", config.service.policies_dir)
    cards_dir = data_dir("cards", config.service.cards_dir)
    run = RunDirectory(listener_dir(run_dir_of(config.server, config.storage), args.host, args.port))
    try:
        # the first policy generation: the files loaded strictly (a bad policy file stops the start here)
        try:
            run.start(os.getpid(), policies_dir, cards_dir)
        except OSError as error:
            print(f"cannot write the run directory {run.path}: {error.strerror}. The service's user must be able "
                  "to write its data directory (in a container: the volume at /var/lib/cds; see README, "
                  "\"Docker\").", file=sys.stderr)
            return 2
        # run migrations once, before any worker starts; a database that is away does not stop the service
        # (it answers hooks without one; the audit writer migrates when the database is back)
        Store(config.storage.url, writer="none", database_timeout=config.storage.database_timeout_seconds,
              require_database=False).close()
        if args.config:
            os.environ[ENV_CONFIG] = str(Path(args.config).resolve())
        os.environ[ENV_HEADER_READ_TIMEOUT] = str(config.server.header_read_timeout_seconds)
        os.environ[ENV_RUN_DIR] = str(run.path)

        def reload_policies() -> None:  # SIGHUP: off the serving thread (loading takes a moment)
            threading.Thread(target=run.publish, args=(policies_dir, cards_dir), name="cds-policy-reload",
                             daemon=True).start()

        banner = (f"cds-service: {config.source}; storage {config.storage.url.split('@')[-1]}; auth "
                  f"{config.auth.mode}; run directory {run.path} (pid {os.getpid()}: SIGHUP reloads the policies); "
                  f"http://{args.host}:{args.port}/cds-services")
        if fmt == "json":
            logging.getLogger("cds_service").info(banner)
        else:
            print(banner, file=sys.stderr)
        _run_uvicorn(args, config, log_config, reload_policies)
    finally:
        run.stop(os.getpid())
        remove_metrics_dir()
    return 0


def _stopped(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _run_uvicorn(args: argparse.Namespace, config: Config, log_config: dict[str, Any],
                 reload_policies: Callable[[], None]) -> None:
    """uvicorn, as ``uvicorn.run`` runs it, with SIGHUP reloading the policy files: in the one serving
    process, or with ``--workers N`` in the supervisor (whose own SIGHUP would restart the workers)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    settings = uvicorn.Config(
        "cds_service.web.asgi:app_from_environment", factory=True, host=args.host, port=args.port,
        workers=args.workers, log_level=args.log_level, log_config=log_config, access_log=False,
        timeout_graceful_shutdown=20, http="cds_service.web.protocol:LimitedHttpToolsProtocol",
        limit_concurrency=config.server.limit_concurrency, timeout_keep_alive=config.server.timeout_keep_alive_seconds)
    if args.workers <= 1:
        signal.signal(signal.SIGHUP, lambda *_: reload_policies())
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the handler it
        # found: end the process normally there (exit 0), so serve's cleanup runs (run directory, metrics)
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, _stopped)
        server = uvicorn.Server(settings)
        server.run()
        if not server.started:
            raise SystemExit(3)  # as uvicorn.run: the app did not start
        return

    class PolicyReloadingSupervisor(Multiprocess):
        def handle_hup(self) -> None:
            logging.getLogger("cds_service.reload").warning("SIGHUP: reloading the policy files")
            reload_policies()

    PolicyReloadingSupervisor(settings, sockets=[settings.bind_socket()]).run()


def cmd_policy_reload(args: argparse.Namespace) -> int:
    """Ask the running service to reload its policy files (SIGHUP to the pid in its run directory) and wait
    until every worker serves them, or until the service has refused them."""
    from .hooks.generations import run_dir_of, running_services

    config = _config(args)
    base = run_dir_of(config.server, config.storage)
    services = [r for r in running_services(base) if args.port is None or r.path.name.endswith(f"-{args.port}")]
    if len(services) != 1:
        found = ", ".join(r.path.name for r in services)
        print(f"no running service keeps its state in {base} (is it started with this --config?)" if not services
              else f"several services run from {base} ({found}): name one with --port", file=sys.stderr)
        return 1
    run = services[0]
    pid = run.serving_pid()
    if pid is None:
        print(f"the service of {run.path} has stopped", file=sys.stderr)
        return 1
    before = run.attempt()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while (attempt := run.attempt()) is None or (before is not None and attempt.number <= before.number):
        if time.monotonic() > deadline:
            print(f"the service (pid {pid}) did not answer the reload within {args.timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    if attempt.result != "loaded" or attempt.generation is None:
        print(f"refused: {attempt.error}")
        kept = ", ".join((attempt.versions or {}).values()) or "-"
        print(f"the service keeps generation {attempt.generation}: {kept}")
        return 1
    while True:
        workers = run.workers()
        if workers and all(w.attempted >= attempt.generation for w in workers):
            break
        if time.monotonic() > deadline:
            print(f"generation {attempt.generation} published, but not every worker took it up within "
                  f"{args.timeout:g} s", file=sys.stderr)
            break
        time.sleep(0.05)
    ok = True
    for worker in workers:
        state = "serves" if worker.generation >= attempt.generation else f"refused it ({worker.error}); serves"
        ok = ok and worker.generation >= attempt.generation
        print(f"worker {worker.pid}: {state} generation {worker.generation}: {', '.join(worker.versions.values())}")
    print(f"generation {attempt.generation} loaded: {', '.join((attempt.versions or {}).values())}" if ok else
          f"generation {attempt.generation} loaded, but not by every worker")
    return 0 if ok else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = _config(args)
    service = CoverageService.from_config(config, offline=True)
    base_url = config.service.public_base_url or "http://127.0.0.1:8080"
    status = 0
    for name in args.requests:
        try:
            body = loads(Path(name).read_bytes())
            hook = body.get("hook") if isinstance(body, dict) else None
            service_id = next((sid for sid, h in SERVICES.items() if h == hook), next(iter(SERVICES)))
            result = asyncio.run(service.handle(service_id, body, base_url))
            _print_json(result.response)
            if args.explain:
                print("\n".join(d.explain_text() for d in result.decisions) or "(no order in scope of any policy)")
        except (OSError, JSONDecodeError) as error:
            _print_json(operation_outcome(f"{name}: cannot read a JSON request: {type(error).__name__}"))
            status = 1
        except ServiceError as error:
            _print_json(operation_outcome(f"{name}: {error}", error.code))
            status = 1
    return status


def default_scenarios_dir() -> Path | None:
    """``fixtures/scenarios`` of the working directory, else of the checkout the package runs from."""
    for candidate in (Path.cwd() / "fixtures" / "scenarios", Path(__file__).resolve().parent.parent / "fixtures"
                      / "scenarios"):
        if candidate.is_dir():
            return candidate
    return None


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Load the policy files strictly and run every scenario file against them: one line per scenario and a
    summary; 1 when the policies do not load or a scenario fails."""
    from .hooks.scenarios import check_files

    config = _config(args)
    directory = Path(args.policies) if args.policies else data_dir("policies", config.service.policies_dir)
    try:
        loaded = CoverageService.from_config(config, policies_dir=directory, offline=True)
    except (SetupError, OSError) as error:
        print(f"FAIL  policies in {directory} do not load: {error}")
        return 1
    print(f"ok    policies in {directory}: " + ", ".join(p.version for p in loaded.policies.policies))
    scenarios = Path(args.scenarios) if args.scenarios else default_scenarios_dir()
    if scenarios is None:
        print("no scenarios checked: no fixtures/scenarios here (give --scenarios DIR)")
        return 0
    paths = sorted(scenarios.glob("*.json")) if scenarios.is_dir() else []
    if not paths:
        print(f"FAIL  no scenario files (*.json) in {scenarios}" if scenarios.is_dir() else
              f"FAIL  {scenarios} is not a directory")
        return 1
    services: dict[dt.date, CoverageService] = {}

    def service_for(day: dt.date) -> CoverageService:
        if day not in services:
            services[day] = CoverageService.from_config(config, policies=loaded.policies, offline=True,
                                                        today=lambda: day)
        return services[day]

    failed = 0
    for name, problems in check_files(service_for, paths):
        failed += bool(problems)
        print(f"FAIL  {name}: " + "; ".join(problems) if problems else f"ok    {name}")
    print(f"{len(paths)} scenarios in {scenarios}: {len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[Store]:
    """The configured store, without an audit writer (these commands only read and prune)."""
    from .storage.store import Store

    store = Store(_config(args).storage.url, writer="none")
    try:
        yield store
    finally:
        store.close()


def cmd_audit_export(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            print(f"--since: not an ISO date: {args.since}", file=sys.stderr)
            return 2
        if since.tzinfo is None:
            since = since.replace(tzinfo=dt.UTC)
    with _store(args) as store:
        for row in store.audit_export(since):
            _print_json(row)
    return 0


def cmd_audit_prune(args: argparse.Namespace) -> int:
    with _store(args) as store:
        removed = store.audit_prune(args.older_than)
    print(f"removed {removed} audit records older than {args.older_than} days", file=sys.stderr)
    return 0


def _spool(args: argparse.Namespace) -> Spool:
    from .storage.spool import Spool, default_spool_dir

    storage = _config(args).storage
    directory = args.spool or storage.spool_dir or default_spool_dir(storage.url)
    return Spool(directory, storage.spool_max_bytes)


def cmd_audit_status(args: argparse.Namespace) -> int:
    """The spool of this host (needs no database): what waits, the oldest record's age, the drops."""
    spool = _spool(args)
    try:
        status = spool.status()
    finally:
        spool.close()
    age = status.oldest_age_seconds()
    if args.json:
        _print_json({"spool": status.directory, "records": status.records, "bytes": status.bytes,
                     "max_bytes": status.max_bytes, "oldest_age_seconds": age, "dropped": status.dropped,
                     "replaying": status.replaying})
        return 0
    print(f"spool: {status.directory}")
    print(f"records waiting: {status.records} ({status.bytes} of {status.max_bytes} bytes)")
    oldest = "-" if age is None else f"{age:.0f} s (received {status.oldest:%Y-%m-%dT%H:%M:%SZ})"
    print(f"oldest record age: {oldest}")
    drops = ", ".join(f"{reason} {n}" for reason, n in sorted(status.dropped.items())) or "none"
    print(f"dropped: {sum(status.dropped.values())} ({drops})")
    print(f"replaying: {'yes, by a running service' if status.replaying else 'no'}")
    return 0


def cmd_audit_replay(args: argparse.Namespace) -> int:
    """Write a spool (this host's, or one copied from another host) into the database, then exit."""
    spool = _spool(args)
    try:
        if not spool.acquire_replay():
            print(f"{spool.directory}: a running service is replaying this spool", file=sys.stderr)
            return 1
        with _store(args) as store:
            written = 0
            while (chunk := spool.read()) is not None:
                spool.reject(store.write_records(chunk.records))
                spool.advance(chunk.end)
                written += len(chunk.records)
    finally:
        spool.close()
    print(f"replayed {written} records from {spool.directory}", file=sys.stderr)
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        for row in store.feedback_export():
            _print_json(row)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help=f"TOML configuration file (default: ${ENV_CONFIG}, else built-in defaults)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the CDS Hooks service"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--log-format", choices=["auto", "json", "text"],
                       help="log lines as JSON or text (default: [logging] format, else auto: text on a terminal)")
    serve.set_defaults(func=cmd_serve)

    evaluate = with_config(sub.add_parser("evaluate", help="decide hook request files offline"))
    evaluate.add_argument("requests", nargs="+", metavar="REQUEST.json")
    evaluate.add_argument("--explain", action="store_true", help="print the decision trace")
    evaluate.set_defaults(func=cmd_evaluate)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    export = with_config(audit.add_parser("export", help="print audit records as JSON lines"))
    export.add_argument("--since", help="ISO date or date-time")
    export.set_defaults(func=cmd_audit_export)
    prune = with_config(audit.add_parser("prune", help="delete audit records older than DAYS"))
    prune.add_argument("--older-than", type=int, required=True, metavar="DAYS")
    prune.set_defaults(func=cmd_audit_prune)

    status = with_config(audit.add_parser("status", help="this host's audit spool: records waiting, oldest, drops"))
    status.add_argument("--spool", help="spool directory (default: from the configuration)")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_audit_status)
    replay = with_config(audit.add_parser("replay", help="write a spool into the database (e.g. one copied "
                                                           "from another host)"))
    replay.add_argument("--spool", help="spool directory (default: from the configuration)")
    replay.set_defaults(func=cmd_audit_replay)

    policy = sub.add_parser("policy", help="the policy files").add_subparsers(dest="action", required=True)
    check = with_config(policy.add_parser("check", help="load the policy files strictly and run every scenario "
                                                        "file against them"))
    check.add_argument("--policies", metavar="DIR", help="policy directory (default: the configured or packaged one)")
    check.add_argument("--scenarios", metavar="DIR", help="scenario files (default: fixtures/scenarios of this "
                                                          "directory or of the checkout)")
    check.set_defaults(func=cmd_policy_check)
    reload = with_config(policy.add_parser("reload", help="make the running service load its policy files again "
                                                          "(as SIGHUP does), and wait until every worker serves them"))
    reload.add_argument("--port", type=int, help="the port of the service to reload, when several run from this "
                                                 "configuration")
    reload.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    reload.set_defaults(func=cmd_policy_reload)

    feedback = sub.add_parser("feedback", help="card feedback").add_subparsers(dest="action", required=True)
    fexport = with_config(feedback.add_parser("export", help="print feedback (with its decision) as JSON lines"))
    fexport.set_defaults(func=cmd_feedback_export)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SetupError as error:
        print(f"cds-service: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
