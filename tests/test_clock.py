"""The one Oslo/UTC helper: every module that turns a stored time into a night or a page's "UTC" uses it."""

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from include.invoice_mailing import clock

OSLO = ZoneInfo("Europe/Oslo")


@pytest.mark.parametrize(("stored", "night"), [
    (datetime(2026, 11, 30, 23, 30), date(2026, 12, 1)),                   # SQLite: naive UTC, 00:30 in Oslo
    (datetime(2026, 11, 30, 23, 30, tzinfo=UTC), date(2026, 12, 1)),       # PostgreSQL with a UTC session
    (datetime(2026, 12, 1, 0, 30, tzinfo=OSLO), date(2026, 12, 1)),        # PostgreSQL with an Oslo session
    (datetime(2026, 6, 30, 22, 30), date(2026, 7, 1)),                     # summer time: UTC+2
    (datetime(2026, 6, 30, 21, 30), date(2026, 6, 30)),
])
def test_a_stored_moment_belongs_to_the_oslo_night_whatever_the_database_gives_back(stored, night):
    assert clock.night_of(stored) == night


def test_the_same_moment_reads_the_same_in_utc_from_every_database():
    """The audit pages print times as "… UTC": an aware time in the session's zone is converted, not relabelled."""
    naive = datetime(2026, 12, 1, 1, 5)
    aware_oslo = datetime(2026, 12, 1, 2, 5, tzinfo=OSLO)
    assert clock.utc(naive) == clock.utc(aware_oslo) == datetime(2026, 12, 1, 1, 5, tzinfo=UTC)
    assert clock.utc(aware_oslo).utcoffset().total_seconds() == 0
    assert clock.naive_utc(aware_oslo) == naive


def test_a_date_filters_day_starts_at_oslo_midnight():
    assert clock.utc(clock.day_start(date(2026, 12, 1))) == datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    assert clock.utc(clock.day_start(date(2026, 7, 1))) == datetime(2026, 6, 30, 22, 0, tzinfo=UTC)


@pytest.mark.parametrize(("moment", "night"), [
    (datetime(2026, 12, 1, 5, 0, tzinfo=UTC), datetime(2026, 12, 1, 1, 0, tzinfo=UTC)),   # 06:00 Oslo
    (datetime(2026, 12, 1, 0, 59, tzinfo=UTC), datetime(2026, 11, 30, 1, 0, tzinfo=UTC)),  # 01:59 Oslo
    # 02:00 does not exist on the spring-forward morning: the night is at 03:00 CEST, as Airflow's timetable has it
    (datetime(2026, 3, 29, 4, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
])
def test_the_last_night_is_the_last_two_oclock_in_oslo(moment, night):
    assert clock.last_night(moment) == night


def test_the_audit_page_prints_an_oslo_session_time_in_utc():
    """Before the one helper the page relabelled an aware time: 02:05+01:00 read "02:05 UTC"."""
    import plugins.invoice_mailing_audit as page

    assert page._when(datetime(2026, 12, 1, 2, 5, tzinfo=OSLO)) == (
        '<time datetime="2026-12-01T01:05:00Z">2026-12-01 01:05 UTC</time>')
