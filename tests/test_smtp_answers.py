"""SMTP answers classified by their enhanced status code (RFC 3463) before the command that got them.

Through the pipeline, on SQLite and PostgreSQL, against a real aiosmtpd server whose answers are
shaped on purpose: what a relay says about the account (a sender or a relaying it refuses, a login
it cannot take, TLS it does not offer) is re-decided and sent once the relay is fixed; what it says
about a recipient or the message is final.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import insert, update
from sqlalchemy.exc import DBAPIError

from dev.smtp_sink import Faults, SmtpSink
from include.invoice_mailing import ledger
from include.invoice_mailing.deliver import refusal_reason
from tests.conftest import smtp_connection
from tests.test_quirks import NIGHT, Night, customer_with_template, kari_and_post

KARI, POST = ("INV000101", "kari@bolgen.example"), ("INV000101", "post@bolgen.example")
ACCOUNT = "email account 1 <faktura@fjordlys.example>, SMTP connection 'smtp_default'"


@pytest.fixture
def night(backend, sink, monkeypatch) -> Night:
    return Night(backend, sink, monkeypatch)


@pytest.mark.parametrize("command, answer, reason", [
    ("rcpt", "554 5.7.1 <a@b.example>: Relay access denied", "sender_rejected"),
    ("rcpt", "553 5.7.1 <faktura@fjordlys.example>: Sender address rejected: not owned by user", "sender_rejected"),
    ("rcpt", "530 5.7.0 Authentication required", "auth_failed"),
    ("rcpt", "550 5.1.1 <a@b.example>: Recipient address rejected: User unknown", "recipient_rejected"),
    ("rcpt", "552 5.2.2 Mailbox full", "recipient_rejected"),
    ("rcpt", "550 No such user here", "recipient_rejected"),
    ("rcpt", "451 4.7.1 Try again later", None),
    ("mail", "552 5.3.4 Message size exceeds fixed limit", "too_large"),
    ("mail", "552 Message size exceeds maximum permitted", "too_large"),
    ("mail", "550 5.1.8 Sender domain does not exist", "sender_rejected"),
    ("mail", "535 5.7.8 Authentication credentials invalid", "auth_failed"),
    ("data", "554 5.7.1 Message rejected as spam", "message_rejected"),
    ("data", "552 5.3.4 Message too big", "too_large"),
    ("data", "530 5.7.0 Authentication required", "auth_failed"),
])
def test_the_classification_table(command, answer, reason):
    code, _, text = answer.partition(" ")
    assert refusal_reason(command, int(code), text.encode()) == reason


# --- The account's refusals, reported at RCPT ---------------------------------------------------

def test_postfix_refusing_the_sender_at_rcpt_fails_the_account_and_a_clear_sends_after_the_fix(night):
    refusal = "553 5.7.1 <faktura@fjordlys.example>: Sender address rejected: not owned by user faktura"
    night.sink.faults.rcpt_replies = {"kari@bolgen.example": refusal, "post@bolgen.example": refusal}
    kari_and_post(night)

    assert night.run() == 1  # nothing to retry: the account must be fixed

    assert night.status() == {KARI: ("failed", "sender_rejected"), POST: ("failed", "sender_rejected")}
    for row in night.rows():
        assert refusal in row["detail"] and ACCOUNT in row["detail"]
    assert night.sink.received == []

    night.sink.faults.rcpt_replies = {}  # the postmaster lets faktura@ send; the operator clears the run
    night.run()
    assert night.arrived() == {KARI: 1, POST: 1}
    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}


def test_relay_access_denied_at_rcpt_keeps_the_document_due_until_the_relay_lets_it_through(night):
    refusal = "554 5.7.1 <post@bolgen.example>: Relay access denied"
    night.sink.faults.rcpt_replies = {"post@bolgen.example": refusal}  # Postfix relays only for some domains
    kari_and_post(night)

    night.run()

    assert night.arrived() == {KARI: 1}
    assert night.status() == {KARI: ("sent", None), POST: ("failed", "sender_rejected")}
    [post] = night.rows(recipient="post@bolgen.example")
    assert refusal in post["detail"] and ACCOUNT in post["detail"]

    night.sink.faults.rcpt_replies = {}
    night.run("scheduled__2026-11-25")  # the next night: the document is still due for the Cc only
    assert night.arrived() == {KARI: 1, POST: 1}
    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}


@pytest.mark.parametrize("answer", ["550 5.1.1 <post@bolgen.example>: Recipient address rejected: User unknown",
                                    "550 No such user here"])
def test_a_recipient_the_server_does_not_know_stays_refused_for_good(night, answer):
    night.sink.faults.rcpt_replies = {"post@bolgen.example": answer}
    kari_and_post(night)

    night.run()
    night.sink.faults.rcpt_replies = {}
    night.run()  # a clear, then the next night: the server's verdict on the recipient stands
    night.run("scheduled__2026-11-25")

    assert night.arrived() == {KARI: 1}
    assert night.status() == {KARI: ("sent", None), POST: ("failed", "recipient_rejected")}
    assert night.rows(recipient="post@bolgen.example")[0]["last_error"] == answer


# --- MAIL FROM, AUTH and TLS --------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["552 5.3.4 Message size exceeds fixed limit",
                                    "552 Message size exceeds maximum permitted"])
def test_a_552_to_mail_from_size_is_too_large_and_final(night, answer):
    night.sink.faults.mail_replies = [answer]
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")

    assert night.run() == 1
    night.run("scheduled__2026-11-25")

    [row] = night.rows()
    assert (row["status"], row["reason"], row["last_error"]) == ("failed", "too_large", answer)
    assert night.sink.received == []


def test_a_relay_with_no_auth_mechanism_in_common_is_auth_failed_not_retried_for_ever(night):
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")
    with SmtpSink(logins={"faktura": "s3cret"}, faults=Faults(ehlo_replace={"AUTH": "AUTH GSSAPI NTLM"})) as relay:
        night.sink = relay
        night.relay(relay.port, login="faktura", password="s3cret")

        assert night.run() == 1  # not a 'try later': the task does not fail for Airflow to retry

        [row] = night.rows()
        assert (row["status"], row["reason"]) == ("failed", "auth_failed")
        assert "No suitable authentication method" in row["detail"] and ACCOUNT in row["detail"]

        relay.faults.ehlo_replace = {}  # the relay offers PLAIN and LOGIN again
        night.run("scheduled__2026-11-25")
        assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}
        assert night.status() == {("INV000101", "a@bolgen.example"): ("sent", None)}


def test_a_relay_without_starttls_when_tls_is_required_is_tls_unavailable_and_re_decided(night, monkeypatch):
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")
    required = smtp_connection(night.sink.port, timeout=2, disable_tls=False)  # STARTTLS, as by default
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", required)

    assert night.run() == 1

    [row] = night.rows()
    assert (row["status"], row["reason"]) == ("failed", "tls_unavailable")
    assert "does not offer STARTTLS" in row["detail"] and ACCOUNT in row["detail"]
    assert "login" not in row["detail"]
    assert night.sink.received == []

    night.relay(night.sink.port)  # the operator sets disable_tls for this relay (or the relay gets TLS)
    night.run("scheduled__2026-11-25")
    assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_the_session_is_encrypted_as_the_connection_says_and_then_logs_in(night, monkeypatch, tls):
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")
    with SmtpSink(logins={"faktura": "s3cret"}, tls=tls) as relay:
        night.sink = relay
        connection = json.loads(smtp_connection(relay.port, timeout=2, disable_ssl=tls != "ssl",
                                                disable_tls=tls != "starttls", ssl_context="none"))
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({**connection, "login": "faktura",
                                                                     "password": "s3cret"}))
        assert night.run() == 1
        assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}
        assert night.status() == {("INV000101", "a@bolgen.example"): ("sent", None)}


# --- One definition of final and re-decided -----------------------------------------------------

FINAL = ("recipient_rejected", "message_rejected", "too_large", "smtp_error")
KEEPS_DUE = ("sender_rejected", "auth_failed", "tls_unavailable", "smtputf8_unsupported", "basic_auth_disabled",
             "send_as_denied", "token_refused")
REDECIDED = ("config_error", "dry_run", "no_longer_due", None)


@pytest.mark.parametrize("reason", FINAL + KEEPS_DUE + REDECIDED)
def test_the_ledger_its_trigger_and_the_next_night_agree_on_what_is_final(backend, reason):
    engine = backend["engines"][1]
    ledger.ensure_schema(engine)
    stamp = NIGHT
    row = dict(run_id="r1", last_run_id="r1", doc_type="INV", ref_nbr="INV000101", customer_id="10001",
               mailing_id="INVOICE", recipient="a@bolgen.example", recipient_key="a@bolgen.example", add_to="To",
               format="PDF", mode="live", status="failed", reason=reason, message_id="<x@fjordlys.example>",
               attempts=1, created_at=stamp, updated_at=stamp)
    sent = dict(row, recipient="b@bolgen.example", recipient_key="b@bolgen.example", status="sent", reason=None)
    with engine.begin() as conn:
        conn.execute(insert(ledger.delivery), [row, sent])

    final = reason in FINAL
    assert ledger.redecided("failed", reason) is not final
    assert (reason in ledger.RELAY_REFUSALS) is (reason in KEEPS_DUE)
    still_open = not ledger.settled_documents(engine, [("INV", "INV000101")])
    assert still_open is (reason in (*KEEPS_DUE, "config_error"))  # a config error is open until mended
    try:  # the database's trigger, made by the migrations, draws the same line
        with engine.begin() as conn:
            conn.execute(update(ledger.delivery).where(ledger.delivery.c.recipient == "a@bolgen.example")
                         .values(status="pending"))
        moved = True
    except DBAPIError:
        moved = False
    assert moved is not final
