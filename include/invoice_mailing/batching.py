"""Step 1, extract: the night's due documents, less those delivered, cut into batches of customers."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from include.invoice_mailing import ledger, source
from include.invoice_mailing.brake import Volume
from include.invoice_mailing.clock import naive_utc
from include.invoice_mailing.params import RunContext

log = logging.getLogger(__name__)

# How a night is cut into mapped task instances (each costs about 1.4 s of start-up on a LocalExecutor, and
# 2-4 core-seconds in all with the scheduler, api-server and metadata's share: README, "A night of thousands"):
MAX_BATCHES = 200        # up to this many customers, one customer per instance (a small night)
BATCH_DOCUMENTS = 600    # beyond, instances of about this many documents: about a minute of work each
MAX_INSTANCES = 256      # and never more instances than this (nor Airflow's max_map_length)


def group_batches(documents: Iterable[source.DueDocument], max_batches: int = MAX_BATCHES, *,
                  batch_documents: int = BATCH_DOCUMENTS, max_instances: int = MAX_INSTANCES,
                  workers: int = 1) -> list[dict]:
    """Group due documents by customer, then customers into batches sized by work.

    A small night (at most ``max_batches`` customers) gets one customer per batch, the instance an
    operator finds and clears by its customer number. A larger night gets batches of consecutive
    customers carrying about ``batch_documents`` documents each, so that the work of an instance
    (tens of seconds) pays for its start-up; at least ``workers`` batches, so every worker has one;
    at most ``max_instances``. A customer is never split across batches.
    """
    by_customer: dict[str, list[list[str]]] = defaultdict(list)
    for d in documents:
        by_customer[d.customer_id].append([d.doc_type, d.ref_nbr, d.customer_id])  # the customer: for audit
    customers = sorted(by_customer)
    if not customers:
        return []
    if len(customers) <= max_batches:
        groups = [[c] for c in customers]
    else:
        total = sum(len(docs) for docs in by_customer.values())
        wanted = max(math.ceil(total / max(1, batch_documents)), workers)
        groups = _balanced(customers, by_customer, min(wanted, max_instances, len(customers)))
    return [{"label": f"customer {g[0]}" if len(g) == 1 else f"customers {g[0]}..{g[-1]} ({len(g)})",
             "customers": g, "documents": [doc for c in g for doc in by_customer[c]]} for g in groups]


def _balanced(customers: list[str], by_customer: dict[str, list], count: int) -> list[list[str]]:
    """Cut the sorted customers into ``count`` runs of about equal numbers of documents."""
    total = sum(len(by_customer[c]) for c in customers)
    groups: list[list[str]] = [[]]
    done = 0
    for i, customer in enumerate(customers):
        left_customers, left_groups = len(customers) - i, count - len(groups)
        if groups[-1] and (done >= total * len(groups) / count or left_customers <= left_groups):
            groups.append([])
        groups[-1].append(customer)
        done += len(by_customer[customer])
    return groups


def extract(erp: Engine, ledger_db: Engine, ctx: RunContext, max_batches: int = MAX_BATCHES, *,
            batch_documents: int = BATCH_DOCUMENTS, max_instances: int = MAX_INSTANCES, workers: int = 1,
            write_back: bool = False) -> list[dict]:
    """Due documents, less those the ledger shows as delivered, grouped into batches of customers.

    The ERP's rows are streamed in chunks and only their keys are kept: the mapped instances get
    customer numbers and document keys, and load the rest themselves. With ``write_back``, a live
    run marks as emailed the documents the ledger shows delivered but the ERP does not (the write-back
    after their send failed, or was switched on since).
    """
    ledger.ensure_schema(ledger_db)
    ledger.start_run(ledger_db, ctx.run_id, ctx.released_before, ctx.params.mode, asdict(ctx.params))
    chunks = source.due_documents(
        erp,
        released_before=naive_utc(ctx.released_before),
        released_since=naive_utc(ctx.released_since),
        customers=ctx.params.customers,
        documents=ctx.params.documents,
        include_emailed=ctx.params.resend,
    )
    due: list[source.DueDocument] = []
    delivered: set[tuple[str, str]] = set()
    for chunk in chunks:
        if not ctx.params.resend:  # a dry or redirected run previews tonight's live run: delivered is done
            settled = ledger.settled_documents(ledger_db, [(d.doc_type, d.ref_nbr) for d in chunk])
            delivered |= settled
            chunk = [d for d in chunk if (d.doc_type, d.ref_nbr) not in settled]
        due += chunk
    log.info("%d documents due, %d of them delivered before", len(due) + len(delivered), len(delivered))
    if write_back and ctx.params.mode == "live" and delivered:
        _write_back_delivered(erp, delivered)
    # Deliveries left open (pending, or claimed by an attempt that died) are decided tonight even if
    # their document is no longer due: the batch retires them with a reason instead of leaving them open.
    listed = {(d.doc_type, d.ref_nbr) for d in due}
    owed = [source.DueDocument(*key) for key in ledger.open_documents(
        ledger_db, ctx.params.mode, customers=ctx.params.customers, documents=ctx.params.documents)
        if key[:2] not in listed]
    if owed:
        log.info("%d documents no longer due in the ERP have deliveries still open: they are decided tonight",
                 len(owed))
        due += owed
    ledger.record_volume(ledger_db, ctx.run_id, Volume.of(due).as_json())  # for the approval brake
    batches = group_batches(due, max_batches, batch_documents=batch_documents, max_instances=max_instances,
                            workers=workers)
    log.info("%d documents of %d customers in %d batches", len(due),
             sum(len(b["customers"]) for b in batches), len(batches))
    return batches


def _write_back_delivered(erp: Engine, documents: set[tuple[str, str]]) -> None:
    """Mark as emailed documents delivered before whose flag the ERP still lacks. The night goes on if
    the ERP refuses: its invoices go out, and the next night tries the write-back again."""
    try:
        log.info("Marked %d documents delivered before as emailed in the ERP", source.mark_emailed(erp, documents))
    except SQLAlchemyError as exc:
        log.warning("Could not mark %d documents delivered before as emailed in the ERP (the next night tries "
                    "again): %s", len(documents), exc)
