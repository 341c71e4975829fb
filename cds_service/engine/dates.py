"""FHIR dates and times as aware UTC datetimes, from JSON text or fhir.resources values."""

from __future__ import annotations

import datetime as dt
from typing import Any


def as_utc(value: Any) -> dt.datetime | None:
    """A FHIR date/dateTime (date, naive or aware datetime, or ISO text; a year or year-month is read as
    its first day) as an aware UTC datetime, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 40:
            return None
        try:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            try:
                value = dt.date.fromisoformat((text + "-01-01")[:10] if len(text) in (4, 7) else text[:10])
            except ValueError:
                return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return None


def period_of(resource: Any, prefix: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Start and end of ``{prefix}DateTime`` / ``{prefix}Period`` on a resource (a fhir.resources model)."""
    moment = as_utc(getattr(resource, f"{prefix}DateTime", None))
    if moment is not None:
        return moment, moment
    period = getattr(resource, f"{prefix}Period", None)
    if period is None:
        return None, None
    start, end = as_utc(period.start), as_utc(period.end)
    return start or end, end or start


def months_before(moment: dt.datetime, months: int) -> dt.datetime:
    """``moment`` minus whole calendar months (the day clipped to the target month's length)."""
    year, month = divmod(moment.year * 12 + moment.month - 1 - months, 12)
    month += 1
    day = moment.day
    while True:
        try:
            return moment.replace(year=year, month=month, day=day)
        except ValueError:
            day -= 1
