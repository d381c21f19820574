"""Exactly-once under SMTP faults: a real aiosmtpd server misbehaves on purpose; the ledger and the
mail that arrived must agree, with no (Message-ID, recipient) delivered twice and nothing missing.

Each "try" below is what one Airflow task try does (pipeline.mail_batch through the SMTP provider's
hook); a try that leaves deliveries pending raises, and the next try is Airflow's retry.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from include.invoice_mailing import ledger, pipeline, source
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer
from tests.conftest import smtp_connection
from tests.erp import TinyErp

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
TO, CC, BCC = "kari@bolgen.example", "post@bolgen.example", "regnskap@fjordlys.example"


@pytest.fixture
def night(backend, sink, monkeypatch):
    """One customer with To, Cc and Bcc recipients and one invoice; returns a function that runs task tries."""
    erp_engine, ledger_db = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port, timeout=1))
    erp = TinyErp(erp_engine)
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=TO, email=CC)
    bookkeeper = erp.contact(None, BCC, "Ingrid Regnskap", is_employee=True)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.recipient(setting, "Employee", "Bcc", contact_id=bookkeeper)
    erp.invoice("INV000101", "10001")
    renderer = Renderer()

    def tries(max_tries: int = 5) -> int:
        """Run the night's mapped task until it succeeds, as Airflow's retries would; return the tries used."""
        ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})
        for attempt in range(1, max_tries + 1):
            batches = pipeline.extract(erp_engine, ledger_db, ctx)
            try:
                for batch in batches:
                    with SmtpSender(backoff=0.0) as sender:
                        pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=renderer, sender=sender)
                return attempt
            except pipeline.DeliveriesPending:
                continue
        return max_tries + 1

    tries.ledger, tries.erp = ledger_db, erp
    return tries


def rows(ledger_db) -> dict[str, tuple]:
    return {r["recipient"]: (r["status"], r["reason"]) for r in ledger.all_deliveries(ledger_db)}


def arrivals(sink) -> Counter:
    """How often each (Message-ID, envelope recipient) arrived."""
    return Counter((m.message["Message-ID"], rcpt) for m in sink.received for rcpt in m.envelope_to)


def assert_each_recipient_got_it_once(sink, recipients=(TO, CC, BCC)):
    counts = arrivals(sink)
    assert sorted(rcpt for _, rcpt in counts) == sorted(recipients)
    assert set(counts.values()) == {1}, counts
    assert len({mid for mid, _ in counts}) == 1


def test_421_at_mail_for_the_first_attempts_is_retried_within_the_task(night, sink):
    sink.faults.mail_replies = ["421 4.3.2 Service not available", "421 4.3.2 Service not available"]

    assert night() == 1
    assert_each_recipient_got_it_once(sink)
    assert set(rows(night.ledger).values()) == {("sent", None)}


def test_451_at_end_of_data_beyond_the_in_task_retries_fails_the_try_and_the_next_try_sends(night, sink):
    sink.faults.data_replies = ["451 4.3.0 Try again later"] * 4

    assert night() == 2
    assert_each_recipient_got_it_once(sink)
    delivered = ledger.all_deliveries(night.ledger)
    assert {(r["status"], r["attempts"]) for r in delivered} == {("sent", 2)}
    assert all("451" in r["last_error"] for r in delivered)


def test_a_connection_dropped_mid_data_is_sent_again_by_the_next_try(night, sink):
    sink.faults.drop_in_data = 1

    assert night() == 2
    assert_each_recipient_got_it_once(sink)
    assert set(rows(night.ledger).values()) == {("sent", None)}


def test_550_for_one_recipient_fails_only_that_recipient(night, sink):
    sink.faults.rcpt_replies = {CC: "550 5.1.1 <post@bolgen.example>: Recipient address rejected"}

    assert night() == 1
    assert night() == 1  # and a later try does not knock on that door again
    assert_each_recipient_got_it_once(sink, (TO, BCC))
    assert rows(night.ledger) == {TO: ("sent", None), BCC: ("sent", None), CC: ("failed", "recipient_rejected")}
    rejected = next(r for r in ledger.all_deliveries(night.ledger) if r["recipient"] == CC)
    assert rejected["last_error"].startswith("550 5.1.1") and "Recipient address rejected" in rejected["last_error"]


def test_451_for_one_recipient_is_sent_to_that_recipient_alone_with_the_same_message_id(night, sink):
    sink.faults.rcpt_queue = {CC: ["451 4.2.0 Mailbox busy"]}

    assert night() == 1
    assert_each_recipient_got_it_once(sink)
    assert [sorted(m.envelope_to) for m in sink.received] == [sorted([TO, BCC]), [CC]]


def test_a_message_over_the_servers_size_limit_fails_too_large_before_anything_is_sent(backend, monkeypatch, tmp_path):
    from dev.smtp_sink import SmtpSink

    with SmtpSink(size_limit=2000) as small:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(small.port))
        erp_engine, ledger_db = backend["engines"]
        erp = TinyErp(erp_engine)
        erp.customer("10001", invoice_email=TO)
        erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
        erp.invoice("INV000101", "10001")
        ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})
        [batch] = pipeline.extract(erp_engine, ledger_db, ctx)
        with SmtpSender() as sender:
            pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender)
        assert small.received == [] and small.faults.data_seen == 0
    [row] = ledger.all_deliveries(ledger_db)
    assert (row["status"], row["reason"]) == ("failed", "too_large")
    assert "2000" in row["last_error"]


def test_a_server_slower_than_the_timeout_is_retried_and_sends_once(night, sink):
    sink.faults.mail_delays = [2.5, 2.5]  # the connection's timeout is 1 s

    assert night() == 1
    assert_each_recipient_got_it_once(sink)
    assert set(rows(night.ledger).values()) == {("sent", None)}


def test_the_ambiguous_window_resends_with_the_same_message_id(night, sink):
    """The one duplicate the design allows: the server kept the message but its 250 never arrived."""
    sink.faults.accept_then_drop = 1

    assert night() == 2
    counts = arrivals(sink)
    assert set(counts.values()) == {2} and len({mid for mid, _ in counts}) == 1
    assert set(rows(night.ledger).values()) == {("sent", None)}


def test_write_back_marks_only_sent_documents_emailed_and_is_idempotent(night, sink, backend):
    from sqlalchemy import select

    erp_engine, ledger_db = backend["engines"]
    night.erp.invoice("INV000102", "10001")
    sink.faults.data_replies = ["554 5.7.1 Message rejected as spam"]  # the first message (INV000101) only
    ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})
    for _ in range(2):  # the second pass is a rerun: nothing more to send or to write
        for batch in pipeline.extract(erp_engine, ledger_db, ctx):
            with SmtpSender(backoff=0.0) as sender:
                pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender,
                                    settings=pipeline.BatchSettings(write_back=True))
    with erp_engine.connect() as conn:
        emailed = dict(conn.execute(select(source.invoice.c.ref_nbr, source.invoice.c.emailed)).all())
    assert emailed == {"INV000101": False, "INV000102": True}
    assert [m.message["X-Invoice-Document"] for m in sink.received] == ["INV INV000102"]
    assert source.mark_emailed(erp_engine, [("INV", "INV000102")]) == 0
    assert {r["reason"] for r in ledger.all_deliveries(ledger_db, ledger.delivery.c.ref_nbr == "INV000101")} == {
        "message_rejected"}


def test_a_pending_delivery_the_erp_no_longer_names_is_skipped_not_sent(night, sink, backend):
    from include.invoice_mailing import source

    sink.faults.rcpt_queue = {CC: ["451 4.2.0 Mailbox busy"] * 3}  # deferred beyond the try's retries
    assert night(max_tries=1) == 2  # the one try failed: the Cc delivery stays pending
    with backend["engines"][0].begin() as conn:  # meanwhile the clerk removes the Cc row in the ERP
        conn.execute(source.mailing_recipient.delete().where(source.mailing_recipient.c.contact_type == "Customer"))

    assert night() == 1
    assert sorted(rcpt for m in sink.received for rcpt in m.envelope_to) == sorted([TO, BCC])
    assert rows(night.ledger)[CC] == ("skipped", "no_longer_planned")


def test_a_mailing_that_names_a_missing_smtp_connection_is_a_config_error(night, sink, backend):
    from include.invoice_mailing import source

    with backend["engines"][0].begin() as conn:
        conn.execute(source.email_account.update().values(smtp_conn_id="smtp_nowhere"))
    assert night() == 1
    assert sink.received == []
    assert set(rows(night.ledger).values()) == {("failed", "config_error")}
    assert "smtp_nowhere" in ledger.all_deliveries(night.ledger)[0]["last_error"]
