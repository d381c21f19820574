"""Faults for a real Airflow's task processes, put on their PYTHONPATH by a test (tests/e2e/test_red_night.py).

Python imports ``sitecustomize`` at start-up; the scheduler's LocalExecutor forks the task processes, which
inherit what this patches. ``INVOICE_MAILING_TEST_FAULTS`` (JSON) says which customers' instances fail how:
``{"render_error": ["10002"]}`` raises a bug's exception (not a RenderError) while rendering their documents;
``{"sigkill": ["10003"]}`` SIGKILLs the task process as it starts their batch, on every try. Without the
variable this changes nothing. Never on the product's path: only a test's environment names this folder.
"""

import json
import os

_FAULTS = json.loads(os.environ.get("INVOICE_MAILING_TEST_FAULTS") or "{}")

if _FAULTS:
    import signal

    from include.invoice_mailing import pipeline
    from include.invoice_mailing.render import Renderer

    _context = Renderer.document_context
    _mail_batch = pipeline.mail_batch

    def _document_context(self, document, customer, *args, **kwargs):
        if customer.customer_id in _FAULTS.get("render_error", ()):
            raise ZeroDivisionError("decimal division by zero")
        return _context(self, document, customer, *args, **kwargs)

    def _mail_batch_or_die(erp, ledger_db, ctx, batch, **kwargs):
        if set(batch["customers"]) & set(_FAULTS.get("sigkill", ())):
            os.kill(os.getpid(), signal.SIGKILL)
        return _mail_batch(erp, ledger_db, ctx, batch, **kwargs)

    Renderer.document_context = _document_context
    pipeline.mail_batch = _mail_batch_or_die
