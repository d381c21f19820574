"""What the DAG files need at parse time, and nothing heavier: settings from the environment, names.

The dag-processor imports the DAG files again and again; they import this module and Airflow's SDK
only. The pipeline (SQLAlchemy models, Jinja, WeasyPrint, Babel, smtplib) is imported inside the task
bodies, in the worker (``tests/test_dag_integrity.py`` checks the modules a parse imports).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Asset

from include.invoice_mailing.clock import TIMEZONE_NAME

DAG_ID, WATCH_DAG_ID, BOUNCES_DAG_ID = "invoice_mailing", "invoice_mailing_watch", "invoice_mailing_bounces"
TIMEZONE = TIMEZONE_NAME
NIGHT_CRON = "0 2 * * *"
# Between nights, at half past every hour: never at 02:00, when the night reads the mailbox itself.
BOUNCES_CRON = "30 * * * *"
# Updated once by every night that opened, green or red, with its status and counts in ``extra`` (by
# audit, or by publish_red when audit failed); again when a red night is mended: data teams schedule on it.
NIGHTS = Asset(uri="invoice_mailing://ledger/nights", name="invoice_mailing_nights")
DEFAULT_SMTP_SESSIONS = 4
# XCom keys: a task's last failed try records why (for the night's failure alert); audit records
# that it mailed the red-night alert (so that the failure alert does not mail the operators twice), and
# the night's summary before it fails (for publish_red's asset event).
FAILURE_KEY, ALERTED_KEY, SUMMARY_KEY = "failure", "alerted", "summary"


def retry_delay() -> timedelta:
    """Airflow's first retry delay of a step (then doubled): 2 minutes, or INVOICE_MAILING_RETRY_DELAY_SECONDS."""
    return timedelta(seconds=float(os.environ.get("INVOICE_MAILING_RETRY_DELAY_SECONDS", "120")))


def retries() -> int:
    """How many times Airflow retries a step whose deliveries were deferred: 4, or INVOICE_MAILING_RETRIES."""
    return int(os.environ.get("INVOICE_MAILING_RETRIES", "4"))


def smtp_sessions() -> int:
    """The SMTP sessions a relay takes at once when its connection's extra names no ``max_sessions``:
    INVOICE_MAILING_SMTP_SESSIONS, 4 (``session_slots.py`` enforces it per connection)."""
    return int(os.environ.get("INVOICE_MAILING_SMTP_SESSIONS") or DEFAULT_SMTP_SESSIONS)


def smtp_slot_wait() -> float:
    """How long a mailing instance waits for a free SMTP session slot before its deliveries stay pending
    for its next try: INVOICE_MAILING_SMTP_SLOT_WAIT_SECONDS, 60."""
    return float(os.environ.get("INVOICE_MAILING_SMTP_SLOT_WAIT_SECONDS", "60"))


def concurrency() -> int:
    """How many mapped instances of one night run at once: INVOICE_MAILING_CONCURRENCY, by default
    INVOICE_MAILING_SMTP_SESSIONS (4), so that by default no instance waits for a session slot. A
    setting, never the cores of whichever process parses the DAG: the dag-processor's host says
    nothing about the workers'."""
    return int(os.environ.get("INVOICE_MAILING_CONCURRENCY") or smtp_sessions())


def brake_timeout() -> timedelta:
    """How long a night held by the approval brake waits for an answer before it is rejected:
    INVOICE_MAILING_BRAKE_TIMEOUT in seconds, 4 hours by default (the approval's response_timeout)."""
    return timedelta(seconds=float(os.environ.get("INVOICE_MAILING_BRAKE_TIMEOUT", str(4 * 3600))))


def finish_by() -> str:
    """The cron expression of the hour by which a night must have finished: 06:00, or INVOICE_MAILING_FINISH_BY."""
    hour, _, minute = os.environ.get("INVOICE_MAILING_FINISH_BY", "06:00").partition(":")
    return f"{int(minute or 0)} {int(hour)} * * *"
