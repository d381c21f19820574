"""One night's run in three steps, each called by one task: extract, mail a batch of customers, audit.

The entry point tasks.py calls; each step lives in its own module, in the order a night runs them:
``params`` (the operator's parameters), ``batching`` (extract), ``planning`` and ``sending`` (mail a
batch), ``night_audit`` (audit).
"""

from include.invoice_mailing.batching import BATCH_DOCUMENTS, MAX_BATCHES, MAX_INSTANCES, extract, group_batches
from include.invoice_mailing.night_audit import audit
from include.invoice_mailing.params import TIMEZONE, ParamError, RunContext, RunParams
from include.invoice_mailing.planning import plan_batch, planned_deliveries
from include.invoice_mailing.sending import BatchSettings, DeliveriesPending, NotSent, Verp, mail_batch

__all__ = [
    "BATCH_DOCUMENTS", "MAX_BATCHES", "MAX_INSTANCES", "TIMEZONE", "BatchSettings", "DeliveriesPending", "NotSent",
    "ParamError", "RunContext", "RunParams", "audit", "extract", "group_batches", "mail_batch", "plan_batch",
    "planned_deliveries", "Verp",
]
