"""Write-back of invoice.emailed: the ledger says what was delivered, the ERP catches up (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from include.invoice_mailing import ledger, pipeline, source
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer
from tests.conftest import smtp_connection
from tests.erp import TinyErp

NIGHTS = [datetime(2026, 11, day, 1, 0, tzinfo=UTC) for day in (24, 25, 26)]
TO, CC = "kari@bolgen.example", "post@bolgen.example"


@pytest.fixture
def erp(backend, sink, monkeypatch) -> TinyErp:
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port, timeout=1))
    erp = TinyErp(backend["engines"][0])
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=TO, email=CC)
    erp.setting_id = erp.setting(class_id="DOMESTIC")
    erp.recipient(erp.setting_id, "Invoicing", "To")
    erp.invoice("INV000101", "10001")
    return erp


def night(backend, n: int, *, write_back: bool) -> list[dict]:
    """Night ``n``: extract, then every batch once (a batch left pending raises)."""
    erp_engine, ledger_db = backend["engines"]
    ctx = pipeline.RunContext.from_airflow(f"scheduled__{n}", NIGHTS[n], NIGHTS[n], {})
    batches = pipeline.extract(erp_engine, ledger_db, ctx, write_back=write_back)
    for batch in batches:
        with SmtpSender(backoff=0.0) as sender:
            pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender,
                                settings=pipeline.BatchSettings(write_back=write_back))
    return batches


def emailed(erp) -> bool:
    with erp.engine.connect() as conn:
        return conn.execute(select(source.invoice.c.emailed)).scalar_one()


@pytest.mark.parametrize("cause", ["switched on later", "the ERP refused it"])
def test_a_later_night_writes_back_a_document_the_ledger_shows_delivered(backend, erp, sink, monkeypatch, cause):
    if cause == "switched on later":
        night(backend, 0, write_back=False)
    else:
        def refuse(*_args, **_kwargs):
            raise OperationalError("UPDATE invoice", {}, Exception("permission denied for table invoice"))

        monkeypatch.setattr(source, "mark_emailed", refuse)
        with pytest.raises(OperationalError):  # the task fails; its retries fail alike
            night(backend, 0, write_back=True)
        monkeypatch.undo()
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port, timeout=1))
    assert len(sink.received) == 1 and emailed(erp) is False

    assert night(backend, 1, write_back=True) == []  # nothing to send: the document was delivered

    assert emailed(erp) is True and len(sink.received) == 1


def test_a_document_with_a_config_error_recipient_is_not_written_back_until_it_is_mended(backend, erp, sink):
    broken = erp.recipient(erp.setting_id, "Customer", "Bcx")  # not To, Cc or Bcc: a configuration error
    night(backend, 0, write_back=True)
    rows = {r["recipient"]: (r["status"], r["reason"]) for r in ledger.all_deliveries(backend["engines"][1])}
    assert rows[TO] == ("sent", None) and ("failed", "config_error") in rows.values()
    assert emailed(erp) is False  # the document is not settled: one of its recipients is still owed

    with erp.engine.begin() as conn:  # the clerk mends the recipient row
        conn.execute(update(source.mailing_recipient).where(source.mailing_recipient.c.recipient_id == broken)
                     .values(add_to="Cc"))
    night(backend, 1, write_back=True)

    assert [m.envelope_to for m in sink.received] == [[TO], [CC]]
    assert emailed(erp) is True
    # The refusal of the broken row is no longer the rules' decision: it no longer holds the document open.
    assert ("skipped", "no_longer_planned") in {
        (r["status"], r["reason"]) for r in ledger.all_deliveries(backend["engines"][1])}
