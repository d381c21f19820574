"""Step 3, audit: the night's counts, and every delivery an operator must act on."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from sqlalchemy import Engine, select

from include.invoice_mailing import ledger
from include.invoice_mailing.clock import local
from include.invoice_mailing.ledger import FAILED, PENDING
from include.invoice_mailing.masking import mask_text
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


TASK_FAILED = "task_failed"  # a document whose batch's instance ended without deciding it


@dataclass(frozen=True)
class UnfinishedInstance:
    """A mapped instance of the night that did not succeed: its batch, Airflow's state and why, in one line."""
    map_index: int
    label: str
    customers: list[str]
    state: str
    error: str

    def __str__(self) -> str:
        return f"{self.label}: {self.error}"


def unfinished_instances(batches: list[dict], states: dict[int, str | None],
                         errors: dict[int, str]) -> list[UnfinishedInstance]:
    """The batches whose instance did not succeed, from Airflow's states (map index -> state) and the
    errors the instances recorded (``tasks.failure_recorded``); one line each, never a traceback."""
    unfinished = []
    for index, batch in enumerate(batches):
        state = states.get(index)
        if state == "success":
            continue
        error = first_line(errors.get(index, "")) or _without_error(state)
        unfinished.append(UnfinishedInstance(index, batch["label"], list(batch["customers"]), str(state), error))
    return unfinished


def _without_error(state: str | None) -> str:
    if state == "failed":
        return ("failed without recording why: the task process was killed (out of memory, SIGKILL) or timed out; "
                "see the instance's log")
    if state == "upstream_failed":
        return "did not run: a task before it failed"
    return f"did not run ({state or 'no task instance'})"


def first_line(text: str) -> str:
    """The first line of an error, whole (a database error's SQL starts on its second line)."""
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def undecided_documents(ledger_db: Engine, run_id: str, unfinished: list[UnfinishedInstance],
                        batches: list[dict]) -> list[dict]:
    """The documents of the unfinished batches that this run wrote no delivery for, as the alert's lines:
    they were not mailed, and no ledger row says so."""
    wanted = {tuple(d[:2]): (d[2] if len(d) > 2 else batches[u.map_index]["customers"][0], u)
              for u in unfinished for d in batches[u.map_index]["documents"]}
    if not wanted:
        return []
    with ledger_db.connect() as conn:
        decided = set(conn.execute(select(ledger.delivery.c.doc_type, ledger.delivery.c.ref_nbr).distinct()
                                   .where(ledger.delivery.c.last_run_id == run_id)).all())
    return [asdict(NotSent(customer=customer, document=f"{doc_type} {ref_nbr}", recipient="", format="",
                           status=FAILED, reason=TASK_FAILED, answer=mask_text(instance.error)))
            for (doc_type, ref_nbr), (customer, instance) in sorted(wanted.items()) if (doc_type, ref_nbr) not in decided]
