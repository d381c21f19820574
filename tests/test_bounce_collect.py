"""Spec section 9, reading the bounce mailbox: a night reads it before it mails, the hourly DAG between
nights. dag.test() runs against a real IMAP server (Dovecot), the real SMTP sink and a SQLite ledger."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from dev.smtp_sink import free_port
from include.invoice_mailing import clock, ledger
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE, verp_sender
from tests.conftest import ROOT, smtp_connection
from tests.test_bounce_reports import fixture

BOUNCES = "bounces@fjordlys.example"
KEY = "a-bounce-key-of-this-test-only-32-bytes-or-more"
OPS = "ops@fjordlys.example"
KARI = "kari@bolgen.example"


@pytest.fixture
def kafe(erp):
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=KARI)
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing", "To")
    erp.invoice("INV000101", "10001")
    return erp


@pytest.fixture
def mailbox(dovecot, monkeypatch, sink) -> str:
    """A fresh login on the module's Dovecot as the connection mailing_bounces, the bounce key, the alerts."""
    login = dovecot.new_login()
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(dovecot.connection(login, address=BOUNCES)))
    monkeypatch.setenv(BOUNCE_KEY_VARIABLE, KEY)
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to=OPS))
    return login


def postfix_dsn_for(row: dict) -> bytes:
    """The Postfix fixture's hard bounce, rewritten to be about this delivery: its VERP address, its
    recipient and its message's Message-ID."""
    raw = fixture("postfix-5.1.1-hard.eml")
    raw = raw.replace(b"bounces+101-yqwuy5dschtzxjcm@fjordlys.example",
                      verp_sender(BOUNCES, row["id"], KEY.encode()).encode())
    raw = raw.replace(b"ap@nordvik-bygg.example", row["recipient"].encode())
    return raw.replace(b"<10042.pdf.3f1c2a9be07d4c6a81b2e5f0@fjordlys.example>", row["message_id"].encode())


def collected(run) -> dict:
    """What collect_bounces of a dag.test() run returned (its XCom)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.execute(select(XComModel.value).where(
            XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
            XComModel.task_id == "collect_bounces", XComModel.key == "return_value")).first()
    return XComModel.deserialize_value(value)


def ops_mail(sink) -> list:
    return [m.message for m in sink.received if m.envelope_to == [OPS]]


def run_hourly(date: str = "2026-11-24T10:30:00+00:00"):
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_bounces")
    return dag.test(logical_date=pendulum.parse(date))


def sent_to_kari(ledger_db) -> dict:
    [row] = ledger.all_deliveries(ledger_db, ledger.delivery.c.recipient == KARI)
    return row


def test_a_night_applies_the_bounce_of_the_night_before_and_leaves_an_auto_reply(kafe, mailbox, dovecot, run_dag,
                                                                                    ledger_db, sink):
    assert run_dag("2026-11-23").state == "success"
    row = sent_to_kari(ledger_db)
    assert row["status"] == "sent" and sink.received[0].envelope_from == verp_sender(BOUNCES, row["id"], KEY.encode())
    report, auto_reply = postfix_dsn_for(row), fixture("auto-reply-rfc3834.eml")
    dovecot.append(mailbox, report)
    dovecot.append(mailbox, auto_reply)

    run = run_dag("2026-11-24")

    assert run.state == "success"  # a bounce alone does not turn a night red
    row = sent_to_kari(ledger_db)
    assert (row["status"], row["reason"]) == ("bounced", "hard_bounce")
    assert row["detail"].startswith("5.1.1 550 5.1.1 <kari@bolgen.example>: Recipient address rejected")
    assert [raw for raw, _ in dovecot.messages(mailbox, "Processed")] == [report.replace(b"\n", b"\r\n")]
    assert dovecot.messages(mailbox) == [(auto_reply.replace(b"\n", b"\r\n"), set())]  # unread, still there
    assert collected(run) | {"why": None} == {"read": True, "why": None, "messages": 2, "bounced": 1, "noted": 0,
                                              "moved": 1, "left": 1}
    assert ops_mail(sink) == []  # nothing to warn about: the morning's watch lists the bounce


def test_the_morning_watch_lists_new_bounces_with_the_customer_and_the_masked_address(kafe, mailbox, dovecot,
                                                                                      run_dag, ledger_db, sink):
    from airflow.dag_processing.dagbag import DagBag

    run_dag("2026-11-23")
    dovecot.append(mailbox, postfix_dsn_for(sent_to_kari(ledger_db)))
    run_dag("2026-11-24")

    # The watch's own verdict (here: no night at this hour) is unchanged; its mail carries the bounce.
    DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_watch").test(
        logical_date=clock.now() + timedelta(minutes=1))

    [alert] = ops_mail(sink)
    body = alert.get_body(("html",)).get_content()
    assert "1 delivery bounced" in body and "Correct the address in the ERP" in body
    assert "<td>10001</td><td>INV INV000101</td><td>k***@bolgen.example</td><td>hard_bounce</td>" in body
    assert KARI not in body


def test_a_mailbox_that_is_down_does_not_stop_the_night_and_the_warning_says_so(kafe, mailbox, run_dag,
                                                                                ledger_db, sink, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(
        {"conn_type": "imap", "host": "127.0.0.1", "port": port, "login": "bounces", "password": "x",
         "extra": {"use_ssl": False, "address": BOUNCES}}))

    run = run_dag("2026-11-24")

    assert run.state == "success"
    assert sent_to_kari(ledger_db)["status"] == "sent"
    assert [m.envelope_to for m in sink.received if m.envelope_to != [OPS]] == [[KARI]]  # the night mailed
    assert collected(run)["read"] is False
    [warning] = ops_mail(sink)
    assert warning["Subject"] == f"Invoice mailing {run.run_id}: the bounces were not read"
    assert f"bounces@127.0.0.1:{port}): cannot connect" in warning.get_body(("html",)).get_content()


def test_without_the_connection_nothing_is_read(kafe, run_dag, ledger_db, sink, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILING_BOUNCES", raising=False)

    run = run_dag("2026-11-24")

    assert run.state == "success"
    assert collected(run) == {"read": False, "why": "no connection mailing_bounces", "messages": 0, "bounced": 0,
                              "noted": 0, "moved": 0, "left": 0}
    assert [m.envelope_from for m in sink.received] == ["faktura@fjordlys.example"]  # no VERP either


def test_the_hourly_dag_applies_a_report_and_the_same_report_again_changes_nothing(kafe, mailbox, dovecot,
                                                                                    run_dag, ledger_db):
    run_dag("2026-11-23")
    report = postfix_dsn_for(sent_to_kari(ledger_db))
    dovecot.append(mailbox, report)

    assert run_hourly("2026-11-24T10:30:00+00:00").state == "success"
    bounced = sent_to_kari(ledger_db)
    assert bounced["status"] == "bounced"

    dovecot.append(mailbox, report)  # the relay sent it twice, or someone moved it back
    run = run_hourly("2026-11-24T11:30:00+00:00")

    assert run.state == "success"
    assert sent_to_kari(ledger_db) == bounced
    with ledger_db.connect() as conn:
        assert conn.execute(ledger.select(ledger.func.count()).select_from(ledger.bounce_report)).scalar() == 1
    assert len(dovecot.messages(mailbox, "Processed")) == 2 and dovecot.messages(mailbox) == []
