"""The one place that knows the night's time zone and how the databases keep time.

A night is a day in Europe/Oslo (the DAG runs at 02:00 there; a date filter's days are Oslo days).
The ledger and the ERP keep UTC, and SQLite gives it back naive. Every module converts through these
functions, so "naive means UTC" is decided once. Standard library only: the DAG files import it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

TIMEZONE_NAME = "Europe/Oslo"
TIMEZONE = ZoneInfo(TIMEZONE_NAME)


def now() -> datetime:
    """The current moment, aware, in UTC."""
    return datetime.now(UTC)


def utc(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC, aware; a naive moment is UTC already (as SQLite and the ERP give it back)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def naive_utc(moment: datetime | None) -> datetime | None:
    """``moment`` as naive UTC, to compare with the ERP's TIMESTAMP columns (the contract's)."""
    if moment is None:
        return None
    return utc(moment).replace(tzinfo=None)


def local(moment: datetime | None) -> datetime | None:
    """``moment`` in Europe/Oslo (naive: UTC)."""
    return None if moment is None else utc(moment).astimezone(TIMEZONE)


def night_of(moment: datetime | None) -> date | None:
    """The Oslo date of ``moment``: the night a run's logical date or a delivery belongs to."""
    return None if moment is None else local(moment).date()


def day_start(day: date) -> datetime:
    """Midnight in Oslo at the start of ``day``, aware."""
    return datetime.combine(day, time(0), TIMEZONE)


def last_night(moment: datetime, hour: int = 2) -> datetime:
    """The last ``hour`` o'clock in Oslo at or before ``moment``, in UTC: the night a morning looks at."""
    here = local(moment)
    night = here.replace(hour=hour, minute=0, second=0, microsecond=0)
    if night > here:
        night -= timedelta(days=1)
    return night.astimezone(UTC)
