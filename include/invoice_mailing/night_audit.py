"""Step 3, audit: the night's counts, and every delivery an operator must act on."""

from __future__ import annotations

import logging
from dataclasses import asdict

from sqlalchemy import Engine, select

from include.invoice_mailing import ledger
from include.invoice_mailing.clock import local
from include.invoice_mailing.ledger import FAILED, PENDING
from include.invoice_mailing.sending import NotSent

log = logging.getLogger(__name__)


def audit(ledger_db: Engine, run_id: str) -> dict:
    """The run's counts by status and reason, and every delivery an operator must act on.

    A delivery still pending (deferred by the relay) or failed (refused by the relay, a configuration
    error) makes the night red; rule refusals (``skipped``: inactive customer, no address...) do not.
    """
    ledger.ensure_schema(ledger_db)
    summary = ledger.summarize_run(ledger_db, run_id)
    lines = [f"{'status':<9} {'reason':<22} {'deliveries':>10} {'documents':>9}"]
    lines += [f"{r['status']:<9} {r['reason']:<22} {r['deliveries']:>10} {r['documents']:>9}" for r in summary["rows"]]
    log.info("Run %s:\n%s", run_id, "\n".join(lines))
    with ledger_db.connect() as conn:
        started = conn.execute(select(ledger.mailing_run.c.started_at)
                               .where(ledger.mailing_run.c.run_id == run_id)).scalar()
    if started is not None:  # Airflow restarts a run's clock at every clear; the ledger keeps the night's start
        started = local(started)
        summary["night_started_at"] = started.isoformat()
        log.info("The night started at %s (Europe/Oslo); Airflow's run duration counts from its last clear",
                 started.strftime("%Y-%m-%d %H:%M:%S"))
    rows = ledger.all_deliveries(ledger_db, ledger.delivery.c.last_run_id == run_id,
                                 ledger.delivery.c.status.in_((PENDING, ledger.SENDING, FAILED)))
    summary["undelivered"] = [asdict(NotSent.of(r, r["status"], r["reason"] or "deferred", r["last_error"] or r["detail"]))
                              for r in rows]
    duplicates = ledger.lost_claims(ledger_db, run_id)
    if duplicates:
        summary["possible_duplicates"] = len(duplicates)
        log.warning("%d messages of this run may have arrived twice: an attempt outlived its claim's lease "
                    "(see the ledger's lost_claim)", len(duplicates))
    return summary
