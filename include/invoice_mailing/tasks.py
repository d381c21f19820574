"""The bodies of the DAG's tasks: resolve Airflow connections and context, then call the pipeline."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import Engine, create_engine

from include.invoice_mailing import pipeline
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer

ERP_CONN_ID = "erp_db"
LEDGER_CONN_ID = "mailing_ledger"


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


def mail_batch(batch: dict, *, run_id, logical_date, data_interval_end, params) -> dict:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    settings = pipeline.BatchSettings(
        write_back=os.environ.get("INVOICE_MAILING_WRITE_BACK", "false").lower() in ("1", "true", "yes"),
        lease=timedelta(seconds=float(os.environ.get("INVOICE_MAILING_CLAIM_LEASE_SECONDS",
                                                     pipeline.ledger.DEFAULT_LEASE.total_seconds()))),
    )
    with SmtpSender() as sender:
        return pipeline.mail_batch(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, batch,
                                   renderer=renderer(), sender=sender, settings=settings)


def audit(*, run_id) -> dict:
    return pipeline.audit(engine_for(LEDGER_CONN_ID), run_id)
