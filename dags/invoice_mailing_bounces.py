"""
### Invoice mailing: bounces between nights

At half past every hour (Europe/Oslo) this DAG reads the bounce mailbox (the `mailing_bounces`
connection) and applies its reports to the ledger, as the night's `collect_bounces` does: a delivery
that bounced becomes `bounced` on the auditors' pages within the hour, not the next night. Applied
reports move to the `Processed` folder; auto-replies and people's answers stay unread.

Without the connection it does nothing. While a run of `invoice_mailing` is queued or running it
skips: the night reads the mailbox itself. A mailbox that cannot be read fails the run (no mail: the
night's own warning covers the night, and the next hour tries again).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import CronTriggerTimetable, dag, task

from include.invoice_mailing import dag_settings as settings


@dag(
    dag_id=settings.BOUNCES_DAG_ID,
    schedule=CronTriggerTimetable(settings.BOUNCES_CRON, timezone=settings.TIMEZONE, run_immediately=timedelta(0)),
    catchup=False,
    max_active_runs=1,  # one reader at a time: two runs would race for the same messages
    tags=["finance", "accounts-receivable", "email"],
    doc_md=__doc__,
)
def invoice_mailing_bounces():
    @task(execution_timeout=timedelta(minutes=30))
    def collect_bounces(run_id=None, ti=None) -> dict:
        from include.invoice_mailing import tasks

        return tasks.collect_bounces_between_nights(run_id=run_id, ti=ti)

    collect_bounces()


invoice_mailing_bounces()
