"""The DAG, run with dag.test() against a tiny SQLite ERP and a real SMTP server: what arrives."""

from __future__ import annotations

import io
from datetime import datetime

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from include.invoice_mailing import ledger
from tests.conftest import smtp_connection


def attachment_of(message):
    return next(part for part in message.iter_attachments())


def pdf_text(part) -> str:
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(part.get_content())).pages)
    return text.replace("\u00a0", " ").replace("\u202f", " ")


def deliveries(ledger_db, **where):
    conditions = [getattr(ledger.delivery.c, k) == v for k, v in where.items()]
    return ledger.all_deliveries(ledger_db, *conditions)


@pytest.fixture
def kafe(erp):
    """Customer 10001 with an invoicing contact (To), its own address (Cc) and a bookkeeper (Bcc)."""
    erp.customer("10001", "Bølgen Kafé AS", invoice_email="kari@bolgen.example", email="post@bolgen.example")
    bookkeeper = erp.contact(None, "regnskap@fjordlys.example", "Ingrid Regnskap", is_employee=True)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.recipient(setting, "Employee", "Bcc", contact_id=bookkeeper)
    return erp


def test_invoice_reaches_to_and_cc_and_bcc_only_in_the_envelope(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")

    run = run_dag()

    assert run.state == "success"
    assert len(sink.received) == 1
    mail = sink.received[0]
    message = mail.message
    assert sorted(mail.envelope_to) == ["kari@bolgen.example", "post@bolgen.example", "regnskap@fjordlys.example"]
    assert "kari@bolgen.example" in message["To"]
    assert message["Cc"] == "Bølgen Kafé AS <post@bolgen.example>"
    assert "Bcc" not in message and b"regnskap@fjordlys.example" not in mail.data
    assert message["From"] == "Fjordlys Faktura <faktura@fjordlys.example>"
    assert message["Subject"] == "Faktura INV000101"
    rows = deliveries(ledger_db, status="sent")
    assert {(r["recipient"], r["add_to"], r["format"]) for r in rows} == {
        ("kari@bolgen.example", "To", "PDF"), ("post@bolgen.example", "Cc", "PDF"),
        ("regnskap@fjordlys.example", "Bcc", "PDF")}
    assert {r["message_id"] for r in rows} == {message["Message-ID"]}
    assert all(r["attachment_sha256"] and r["sent_at"] and r["attempts"] == 1 for r in rows)


def test_pdf_names_the_document_and_customer_in_the_customers_amount_format(erp, run_dag, sink):
    erp.customer("10001", "Bølgen Kafé AS", invoice_email="kari@bolgen.example")
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    erp.invoice("INV000102", "10001", lines=((1, "Kjølerom, komplett installasjon", "1", "987654.31", "25"),))

    run_dag()

    part = attachment_of(sink.received[0].message)
    assert part.get_filename() == "Faktura INV000102.pdf"
    assert part.get_content_type() == "application/pdf"
    text = pdf_text(part)
    assert "INV000102" in text and "Bølgen Kafé AS" in text and "10001" in text
    assert "1 234 567,89" in text  # 987 654,31 + 25 % VAT, as nb_NO writes it
    assert "Kjølerom, komplett installasjon" in text


def test_contact_preferring_html_gets_a_self_contained_html_document(erp, run_dag, sink):
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.add("customer", customer_id="10002", name="Åkerlund & Söner AB", class_id="DOMESTIC", status="Active",
            locale="sv_SE", send_invoices_by_email=True)
    html_fan = erp.contact("10002", "anna@akerlund.example", "Anna Åkerlund", preferred_format="HTML")
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing")
    own = erp.setting(customer_id="10002")
    erp.recipient(own, "Contact", contact_id=html_fan)
    erp.invoice("INV000103", "10002", currency="SEK")

    run_dag()

    assert len(sink.received) == 1
    part = attachment_of(sink.received[0].message)
    assert part.get_filename() == "Faktura INV000103.html"
    html = part.get_content()
    assert "Åkerlund &amp; Söner AB" in html and "<style>" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_a_second_run_sends_nothing(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")
    run_dag()
    first = len(sink.received)

    run_dag()                     # the operator clears the whole run
    run_dag("2026-11-25")         # and the next night comes

    assert first == 1 and len(sink.received) == 1
    assert len(deliveries(ledger_db, status="sent")) == 3


def test_a_document_fixed_in_the_erp_goes_out_the_next_night(erp, run_dag, sink, ledger_db):
    erp.customer("10001", invoice_email="kari@bolgen.example", send_invoices_by_email=False)
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    erp.invoice("INV000104", "10001")

    run_dag()
    assert sink.received == []
    assert [(r["status"], r["reason"]) for r in deliveries(ledger_db)] == [("skipped", "email_disabled")]

    with erp.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE customer SET send_invoices_by_email = 1")
    run_dag("2026-11-25")

    assert len(sink.received) == 1
    assert {(r["status"], r["reason"]) for r in deliveries(ledger_db)} == {("skipped", "email_disabled"),
                                                                         ("sent", None)}


def test_resend_of_named_documents_sends_again_and_points_to_the_original(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")
    kafe.invoice("INV000105", "10001")
    run_dag()
    assert len(sink.received) == 2

    resend = run_dag("2026-11-25", {"documents": ["INV000101"], "resend": True})
    run_dag(rerun=resend)  # the operator clears the resend run: no third copy
    assert len(sink.received) == 3
    run_dag("2026-11-26", {"documents": ["INV000101"], "resend": True})  # asked again: sent again
    assert len(sink.received) == 4

    again = sink.received[2].message
    assert again["X-Invoice-Document"] == "INV INV000101"
    originals = {r["id"] for r in deliveries(ledger_db, ref_nbr="INV000101", generation=0)}
    first_resends = deliveries(ledger_db, ref_nbr="INV000101", generation=1)
    second_resends = deliveries(ledger_db, ref_nbr="INV000101", generation=2)
    assert len(first_resends) == 3 and all(r["status"] == "sent" and r["resend_of"] in originals
                                           for r in first_resends)
    assert {r["resend_of"] for r in second_resends} == {r["id"] for r in first_resends}
    assert again["Message-ID"] != sink.received[0].message["Message-ID"]


def test_dry_run_renders_everything_and_sends_nothing(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")

    run_dag(conf={"dry_run": True})

    assert sink.received == []
    rows = deliveries(ledger_db)
    assert {(r["mode"], r["status"], r["reason"]) for r in rows} == {("dry_run", "skipped", "dry_run")}
    assert all(r["attachment_sha256"] for r in rows)

    run_dag("2026-11-25")  # a dry run never counts as delivered
    assert len(sink.received) == 1


def test_redirect_sends_every_message_to_the_test_address_listing_the_real_recipients(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")

    run_dag(conf={"redirect_to": "test@fjordlys.example"})

    assert [m.envelope_to for m in sink.received] == [["test@fjordlys.example"]]
    message = sink.received[0].message
    assert message["To"] == "test@fjordlys.example" and "Cc" not in message
    body = message.get_body(("plain",)).get_content()
    assert "To: kari@bolgen.example" in body and "Bcc: regnskap@fjordlys.example" in body
    assert {(r["mode"], r["status"], r["redirected_to"]) for r in deliveries(ledger_db)} == {
        ("redirect", "sent", "test@fjordlys.example")}

    run_dag("2026-11-25")  # the real customers still get their invoice
    assert len(sink.received) == 2 and "kari@bolgen.example" in sink.received[1].envelope_to


def test_erp_text_cannot_add_a_header_or_recipient(erp, run_dag, sink):
    erp.customer("10001", "Evil <b>& Co</b>", email="post@evil.example")
    sneaky = erp.contact("10001", "kari@bolgen.example", "Kari\r\nBcc: attacker@evil.example")
    with erp.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE customer SET invoice_contact_id = {sneaky}")
    erp.template("Sneaky", "", "Invoice {{ document.number }}\r\nBcc: attacker@evil.example",
                 "<p>{{ customer.name }}</p>")
    setting = erp.setting(class_id="DOMESTIC", template_id="Sneaky")
    erp.recipient(setting, "Invoicing")
    erp.invoice("INV000106", "10001", description='<script>alert("x")</script> Levering & montering')

    run_dag()

    mail = sink.received[0]
    message = mail.message
    assert mail.envelope_to == ["kari@bolgen.example"]
    assert message.keys().count("Subject") == 1 and "Bcc" not in message
    assert [a.addr_spec for a in message["To"].addresses] == ["kari@bolgen.example"]
    assert message["Subject"] == "Invoice INV000106 Bcc: attacker@evil.example"  # one line, still the subject
    html = mail.message.get_body(("html",)).get_content()
    assert "Evil &lt;b&gt;&amp; Co&lt;/b&gt;" in html


def test_unsafe_notification_template_is_a_config_error_that_turns_the_night_red(erp, run_dag, sink, ledger_db,
                                                                                 monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to="ops@fjordlys.example",
                                                                      from_email="airflow@fjordlys.example"))
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.customer("10002", invoice_email="ola@havet.example")
    erp.template("Unsafe", "", "x", "{{ document.__class__.__mro__[1].__subclasses__() }}")
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    erp.recipient(erp.setting(customer_id="10002", template_id="Unsafe"), "Invoicing")
    erp.invoice("INV000107", "10001")
    erp.invoice("INV000108", "10002")

    run = run_dag()

    assert run.state == "failed"
    invoices = [m for m in sink.received if m.envelope_to != ["ops@fjordlys.example"]]
    (alert,) = [m for m in sink.received if m.envelope_to == ["ops@fjordlys.example"]]
    assert [m.message["X-Invoice-Document"] for m in invoices] == ["INV INV000107"]
    body = alert.message.get_body(("html",)).get_content()
    assert "10002" in body and "INV000108" in body and "config_error" in body and "Unsafe" in body
    assert "o***@havet.example" in body and "ola@havet.example" not in alert.data.decode()
    assert "/tasks/mail_customers/mapped/1" in body
    failed = deliveries(ledger_db, ref_nbr="INV000108")
    assert [(r["status"], r["reason"]) for r in failed] == [("failed", "config_error")]
    assert "Unsafe" in failed[0]["last_error"]


def test_audit_records_the_runs_counts_by_status_and_reason(kafe, erp, run_dag, ledger_db):
    kafe.invoice("INV000101", "10001")
    erp.invoice("INV000109", "10001", released_at=datetime(2026, 9, 1, 10))  # outside the 30-day look-back
    erp.customer("10003", status="OnHold")
    erp.invoice("INV000110", "10003")

    run = run_dag()

    with ledger_db.connect() as conn:
        summary = conn.execute(select(ledger.mailing_run.c.summary).where(
            ledger.mailing_run.c.run_id == run.run_id)).scalar_one()
    assert summary["by_status"] == {"sent": 3, "skipped": 1}
    assert {"status": "skipped", "reason": "customer_on_hold", "deliveries": 1, "documents": 1} in summary["rows"]


def test_mapped_instances_are_labelled_with_their_customer_in_the_grid(kafe, erp, run_dag):
    from airflow.models.taskinstance import TaskInstance
    from airflow.settings import Session

    erp.customer("10002", invoice_email="ola@havet.example")
    kafe.invoice("INV000101", "10001")
    erp.invoice("INV000102", "10002")

    run = run_dag()

    with Session() as session:
        labels = session.execute(select(TaskInstance.rendered_map_index).where(
            TaskInstance.run_id == run.run_id, TaskInstance.task_id == "mail_customers")).scalars().all()
    assert sorted(labels) == ["customer 10001", "customer 10002"]


def test_dry_run_previews_what_a_live_run_would_still_send(kafe, run_dag, sink, ledger_db):
    kafe.invoice("INV000101", "10001")
    run_dag()
    kafe.invoice("INV000111", "10001")

    run_dag("2026-11-25", {"dry_run": True})

    assert {r["ref_nbr"] for r in deliveries(ledger_db, mode="dry_run")} == {"INV000111"}
    assert len(sink.received) == 1
