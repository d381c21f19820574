"""
### Invoice mailing

Every night at 02:00 (Europe/Oslo) this DAG mails the released customer invoices, credit notes and
debit notes that are due, to the recipients that each customer's INVOICE mailing setting names,
and records every delivery in the mailing ledger.

1. **open_night** (setup): checks the run's parameters and that the ledger (`mailing_ledger`) is reachable.
2. **collect_bounces**: reads the bounce mailbox (the `mailing_bounces` connection; none: nothing to do)
   and applies its reports to the ledger: a delivery that bounced becomes `bounced`, a delay is noted, each
   applied report moves to the `Processed` folder; auto-replies and answers stay unread. A mailbox that
   cannot be read does not stop the night: the log and a warning mail say the bounces were not read.
3. **extract**: due documents from the ERP (`erp_db`), less those the ledger shows as delivered, grouped
   into batches of customers (at most a few hundred mapped instances).
4. **approve_night**: the approval brake. A normal night passes at once. A night with more documents, or a
   larger total in a currency, than `INVOICE_MAILING_BRAKE_FACTOR` (3) times the median of the last 14
   nights (more than `INVOICE_MAILING_BRAKE_FIRST`, 500, documents with no history), and every live
   `resend` naming no documents or customers, waits in Browse → Required Actions with its numbers.
   Approve: it goes on. Reject, or no answer within `INVOICE_MAILING_BRAKE_TIMEOUT` (4 h): nothing is
   mailed, the ledger records the decision, the night ends red and the alert says why.
5. **mail_customers** (mapped, one instance per batch, labelled `customer 10042`): resolve recipients and
   formats, render each document once per format, send through the mailing's SMTP connection
   (`smtp_default` unless the email account names another), record each delivery. A delivery the server
   defers stays *pending* and the instance is retried; a refusal by the relay or a configuration error
   fails the instance at once (retrying would not help). Each SMTP connection's extra `max_sessions`
   caps the sessions its relay sees at once, across workers.
6. **audit** (teardown: runs whatever happened, and again whenever any instance is cleared): the night's
   counts by status and reason, and its status: `green`, `red` (a delivery still pending or failed, or no
   extract) or `rejected` (the brake). Green: published as an event of the asset
   `invoice_mailing://ledger/nights` (status and counts in `extra`). Otherwise it fails, so the night is
   **red**, after mailing the operators (the `mailing_alerts` connection) the deliveries not sent.
7. **publish_red** (teardown): publishes a night audit did not publish, with its status, so that data
   teams' DAGs see every night that opened; a mended night is published again, green, by audit.

Any other failed run (a wrong parameter, the ERP or the ledger unreachable, audit itself failing) is
mailed through the same connection by the DAG's failure callback, naming the task and why.

**Red night?** The alert and the failed instance's log name the customer, document, recipient and the
server's answer. Fix the cause, then clear the failed `mail_customers` instance (any clear works: one
instance or the run, with or without downstream): only what was not sent is sent, and the audit runs again.

A new installation mails nothing before the first 02:00 after it is unpaused. Parameters: `dry_run`,
`redirect_to`, `customers`, `documents`, `resend`, `lookback_days` (see README.md).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, task

# Only what a parse needs (tests/test_dag_integrity.py checks it): the pipeline is imported in the task bodies.
from include.invoice_mailing import dag_settings as settings
from include.invoice_mailing.alerts import NightFailed
from include.invoice_mailing.approval import NightApproval

NETWORK_RETRIES = {"retries": settings.retries(), "retry_delay": settings.retry_delay(),
                   "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=30)}


@dag(
    dag_id=settings.DAG_ID,
    # No start_date, and no grace after 02:00 (Airflow's default runs a night unpaused up to 2 h 24 min
    # late): the first run is the first 02:00 after the DAG is unpaused, whatever the hour, never a past night.
    schedule=CronTriggerTimetable(settings.NIGHT_CRON, timezone=settings.TIMEZONE, run_immediately=timedelta(0)),
    catchup=False,
    max_active_runs=1,
    tags=["finance", "accounts-receivable", "email"],
    doc_md=__doc__,
    # A failed run mails the operators through mailing_alerts, unless audit already did (include/invoice_mailing/alerts.py).
    on_failure_callback=NightFailed(),
    params={
        "dry_run": Param(False, type="boolean", description="Render everything, send nothing."),
        "redirect_to": Param(None, type=["null", "string"], description="Send every message to this test address."),
        "customers": Param([], type="array", items={"type": "string"}, description="Only these customer numbers."),
        "documents": Param([], type="array", items={"type": "string"}, description="Only these reference numbers."),
        "resend": Param(False, type="boolean", description="Send again documents already sent (recorded as resends)."),
        "lookback_days": Param(30, type="integer", minimum=0, description="Ignore documents released earlier."),
        "lift_bounces": Param([], type="array", items={"type": "string"},
                              description="Mail these addresses again although they hard-bounced."),
    },
)
def invoice_mailing():
    @task(**NETWORK_RETRIES)
    def open_night(params=None, run_id=None, logical_date=None, data_interval_end=None, ti=None) -> None:
        from include.invoice_mailing import tasks

        with tasks.failure_recorded(ti):
            tasks.open_night(run_id=run_id, logical_date=logical_date, data_interval_end=data_interval_end,
                             params=params)

    @task(execution_timeout=timedelta(minutes=30), **NETWORK_RETRIES)  # the pass stops itself after 10 minutes
    def collect_bounces(run_id=None, ti=None) -> dict:
        from include.invoice_mailing import tasks

        with tasks.failure_recorded(ti):
            return tasks.collect_bounces(run_id=run_id, night=True)

    @task(**NETWORK_RETRIES)
    def extract(params=None, run_id=None, logical_date=None, data_interval_end=None, ti=None) -> list[dict]:
        from include.invoice_mailing import tasks

        with tasks.failure_recorded(ti):
            return tasks.extract(run_id=run_id, logical_date=logical_date, data_interval_end=data_interval_end,
                                 params=params)

    @task(map_index_template="{{ task.op_kwargs['batch']['label'] }}",
          max_active_tis_per_dagrun=settings.concurrency(), **NETWORK_RETRIES)
    def mail_customers(batch: dict, params=None, run_id=None, logical_date=None, data_interval_end=None,
                       ti=None) -> dict:
        from include.invoice_mailing import tasks

        with tasks.failure_recorded(ti):
            return tasks.mail_batch(batch, run_id=run_id, logical_date=logical_date,
                                    data_interval_end=data_interval_end, params=params, map_index=ti.map_index,
                                    try_number=ti.try_number)

    @task(retries=2, retry_delay=min(settings.retry_delay(), timedelta(minutes=1)), outlets=[settings.NIGHTS])
    def audit(dag_run=None, ti=None, outlet_events=None) -> dict:
        from include.invoice_mailing import tasks

        with tasks.failure_recorded(ti):
            return tasks.audit(dag_id=dag_run.dag_id, run_id=dag_run.run_id,
                               batches=ti.xcom_pull(task_ids="extract"), outlet_events=outlet_events, ti=ti)

    @task(outlets=[settings.NIGHTS])
    def publish_red(run_id=None, ti=None, outlet_events=None) -> None:
        from include.invoice_mailing import tasks

        tasks.publish_red(run_id=run_id, ti=ti, outlet_events=outlet_events)

    # audit is the teardown of open_night: Airflow clears it with any cleared instance in between (so
    # the summary and the run's state follow every clear) but never re-runs extract, which could regroup.
    night = open_night()
    batches = extract()
    approved = NightApproval(task_id="approve_night", **NETWORK_RETRIES)
    mailed = mail_customers.expand(batch=batches)
    night >> collect_bounces() >> batches >> approved >> mailed
    # publish_red is a teardown that does not fail the run: audit stays the run's verdict (its only leaf).
    audited = audit().as_teardown(setups=night, on_failure_fail_dagrun=True)
    mailed >> audited >> publish_red().as_teardown(setups=night)


invoice_mailing()
