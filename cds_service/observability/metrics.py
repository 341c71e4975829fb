"""The service's Prometheus metrics (prometheus_client), and their exposition for ``GET /metrics``.

Every family has bounded labels (labels.py). Under ``cds-service serve`` prometheus_client runs in its
multiprocess mode (metrics_dir.py): each worker and each audit writer process writes its values to the
run's directory, and a scrape, answered by any worker, adds them up. Without that directory (the service
built in process, e.g. by the tests) the values are this process's.

What the audit spool holds and drops is not counted here but read from the spool when scraped
(:class:`AuditFigures`): the spool is shared by every process of a replica, and its ``drops.json`` already
counts what any of them dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from .metrics_dir import ENV_MULTIPROC_DIR

__all__ = ["CONTENT_TYPE_LATEST", "AuditFigures", "exposition"]

HOOK_CALLS = Counter("cds_hook_calls", "Hook calls answered, by service and HTTP status.", ["service", "status"])
HOOK_LATENCY = Histogram("cds_hook_latency_seconds", "Time to answer a hook call, by service.", ["service"])
DECISIONS = Counter("cds_decisions", "Coverage decisions, by policy, outcome and rule.", ["policy", "outcome", "rule"])
FHIR_READS = Counter("cds_fhir_reads", "Searches on EHR FHIR servers, by outcome (ok, timeout, 4xx, 5xx, too_large, "
                     "error).", ["outcome"])
FHIR_READ_LATENCY = Histogram("cds_fhir_read_latency_seconds", "Time of one FHIR search (all its pages), by outcome.",
                              ["outcome"])
JWT_REFUSALS = Counter("cds_jwt_refusals", "Requests refused for their token (401), by reason.", ["reason"])
FEEDBACK = Counter("cds_feedback", "CDS Hooks feedback entries accepted, by outcome and override reason code.",
                   ["outcome", "override_reason"])
AUDIT_QUEUE = Gauge("cds_audit_queue_depth", "Audit records queued for the writer, summed over the live workers.",
                    multiprocess_mode="livesum")
AUDIT_WRITTEN = Counter("cds_audit_records_written", "Audit and feedback records the audit writer stored in the "
                        "database (a record replayed after an uncertain write counts again).")
POLICY_VERSION = Gauge("cds_policy_version_info", "1 for each policy version a live worker serves.",
                       ["policy", "version"], multiprocess_mode="livemax")
POLICY_RELOADS = Counter("cds_policy_reloads", "Policy generations a worker took up (loaded) or could not (refused).",
                         ["result"])

_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


@dataclass(frozen=True)
class AuditFigures:
    """The audit spool as read at scrape time (None: the spool did not answer in time)."""

    dropped: Mapping[str, int] = field(default_factory=dict)
    spool_records: int | None = None
    spool_bytes: int | None = None
    oldest_age_seconds: float | None = None


class _AuditCollector:
    def __init__(self, figures: AuditFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily("cds_audit_records_dropped", "Audit and feedback records not stored, by reason "
                                      "(from the spool's drops.json: every process of this replica, since the spool "
                                      "was created).", labels=["reason"])
        for reason, count in sorted(self.figures.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        spool = [("cds_audit_spool_records", "Records waiting in the audit spool.", self.figures.spool_records),
                 ("cds_audit_spool_bytes", "Bytes of records waiting in the audit spool.", self.figures.spool_bytes),
                 ("cds_audit_spool_oldest_age_seconds", "Age of the oldest record waiting in the audit spool (0: "
                  "none waits).", self.figures.oldest_age_seconds)]
        for name, text, value in spool:
            if self.figures.spool_records is not None:
                yield GaugeMetricFamily(name, text, value=float(value or 0))


class _Process:
    """This process's own metrics (the default registry) as one collector."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess_dir() -> Path | None:
    directory = os.environ.get(ENV_MULTIPROC_DIR)
    return Path(directory) if directory else None


def _forget_dead_processes(directory: Path) -> None:
    """The live-only gauges of processes that have exited (a worker replaced) are removed (there is no hook
    for it in uvicorn, as gunicorn's child_exit gives)."""
    for path in directory.iterdir():
        found = _LIVE_FILE.match(path.name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            prometheus_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


def exposition(audit: AuditFigures | None) -> bytes:
    """The metrics in the Prometheus text format: every process's (multiprocess mode) or this one's, and the
    audit spool's."""
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory is not None:
        _forget_dead_processes(directory)
        prometheus_multiprocess.MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    else:
        registry.register(_Process())
    if audit is not None:
        registry.register(_AuditCollector(audit))
    return generate_latest(registry)


def serving(versions: Sequence[tuple[str, str]], previous: Sequence[tuple[str, str]] = ()) -> None:
    """This worker now serves the policy ``versions`` ((policy, version) pairs) instead of ``previous``."""
    for policy, version in previous:
        POLICY_VERSION.labels(policy, version).set(0)
    for policy, version in versions:
        POLICY_VERSION.labels(policy, version).set(1)
