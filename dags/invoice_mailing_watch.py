"""
### Invoice mailing: the morning watch

At 06:00 (Europe/Oslo; `INVOICE_MAILING_FINISH_BY` changes the hour) this DAG checks that no run of
`invoice_mailing` is still queued or running. If one is, it mails the operators (the `mailing_alerts`
connection) and fails. Airflow 3.3's deadline alerts would do this, but on 3.3.2 a DAG with a
`deadline` cannot be run with `dag.test()`, which the test suite relies on.
"""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, dag, task

from include.invoice_mailing import tasks


@dag(
    dag_id="invoice_mailing_watch",
    schedule=CronTriggerTimetable(tasks.finish_by(), timezone="Europe/Oslo"),
    catchup=False,
    tags=["finance", "accounts-receivable", "email"],
    doc_md=__doc__,
)
def invoice_mailing_watch():
    @task(retries=2)
    def check_night_finished(ti=None) -> None:
        tasks.check_night_finished(ti=ti)

    check_night_finished()


invoice_mailing_watch()
