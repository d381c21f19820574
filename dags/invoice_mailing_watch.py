"""
### Invoice mailing: the morning watch

At 06:00 (Europe/Oslo; `INVOICE_MAILING_FINISH_BY` changes the hour) this DAG asks Airflow for
tonight's run of `invoice_mailing` (the 02:00 one). Missing, failed, still queued or running, or the
DAG paused: it mails the operators (the `mailing_alerts` connection) and fails. Airflow 3.3's deadline
alerts would cover only the late run, and on 3.3.2 a DAG with a `deadline` cannot be run with
`dag.test()`, which the test suite relies on.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import CronTriggerTimetable, dag, task

from include.invoice_mailing import dag_settings as settings


@dag(
    dag_id=settings.WATCH_DAG_ID,
    # Unpaused after 06:00, it waits for the next morning: no alert about a night that was never scheduled.
    schedule=CronTriggerTimetable(settings.finish_by(), timezone=settings.TIMEZONE, run_immediately=timedelta(0)),
    catchup=False,
    tags=["finance", "accounts-receivable", "email"],
    doc_md=__doc__,
)
def invoice_mailing_watch():
    @task(retries=2)
    def check_night(ti=None, logical_date=None) -> None:
        from include.invoice_mailing import tasks

        tasks.check_night(ti=ti, logical_date=logical_date)

    check_night()


invoice_mailing_watch()
