"""The bodies of the DAG's tasks: resolve Airflow connections and context, then call the pipeline."""

from __future__ import annotations

import os
from datetime import datetime
from functools import lru_cache

from airflow.sdk import Asset
from sqlalchemy import Engine, create_engine

from include.invoice_mailing import ledger, pipeline
from include.invoice_mailing.archive import Archive
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer

ERP_CONN_ID = "erp_db"
LEDGER_CONN_ID = "mailing_ledger"
# Updated by every run's audit task with its counts in ``extra``: data teams schedule their DAGs on it.
NIGHTS = Asset(uri="invoice_mailing://ledger/nights", name="invoice_mailing_nights")


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
    return Renderer()


def _context(run_id: str, logical_date: datetime | None, data_interval_end: datetime | None,
             params: dict) -> pipeline.RunContext:
    return pipeline.RunContext.from_airflow(run_id, logical_date, data_interval_end, dict(params or {}))


def extract(*, run_id, logical_date, data_interval_end, params) -> list[dict]:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    max_batches = int(os.environ.get("INVOICE_MAILING_MAX_BATCHES", pipeline.MAX_BATCHES))
    return pipeline.extract(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, max_batches)


def mail_batch(batch: dict, *, run_id, logical_date, data_interval_end, params, map_index: int | None = None,
               try_number: int | None = None) -> dict:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    settings = pipeline.BatchSettings(
        write_back=os.environ.get("INVOICE_MAILING_WRITE_BACK", "false").lower() in ("1", "true", "yes"),
        archive=Archive.from_env(),
    )
    if map_index is not None and try_number is not None:  # the audit links deliveries to this try
        ledger.ensure_schema(engine_for(LEDGER_CONN_ID))
        ledger.record_task(engine_for(LEDGER_CONN_ID), run_id=run_id, map_index=map_index, try_number=try_number,
                           label=batch["label"], customers=batch["customers"])
    with SmtpSender() as sender:
        return pipeline.mail_batch(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, batch,
                                   renderer=renderer(), sender=sender, settings=settings)


def audit(*, run_id, outlet_events=None) -> dict:
    summary = pipeline.audit(engine_for(LEDGER_CONN_ID), run_id)
    if outlet_events is not None:
        outlet_events[NIGHTS].extra = {"run_id": run_id, **summary}
    return summary
