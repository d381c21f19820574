"""The bodies of the DAG's tasks: resolve Airflow connections and context, then call the pipeline."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from functools import lru_cache

from airflow.sdk import Asset
from sqlalchemy import Engine, create_engine

from include.invoice_mailing import alerts, ledger, pipeline
from include.invoice_mailing.archive import Archive
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer

ERP_CONN_ID = "erp_db"
LEDGER_CONN_ID = "mailing_ledger"
# Updated by every run's audit task with its counts in ``extra``: data teams schedule their DAGs on it.
NIGHTS = Asset(uri="invoice_mailing://ledger/nights", name="invoice_mailing_nights")

log = logging.getLogger(__name__)


def retry_delay() -> timedelta:
    """Airflow's first retry delay of a step (then doubled): 2 minutes, or INVOICE_MAILING_RETRY_DELAY_SECONDS."""
    return timedelta(seconds=float(os.environ.get("INVOICE_MAILING_RETRY_DELAY_SECONDS", "120")))


def retries() -> int:
    """How many times Airflow retries a step whose deliveries were deferred: 4, or INVOICE_MAILING_RETRIES."""
    return int(os.environ.get("INVOICE_MAILING_RETRIES", "4"))


def concurrency() -> int:
    """How many mapped instances of one night run at once: what the workers can run (one per core of
    this machine), or INVOICE_MAILING_CONCURRENCY. More only makes rendering processes fight for cores."""
    return int(os.environ.get("INVOICE_MAILING_CONCURRENCY") or os.cpu_count() or 1)


def write_back() -> bool:
    """Whether to set invoice.emailed in the ERP for delivered documents: INVOICE_MAILING_WRITE_BACK (off)."""
    return os.environ.get("INVOICE_MAILING_WRITE_BACK", "false").lower() in ("1", "true", "yes")


def finish_by() -> str:
    """The cron expression of the hour by which a night must have finished: 06:00, or INVOICE_MAILING_FINISH_BY."""
    hour, _, minute = os.environ.get("INVOICE_MAILING_FINISH_BY", "06:00").partition(":")
    return f"{int(minute or 0)} {int(hour)} * * *"


@lru_cache(maxsize=8)
def engine_for(conn_id: str) -> Engine:
    """A SQLAlchemy engine for an Airflow connection of type sqlite or postgres (one per process)."""
    from airflow.sdk import BaseHook

    uri = BaseHook.get_connection(conn_id).get_hook().get_uri()
    if uri.startswith("postgres://"):
        uri = "postgresql://" + uri.removeprefix("postgres://")
    return create_engine(uri, pool_pre_ping=True)


@lru_cache(maxsize=1)
def renderer() -> Renderer:
    # WeasyPrint logs every fetched and laid-out document ("Step 1 - Fetching...") and fontTools every
    # subsetting step at INFO: that drowned the task log's delivery lines. Their warnings stay.
    for name in ("weasyprint.progress", "fontTools"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return Renderer()


def keep_map_index_label_on_retry() -> None:
    """Keep a mapped instance's label (``customer 10042``) while it is up for retry.

    Airflow 3.3's task runner sends the retry state without the rendered map index it rendered at
    the start of the try, and the API server then stores NULL, so the one instance an operator must
    find shows a bare number until its next try starts. This adds the label to that message; it
    does nothing if the task runner has changed shape.
    """
    from airflow.sdk.execution_time import comms, task_runner

    original = getattr(task_runner, "_finalize_task_failure", None)
    if original is None or getattr(original, "keeps_label", False):
        return

    def finalize_keeping_label(ti, *args, **kwargs):
        msg, state = original(ti, *args, **kwargs)
        if isinstance(msg, comms.RetryTask) and msg.rendered_map_index is None and ti.rendered_map_index:
            msg.rendered_map_index = ti.rendered_map_index
        return msg, state

    finalize_keeping_label.keeps_label = True
    task_runner._finalize_task_failure = finalize_keeping_label


def _context(run_id: str, logical_date: datetime | None, data_interval_end: datetime | None,
             params: dict) -> pipeline.RunContext:
    return pipeline.RunContext.from_airflow(run_id, logical_date, data_interval_end, dict(params or {}))


def open_night(*, run_id, logical_date, data_interval_end, params) -> None:
    """The night's setup: refuse wrong parameters and an unreachable ledger before anything is read."""
    ctx = _context(run_id, logical_date, data_interval_end, params)
    ledger.ensure_schema(engine_for(LEDGER_CONN_ID))
    log.info("Night %s: mode %s, parameters %s", ctx.run_date, ctx.params.mode, ctx.params)


def extract(*, run_id, logical_date, data_interval_end, params) -> list[dict]:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    from airflow.sdk.configuration import conf

    max_batches = int(os.environ.get("INVOICE_MAILING_MAX_BATCHES", pipeline.MAX_BATCHES))
    batch_documents = int(os.environ.get("INVOICE_MAILING_BATCH_DOCUMENTS", pipeline.BATCH_DOCUMENTS))
    max_instances = min(int(os.environ.get("INVOICE_MAILING_MAX_INSTANCES", pipeline.MAX_INSTANCES)),
                        conf.getint("core", "max_map_length", fallback=1024))
    return pipeline.extract(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, max_batches,
                            batch_documents=batch_documents, max_instances=max_instances, workers=concurrency(),
                            write_back=write_back())


def mail_batch(batch: dict, *, run_id, logical_date, data_interval_end, params, map_index: int | None = None,
               try_number: int | None = None) -> dict:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    settings = pipeline.BatchSettings(
        write_back=write_back(),
        lease=timedelta(seconds=float(os.environ.get("INVOICE_MAILING_CLAIM_LEASE_SECONDS",
                                                     ledger.DEFAULT_LEASE.total_seconds()))),
        archive=Archive.from_env(),
    )
    keep_map_index_label_on_retry()
    if map_index is not None and try_number is not None:  # the audit links deliveries to this try
        ledger.record_task(engine_for(LEDGER_CONN_ID), run_id=run_id, map_index=map_index, try_number=try_number,
                           label=batch["label"], customers=batch["customers"])
    with SmtpSender() as sender:
        summary = pipeline.mail_batch(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, batch,
                                      renderer=renderer(), sender=sender, settings=settings)
    if summary["failed_deliveries"]:
        from airflow.sdk.exceptions import AirflowFailException

        # Retrying would not help: the relay refused, or the ERP or configuration is wrong.
        raise AirflowFailException(f"{len(summary['failed_deliveries'])} deliveries of {batch['label']} failed "
                                   "and need an operator: " + "; ".join(summary["failed_deliveries"]))
    return summary


def audit(*, dag_id, run_id, batches: list[dict] | None, outlet_events=None) -> dict:
    """Store the night's summary; a night with deliveries not sent (or no extract) alerts and fails."""
    from airflow.sdk.configuration import conf
    from airflow.sdk.exceptions import AirflowFailException

    summary = pipeline.audit(engine_for(LEDGER_CONN_ID), run_id)
    if outlet_events is not None:  # emitted when audit succeeds: a green night, or a red one once mended
        outlet_events[NIGHTS].extra = {"run_id": run_id, **summary}
    undelivered = summary["undelivered"]
    if batches is not None and not undelivered:
        return summary
    base_url = conf.get("api", "base_url", fallback="http://localhost:8080/")
    subject, body = alerts.red_night(dag_id, run_id, undelivered, batches, base_url)
    try:
        alerts.send(subject, body)
    except Exception:  # noqa: BLE001 - the night is red whether or not the alert could be mailed
        log.exception("The alert could not be sent: %s", subject)
    raise AirflowFailException(subject)


def check_night_finished(*, ti) -> None:
    """The watch at 06:00: a night still queued or running alerts the operators, and this check fails."""
    from airflow.sdk.exceptions import AirflowFailException

    unfinished = ti.get_dr_count(dag_id="invoice_mailing", states=["queued", "running"])
    if unfinished:
        alerts.night_late()
        raise AirflowFailException(f"{unfinished} run(s) of invoice_mailing have not finished by now")
    log.info("No run of invoice_mailing is still running")
