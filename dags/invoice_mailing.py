"""
### Invoice mailing

Every night at 02:00 (Europe/Oslo) this DAG mails the released customer invoices, credit notes and
debit notes that are due, to the recipients that each customer's INVOICE mailing setting names,
and records every delivery in the mailing ledger.

1. **extract**: due documents from the ERP (`erp_db`), less those the ledger (`mailing_ledger`) shows
   as delivered, grouped into batches of customers (at most a few hundred mapped instances).
2. **mail_customers** (mapped, one instance per batch, labelled with its customer numbers):
   resolve recipients and formats, render each document once per format, send through the mailing's
   SMTP connection (`smtp_default` unless the email account names another), record each delivery.
   A delivery the server defers stays *pending*; the task then fails and Airflow retries it.
3. **audit** (runs whatever happened upstream): the run's counts by status and reason, also published
   as an event of the asset `invoice_mailing://ledger/nights` (counts in `extra`).

Clearing any task, or the whole run, sends only what was not sent. Parameters: `dry_run`,
`redirect_to`, `customers`, `documents`, `resend`, `lookback_days` (see README.md).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, TriggerRule, dag, task

from include.invoice_mailing import tasks

NETWORK_RETRIES = {"retries": 4, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": 2.0,
                   "max_retry_delay": timedelta(minutes=30)}


@dag(
    dag_id="invoice_mailing",
    schedule=CronTriggerTimetable("0 2 * * *", timezone="Europe/Oslo"),
    start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Oslo"),
    catchup=False,
    max_active_runs=1,
    tags=["finance", "accounts-receivable", "email"],
    doc_md=__doc__,
    params={
        "dry_run": Param(False, type="boolean", description="Render everything, send nothing."),
        "redirect_to": Param(None, type=["null", "string"], description="Send every message to this test address."),
        "customers": Param([], type="array", items={"type": "string"}, description="Only these customer numbers."),
        "documents": Param([], type="array", items={"type": "string"}, description="Only these reference numbers."),
        "resend": Param(False, type="boolean", description="Send again documents already sent (recorded as resends)."),
        "lookback_days": Param(30, type="integer", minimum=0, description="Ignore documents released earlier."),
    },
)
def invoice_mailing():
    @task(**NETWORK_RETRIES)
    def extract(params=None, run_id=None, logical_date=None, data_interval_end=None) -> list[dict]:
        return tasks.extract(run_id=run_id, logical_date=logical_date, data_interval_end=data_interval_end,
                             params=params)

    @task(map_index_template="{{ task.op_kwargs['batch']['label'] }}", **NETWORK_RETRIES)
    def mail_customers(batch: dict, params=None, run_id=None, logical_date=None, data_interval_end=None,
                       ti=None) -> dict:
        return tasks.mail_batch(batch, run_id=run_id, logical_date=logical_date,
                                data_interval_end=data_interval_end, params=params, map_index=ti.map_index,
                                try_number=ti.try_number)

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=2, retry_delay=timedelta(minutes=1), outlets=[tasks.NIGHTS])
    def audit(run_id=None, outlet_events=None) -> dict:
        return tasks.audit(run_id=run_id, outlet_events=outlet_events)

    mailed = mail_customers.expand(batch=extract())
    mailed >> audit()


invoice_mailing()
