"""One masker for every address a reader without edit access sees: audit pages, alert mails, task logs."""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime

import pytest

from include.invoice_mailing import alerts, ledger, masking, pipeline
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer
from tests.conftest import ROOT, smtp_connection
from tests.erp import TinyErp

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
REFUSED, DEFERRED = "ola@fjellheimen.example", "kari@bolgen.example"


@pytest.mark.parametrize(("address", "masked"), [
    ("kari@bolgen.example", "k***@bolgen.example"),
    ("j@example.com", "j***@example.com"),
    ("åse@bølgen.no", "å***@bølgen.no"),
    ("ola@intranet", "o***@intranet"),
    ("=2+5@bolgen.example", "=***@bolgen.example"),
    ("Invoicing", "Invoicing"),  # what a recipient row names when it has no address
    ("", ""),
    (None, None),
])
def test_mask_address_keeps_the_first_letter_and_the_domain(address, masked):
    assert masking.mask_address(address) == masked


@pytest.mark.parametrize(("answer", "masked"), [
    ("550 5.1.1 <ola@fjellheimen.example>: user unknown", "550 5.1.1 <o***@fjellheimen.example>: user unknown"),
    ("550 5.1.1 <åse@bølgen.no>: user unknown", "550 5.1.1 <å***@bølgen.no>: user unknown"),
    ("550 5.1.1 <ola@intranet>: no such user", "550 5.1.1 <o***@intranet>: no such user"),
    ("553 RCPT TO:<ORDRE@xn--sjmat-wua.no> refused", "553 RCPT TO:<O***@xn--sjmat-wua.no> refused"),
    ('550 <"ola nordmann"@[10.0.0.1]> unknown', '550 <"o***"@[10.0.0.1]> unknown'),
    ("to kari@bolgen.example, post@bolgen.example", "to k***@bolgen.example, p***@bolgen.example"),
    ("421 4.3.2 Service not available", "421 4.3.2 Service not available"),
    ("", ""),
    (None, None),
])
def test_every_address_in_a_servers_answer_is_masked(answer, masked):
    assert masking.mask_text(answer) == masked
    assert masking.mask_text(masked) == masked  # masking twice changes nothing


def test_one_function_masks_addresses_for_the_whole_project():
    sources = [*(ROOT / "include").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"), *(ROOT / "dags").rglob("*.py")]
    maskers = sorted(str(p.relative_to(ROOT)) for p in sources if "***@{" in p.read_text(encoding="utf-8"))
    assert maskers == ["include/invoice_mailing/masking.py"]
    assert alerts.mask is masking.mask_address


@pytest.fixture
def refused_and_deferred(backend, sink, monkeypatch):
    """One invoice to a recipient the relay refuses and one it defers, each answer quoting the address."""
    erp_engine, ledger_db = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port, timeout=1))
    erp = TinyErp(erp_engine)
    erp.customer("10001", invoice_email=DEFERRED, email=REFUSED)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("INV000101", "10001")
    sink.faults.mail_replies = [f"421 4.7.0 <{DEFERRED}> slow down"]
    sink.faults.rcpt_replies = {REFUSED: f"550 5.1.1 <{REFUSED}>: user unknown",
                                DEFERRED: f"451 4.7.1 <{DEFERRED}>: greylisted"}
    ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})
    [batch] = pipeline.extract(erp_engine, ledger_db, ctx)
    return erp_engine, ledger_db, ctx, batch


class Lines(logging.Handler):
    """The task log's lines as written (Airflow's own logging set-up may leave pytest's caplog empty)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_the_task_log_and_the_exception_name_what_was_not_sent_with_masked_addresses(refused_and_deferred):
    erp_engine, ledger_db, ctx, batch = refused_and_deferred
    handler, logger = Lines(), logging.getLogger("include.invoice_mailing")
    logger.addHandler(handler)
    try:
        with SmtpSender(backoff=0.0) as sender, pytest.raises(pipeline.DeliveriesPending) as pending:
            pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender)
    finally:
        logger.removeHandler(handler)

    log, raised = "\n".join(handler.lines), str(pending.value)
    assert "Not sent: customer 10001, INV INV000101, to o***@fjellheimen.example, PDF: failed recipient_rejected: " \
           "550 5.1.1 <o***@fjellheimen.example>: user unknown" in log
    assert "to k***@bolgen.example, PDF: pending deferred: 451 4.7.1 <k***@bolgen.example>: greylisted" in raised
    assert "421 4.7.0 <k***@bolgen.example> slow down; retrying" in log  # the SMTP session's own retry
    assert "ola@" not in log + raised and "kari@" not in log + raised
    kept = {r["recipient"]: r["last_error"] for r in ledger.all_deliveries(ledger_db)}
    assert kept[REFUSED] == f"550 5.1.1 <{REFUSED}>: user unknown"  # the ledger is the owner's: whole


def test_the_alert_masks_the_addresses_in_the_servers_answers(refused_and_deferred):
    erp_engine, ledger_db, ctx, batch = refused_and_deferred
    with SmtpSender(backoff=0.0) as sender, pytest.raises(pipeline.DeliveriesPending):
        pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender)

    summary = pipeline.audit(ledger_db, ctx.run_id)
    subject, body = alerts.red_night("invoice_mailing", ctx.run_id, summary["undelivered"], [batch],
                                     "http://localhost:8080/")

    text = html.unescape(body)
    assert "<o***@fjellheimen.example>: user unknown" in text and "<k***@bolgen.example>: greylisted" in text
    assert "ola@" not in text and "kari@" not in text
