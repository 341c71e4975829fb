"""The directory prometheus_client's multiprocess mode keeps every process's metric values in.

``cds-service serve`` prepares it before any worker (or the audit writer process) starts, so that every
process of the service writes its values there and ``/metrics`` adds them up: ``PROMETHEUS_MULTIPROC_DIR``
when the environment names one (its old files are removed: counts start at zero with every run), else a new
temporary directory, removed when the service stops. This module must not import prometheus_client: the
mode is chosen when that is first imported.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir() -> tuple[Path, Callable[[], None]]:
    """The directory for this run (empty), set in the environment for every process started from here; and
    what to call when the service has stopped."""
    if "prometheus_client" in sys.modules and ENV_MULTIPROC_DIR not in os.environ:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set: "
                           "metrics of the other processes would be lost")
    configured = os.environ.get(ENV_MULTIPROC_DIR)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.db"):
            old.unlink()
        return directory, lambda: None
    directory = Path(tempfile.mkdtemp(prefix="cds-service-metrics-"))
    os.environ[ENV_MULTIPROC_DIR] = str(directory)

    def remove() -> None:
        shutil.rmtree(directory, ignore_errors=True)

    return directory, remove
