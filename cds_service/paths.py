"""Where the policy files and card templates are: next to the package when installed (a wheel
carries them as ``cds_service/_data``), at the repository's top level in a checkout, or where the
configuration says."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str, configured: str | None = None) -> Path:
    if configured:
        return Path(configured)
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ directory (set service.{name}_dir in the config)")
