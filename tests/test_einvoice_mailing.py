"""E-invoices through the whole night (spec section 5): the DAG run with dag.test() against a tiny ERP and
a real SMTP server. What a customer's accounting system reads is what arrived: the XML inside the mailed
PDF (Factur-X) or the mailed XML with the PDF inside (EHF), and each is what the pipeline generated."""

from __future__ import annotations

import base64
import io
import re
from decimal import Decimal

import facturx
import pytest
from lxml import etree
from pypdf import PdfReader
from sqlalchemy import create_engine

from include.invoice_mailing import einvoice, ledger, source
from include.invoice_mailing.render import payment_reference
from include.invoice_mailing.tasks import renderer
from tests.conftest import smtp_connection

UBL = {"cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
       "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"}
# 25/15/12/0 % and fractional quantities: the per-rate VAT and the decimals are where e-invoices break.
MIXED = ((1, "Kaffebønner, hele 1 kg", "2.5", "199.50", "25"), (2, "Røkt laks (kg)", "0.375", "389.00", "15"),
         (3, "Sitronbrus 0,5 l", "24", "21.90", "12"), (4, "Avis, ukeabonnement", "1", "49.00", "0"),
         (5, "Servietter hvite 33x33", "3", "37.45", "25"))


def by_format(sink) -> dict[str, object]:
    """The invoice messages that arrived, by the format of their one attachment."""
    found = {}
    for mail in sink.received:
        part = next(mail.message.iter_attachments())
        kind = {"application/xml": "EHF"}.get(part.get_content_type())
        if kind is None:
            kind = "FACTURX" if "factur-x.xml" in PdfReader(io.BytesIO(part.get_content())).attachments else "PDF"
        found[kind] = (mail, part)
    return found


def generated(erp_path, key, pdf: bytes | None = None, pdf_name: str = "") -> bytes:
    """What the pipeline's model makes of the ERP's document, built again from the ERP."""
    data = source.load_batch(create_engine(f"sqlite:///{erp_path}"), [key])
    (document,) = data.documents
    customer = data.customers[document.customer_id]
    invoice = einvoice.build(document, customer, data.addresses.get(customer.customer_id), renderer().company,
                             payment_reference(customer.customer_id, document.ref_nbr, customer.locale))
    return einvoice.to_cii(invoice) if pdf is None else einvoice.to_ubl(invoice, pdf, pdf_name)


def without_embedded_pdf(ubl: bytes) -> bytes:
    return re.sub(rb"(<cbc:EmbeddedDocumentBinaryObject[^>]*>)[^<]*", rb"\1", ubl)


@pytest.fixture
def three_formats(erp):
    """Customer 10001 with its customer_address: the invoicing contact prefers EHF, the customer's own
    address gets FACTURX by its recipient row, the bookkeeper gets the mailing's PDF."""
    contact = erp.contact("10001", "kari@bolgen.example", preferred_format="EHF")
    erp.customer("10001", "Bølgen Kafé AS", email="post@bolgen.example", invoice_contact_id=contact)
    erp.address("10001")
    bookkeeper = erp.contact(None, "regnskap@fjordlys.example", "Ingrid Regnskap", is_employee=True)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc", format="FACTURX")
    erp.recipient(setting, "Employee", "Bcc", contact_id=bookkeeper)
    return erp


def test_each_format_gets_its_own_message_and_the_xml_inside_is_what_was_generated(three_formats, erp_path,
                                                                                  run_dag, sink, ledger_db):
    three_formats.invoice("INV000101", "10001", lines=MIXED)

    run = run_dag()

    assert run.state == "success"
    mails = by_format(sink)
    assert sorted(mails) == ["EHF", "FACTURX", "PDF"]
    assert {f: m.envelope_to for f, (m, _) in mails.items()} == {
        "EHF": ["kari@bolgen.example"], "FACTURX": ["post@bolgen.example"], "PDF": ["regnskap@fjordlys.example"]}

    _, part = mails["FACTURX"]
    assert part.get_filename() == "Faktura INV000101.pdf"  # Factur-X keeps the PDF's name
    pdf = part.get_content()
    name, xml = facturx.get_xml_from_pdf(pdf, check_xsd=False)  # read as a customer's software reads it
    assert name == "factur-x.xml"
    assert xml == generated(erp_path, ("INV", "INV000101"))

    _, part = mails["EHF"]
    assert part.get_filename() == "Faktura INV000101.xml"
    ubl = part.get_content().encode() if isinstance(part.get_content(), str) else part.get_content()
    tree = etree.fromstring(ubl)
    embedded = tree.find(".//cbc:EmbeddedDocumentBinaryObject", UBL)
    assert embedded.get("mimeCode") == "application/pdf" and embedded.get("filename") == "Faktura INV000101.pdf"
    inner = base64.b64decode(embedded.text)
    assert "INV000101" in PdfReader(io.BytesIO(inner)).pages[0].extract_text()
    assert without_embedded_pdf(ubl) == without_embedded_pdf(
        generated(erp_path, ("INV", "INV000101"), inner, "Faktura INV000101.pdf"))
    assert tree.findtext(".//cac:PaymentMeans/cbc:PaymentID", namespaces=UBL) == payment_reference(
        "10001", "INV000101", "nb_NO")

    rows = ledger.all_deliveries(ledger_db)
    assert {(r["recipient"], r["format"], r["status"]) for r in rows} == {
        ("kari@bolgen.example", "EHF", "sent"), ("post@bolgen.example", "FACTURX", "sent"),
        ("regnskap@fjordlys.example", "PDF", "sent")}


def test_the_factur_x_pdf_is_pdf_a_3b_with_the_factur_x_metadata_and_relationship(three_formats, run_dag, sink):
    three_formats.invoice("INV000101", "10001", lines=MIXED)

    run_dag()

    reader = PdfReader(io.BytesIO(by_format(sink)["FACTURX"][1].get_content()))
    xmp = reader.xmp_metadata.stream.get_data().decode()
    assert 'pdfaid:part="3"' in xmp and 'pdfaid:conformance="B"' in xmp
    assert "<fx:ConformanceLevel>EN 16931</fx:ConformanceLevel>" in xmp
    assert "<fx:DocumentFileName>factur-x.xml</fx:DocumentFileName>" in xmp
    assert "<fx:DocumentType>INVOICE</fx:DocumentType>" in xmp and "<fx:Version>1.0</fx:Version>" in xmp
    assert "<pdfaSchema:namespaceURI>urn:factur-x:pdfa:CrossIndustryDocument:invoice:1p0#" in xmp
    root = reader.trailer["/Root"]
    (spec,) = [f.get_object() for f in root["/AF"]]
    assert spec["/AFRelationship"] == "/Data" and spec["/F"] == "factur-x.xml"
    assert spec["/EF"]["/F"].get_object()["/Subtype"] == "/text/xml"
    assert root["/OutputIntents"][0].get_object()["/S"] == "/GTS_PDFA1"


def test_a_customer_without_customer_address_gets_pdf_and_its_e_invoice_recipient_fails_naming_the_rule(
        erp, run_dag, sink, ledger_db, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to="ops@fjordlys.example",
                                                                      from_email="airflow@fjordlys.example"))
    erp.customer("10002", "Havet Restaurant AS", email="post@havet.example")
    ehf = erp.contact("10002", "ola@havet.example", "Ola Havet", preferred_format="EHF")
    setting = erp.setting(customer_id="10002")
    erp.recipient(setting, "Contact", "To", contact_id=ehf)
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("CRM000045", "10002", doc_type="CRM", lines=MIXED[:2])

    run = run_dag()

    assert run.state == "failed"  # a config_error an operator must mend, as for any other
    invoices = [m for m in sink.received if m.envelope_to != ["ops@fjordlys.example"]]
    assert [m.envelope_to for m in invoices] == [["post@havet.example"]]
    assert next(invoices[0].message.iter_attachments()).get_filename() == "Kreditnota CRM000045.pdf"
    (failed,) = ledger.all_deliveries(ledger_db, ledger.delivery.c.format == "EHF")
    assert (failed["recipient"], failed["status"], failed["reason"]) == ("ola@havet.example", "failed", "config_error")
    assert "BR-11" in failed["detail"] and "customer_address" in failed["detail"]


def test_a_document_whose_erp_totals_disagree_with_its_lines_is_not_mailed_in_any_format(
        three_formats, run_dag, sink, ledger_db):
    three_formats.invoice("INV000102", "10001", lines=MIXED, amount=Decimal("1234.56"))

    run_dag()

    assert [m for m in sink.received if m.message["X-Invoice-Document"] == "INV INV000102"] == []
    rows = ledger.all_deliveries(ledger_db, ledger.delivery.c.ref_nbr == "INV000102")
    assert {(r["format"], r["status"], r["reason"]) for r in rows} == {
        ("EHF", "failed", "config_error"), ("FACTURX", "failed", "config_error"), ("PDF", "failed", "config_error")}
    assert all("1234.56" in r["detail"] for r in rows)
