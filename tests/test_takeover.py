"""The ledger's promises when the ERP changes under an open delivery (SQLite and PostgreSQL).

A delivery claimed by an attempt that died (``sending``, its claim stale) is re-decided by the next
attempt exactly as a pending one is: a recipient the ERP no longer names, or a document no longer
due, is retired with a reason and never sent; and a message's To/Cc name only its recipients.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from include.invoice_mailing import ledger, pipeline, planning, source
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.masking import mask_address
from include.invoice_mailing.render import Renderer
from tests.conftest import smtp_connection
from tests.erp import TinyErp

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
TO, CC = "kari@bolgen.example", "post@bolgen.example"


class Night:
    """One night's tries of the send step against this test's ERP, ledger and SMTP server."""

    def __init__(self, erp_engine, ledger_db):
        self.erp, self.ledger_db, self.renderer = erp_engine, ledger_db, Renderer()
        self.ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})

    def extract(self) -> list[dict]:
        return pipeline.extract(self.erp, self.ledger_db, self.ctx)

    def mail(self, batches=None) -> list[dict]:
        """One try of every batch; a batch left pending says so instead of raising."""
        out = []
        for batch in self.extract() if batches is None else batches:
            with SmtpSender(backoff=0.0) as sender:
                try:
                    out.append(pipeline.mail_batch(self.erp, self.ledger_db, self.ctx, batch,
                                                   renderer=self.renderer, sender=sender))
                except pipeline.DeliveriesPending as exc:
                    out.append({"pending": str(exc)})
        return out

    def rows(self) -> dict[str, tuple]:
        return {r["recipient"]: (r["status"], r["reason"]) for r in ledger.all_deliveries(self.ledger_db)}

    def remove_cc(self) -> None:
        with self.erp.begin() as conn:
            conn.execute(source.mailing_recipient.delete().where(source.mailing_recipient.c.contact_type == "Customer"))

    def die_while_sending(self) -> None:
        """Every delivery claimed by an attempt whose process has gone (SIGKILLed after its claim)."""
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead = f"{ledger.claimant().split(':')[0]}:{gone.stdout.strip()}:deadbeef"
        ids = [r["id"] for r in ledger.all_deliveries(self.ledger_db)]
        assert ledger.claim(self.ledger_db, ids, dead, run_id="run-1") == (sorted(ids), [])


@pytest.fixture
def night(backend, sink, monkeypatch) -> Night:
    """One customer with a To and a Cc recipient and one invoice."""
    erp_engine, ledger_db = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port, timeout=1))
    erp = TinyErp(erp_engine)
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=TO, email=CC)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("INV000101", "10001")
    return Night(erp_engine, ledger_db)


def plan_only(night) -> list[dict]:
    """The extract and the plan of the night's batch, as a try that died right after claiming left them."""
    batches = night.extract()
    for batch in batches:
        data = source.load_batch(night.erp, [tuple(d[:2]) for d in batch["documents"]])
        plans = planning.plan_batch(data, night.renderer)
        ledger.record_plan(night.ledger_db, [r for p in plans for r in planning.planned_deliveries(p)],
                           run_id="run-1", mode="live", resend=False)
    return batches


def test_a_stale_claim_on_a_recipient_the_erp_removed_is_retired_not_sent(night, sink):
    batches = plan_only(night)
    night.die_while_sending()
    night.remove_cc()

    night.mail(batches)  # the task's retry takes the stale claims over

    assert [m.envelope_to for m in sink.received] == [[TO]]
    assert CC not in (sink.received[0].message["Cc"] or "")
    assert night.rows() == {TO: ("sent", None), CC: ("skipped", "no_longer_planned")}
    [retired] = ledger.all_deliveries(night.ledger_db, ledger.delivery.c.recipient == CC)
    assert "may have arrived" in retired["detail"] and retired["last_run_id"] == "run-1"


def test_a_stale_claim_on_a_voided_document_is_retired_and_the_rerun_turns_green(night, sink):
    plan_only(night)
    night.die_while_sending()
    with night.erp.begin() as conn:
        conn.execute(update(source.invoice).values(status="Voided"))
    assert pipeline.audit(night.ledger_db, "run-1")["undelivered"]  # the night is red

    night.mail()  # the operator clears the whole run: extract, then the batches

    assert sink.received == []
    assert night.rows() == {TO: ("skipped", "no_longer_due"), CC: ("skipped", "no_longer_due")}
    assert pipeline.audit(night.ledger_db, "run-1")["undelivered"] == []


def test_a_claim_held_by_a_live_attempt_is_left_to_it_even_when_its_recipient_was_removed(night, sink):
    batches = plan_only(night)
    ids = [r["id"] for r in ledger.all_deliveries(night.ledger_db)]
    ledger.claim(night.ledger_db, ids, ledger.claimant(), run_id="run-1")  # this process: alive
    night.remove_cc()

    [outcome] = night.mail(batches)

    assert "held by another running attempt" in outcome["pending"] and sink.received == []
    assert set(night.rows().values()) == {("sending", None)}


def test_to_and_cc_name_only_the_recipients_of_the_message(night, sink):
    sink.faults.data_replies = ["451 4.3.0 Try again later"] * 3  # the try's three attempts: all pending
    batches = night.extract()
    assert "deferred" in night.mail(batches)[0]["pending"]
    night.remove_cc()
    sink.faults.data_replies = ["451 4.3.0 Try again later"] * 3  # the Cc is retired, the rest deferred again
    assert "deferred" in night.mail(batches)[0]["pending"]
    assert night.rows()[CC] == ("skipped", "no_longer_planned")

    night.mail(batches)

    [mail] = sink.received
    assert mail.envelope_to == [TO]
    assert CC not in (mail.message["Cc"] or "") and TO in mail.message["To"]


def test_a_claim_lost_during_the_send_is_told_as_a_possible_duplicate(night, sink, monkeypatch, caplog, capsys):
    batches = night.extract()
    heir = "worker-7.example:4242:cafe"
    send = SmtpSender.send

    def outlive_the_lease(self, conn_id, msg, sender, recipients):
        result = send(self, conn_id, msg, sender, recipients)  # the server takes the message...
        ids = [r["id"] for r in ledger.all_deliveries(night.ledger_db)]
        # ...while another attempt, finding this one's lease expired, takes the deliveries over.
        assert ledger.claim(night.ledger_db, ids, heir, run_id="run-1", lease=timedelta(0))[0] == ids
        return result

    monkeypatch.setattr(SmtpSender, "send", outlive_the_lease)
    [summary] = night.mail(batches)

    assert len(sink.received) == 1 and summary.get("sent", 0) == 0 and summary["possible_duplicates"] == 2
    logged = caplog.text + capsys.readouterr().out  # Airflow's logging may write the task log to stdout
    duplicates = [line for line in logged.splitlines() if "Possible duplicate" in line]
    for address in (TO, CC):  # masked: viewers read task logs
        assert any(mask_address(address) in line and heir in line and "may get it twice" in line
                   for line in duplicates), logged
    assert TO not in logged and CC not in logged
    noted = ledger.lost_claims(night.ledger_db, "run-1")
    assert {(n["held_by"], n["status"]) for n in noted} == {(heir, "sending")}
    assert all(n["message_sha256"] and n["claimed_by"] != heir for n in noted)
    assert set(night.rows().values()) == {("sending", None)}  # the heir's to finish
    assert pipeline.audit(night.ledger_db, "run-1")["possible_duplicates"] == 2
