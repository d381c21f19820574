"""Spec section 9 end to end with a real MTA writing the bounce: the night mails through Postfix (Debian's
``postfix``, dev/postfix.py), Postfix accepts both customers' mail, fails the one for a domain whose
transport refuses it (5.1.1), and sends its own delivery status notification to the delivery's VERP
address, which Postfix delivers into the bounce mailbox (Dovecot). The next night reads it.

dag.test() nights, on a SQLite and on a PostgreSQL ERP and ledger.
"""

from __future__ import annotations

import json
from email import message_from_bytes, policy

from dev.postfix import HOSTNAME, REFUSING
from include.invoice_mailing import ledger
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE, verp_sender
from tests.conftest import smtp_connection
from tests.erp import TinyErp
from tests.test_bounce_collect import BOUNCES, KARI, KEY, OPS, collected

[REFUSING_DOMAIN] = REFUSING
NORDVIK = f"ap@{REFUSING_DOMAIN}"


def test_postfix_reports_the_refused_delivery_and_the_next_night_marks_it_bounced(
        backend, run_dag, postfix, remote_mx, dovecot, sink, monkeypatch):
    from include.invoice_mailing import tasks

    erp_engine, ledger_engine = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", backend["connections"][0])
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", backend["connections"][1])
    tasks.engine_for.cache_clear()
    erp = TinyErp(erp_engine)
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=KARI)
    erp.customer("10002", "Nordvik Bygg AS", invoice_email=NORDVIK)
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing", "To")
    erp.invoice("INV000101", "10001")
    erp.invoice("INV000102", "10002")
    login = dovecot.new_login()
    postfix.deliver_to(BOUNCES, login)
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(postfix.port))
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(dovecot.connection(login, address=BOUNCES)))
    monkeypatch.setenv(BOUNCE_KEY_VARIABLE, KEY)
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to=OPS))
    relayed_before = len(remote_mx.received)  # the module's relay and its sink serve every test of it

    assert run_dag("2026-11-23").state == "success"

    rows = {r["recipient"]: r for r in ledger.all_deliveries(ledger_engine)}
    assert {address: r["status"] for address, r in rows.items()} == {KARI: "sent", NORDVIK: "sent"}  # both 250
    verp = verp_sender(BOUNCES, rows[NORDVIK]["id"], KEY.encode())
    [to_kari] = remote_mx.received[relayed_before:]  # relayed on by Postfix; Nordvik's was not
    assert to_kari.envelope_to == [KARI]
    assert to_kari.envelope_from == verp_sender(BOUNCES, rows[KARI]["id"], KEY.encode())

    # Postfix's own report, delivered by Postfix into the bounce mailbox, as IMAP shows it.
    [delivered] = postfix.wait_for_mail(login)
    [(raw, flags)] = dovecot.messages(login)
    assert raw == delivered.replace(b"\n", b"\r\n") and flags == set()
    report = message_from_bytes(raw, policy=policy.default)
    assert (report["From"].addresses[0].addr_spec, report["To"], report["Delivered-To"]) == (
        f"MAILER-DAEMON@{HOSTNAME}", verp, verp)
    # RET=HDRS: the returned invoice is its headers only, without the PDF.
    assert [p.get_content_type() for p in report.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    per_message, per_recipient = list(report.iter_parts())[1].get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["X-Postfix-Sender"] == f"rfc822; {verp}"
    assert (per_recipient["Final-Recipient"], per_recipient["Action"], per_recipient["Status"]) == (
        f"rfc822; {NORDVIK}", "failed", "5.1.1")
    assert f"Message-ID: {rows[NORDVIK]['message_id']}".encode() in raw

    run = run_dag("2026-11-24")

    assert run.state == "success"
    deliveries = ledger.all_deliveries(ledger_engine)
    assert len(deliveries) == 2  # the bounced address was not mailed again
    rows = {r["recipient"]: r for r in deliveries}
    assert (rows[NORDVIK]["status"], rows[NORDVIK]["reason"]) == ("bounced", "hard_bounce")
    assert rows[NORDVIK]["detail"] == "5.1.1 Mailbox does not exist"
    assert rows[KARI]["status"] == "sent"
    assert collected(run)["bounced"] == 1
    assert [r for r, _ in dovecot.messages(login, "Processed")] == [raw] and dovecot.messages(login) == []
